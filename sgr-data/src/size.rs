//! Checked size arithmetic for sizes read from file contents.

/// The product of `dims`, or `None` if it overflows `usize`.
pub(crate) fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    #[test]
    fn product_is_checked() {
        assert_eq!(super::product(&[]), Some(1));
        assert_eq!(super::product(&[3, 0, usize::MAX]), Some(0));
        assert_eq!(super::product(&[2, 3, 4]), Some(24));
        assert_eq!(super::product(&[1 << 32, 1 << 32]), None);
    }
}
