//! The embedded default data set: 1797 8×8 handwritten digits (UCI optdigits test set as
//! shipped in scikit-learn; CC BY 4.0, see `data/DIGITS-LICENSE.md`).

use std::io::Read;
use std::path::PathBuf;

use crate::{DataError, ImageDataset, Result};

/// The gzipped CSV, embedded in the binary (57 KB).
pub static DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

const SOURCE: &str = "<embedded digits.csv.gz>";

/// The digits split: `train = true` gives the 1438 samples with `i % 5 != 4`, otherwise the
/// 359 test samples (`i % 5 == 4`). Pixels are 0..16, one channel, 8×8.
pub fn digits(train: bool) -> Result<ImageDataset> {
    parse_digits(DIGITS_CSV_GZ, train)
}

fn bad(problem: String) -> DataError {
    DataError::Format {
        path: PathBuf::from(SOURCE),
        problem,
    }
}

fn parse_digits(gz: &[u8], train: bool) -> Result<ImageDataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("cannot decompress: {e}")))?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        if (i % 5 == 4) == train {
            continue;
        }
        let vals: Vec<&str> = line.split(',').collect();
        if vals.len() != 65 {
            return Err(bad(format!(
                "row {i} has {} fields, expected 65",
                vals.len()
            )));
        }
        for (j, v) in vals.iter().enumerate() {
            let x: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad(format!("row {i} field {j}: `{v}` is not a number")))?;
            let limit = if j == 64 { 9.0 } else { 16.0 };
            if !(0.0..=limit).contains(&x) || x.fract() != 0.0 {
                return Err(bad(format!("row {i} field {j}: {x} outside 0..={limit}")));
            }
            if j == 64 {
                labels.push(x as u32);
            } else {
                pixels.push(x as u8);
            }
        }
    }
    let name = if train { "digits/train" } else { "digits/test" };
    ImageDataset::new(name, 1, 8, 8, 10, 16.0, pixels, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizes_and_classes() {
        let tr = digits(true).unwrap();
        let te = digits(false).unwrap();
        assert_eq!(tr.len(), 1438);
        assert_eq!(te.len(), 359);
        let mut counts = [0usize; 10];
        for &l in tr.labels().iter().chain(te.labels()) {
            counts[l as usize] += 1;
        }
        // scikit-learn's documented class counts of the 1797 digits.
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        // First sample of the file is a 0 (the scikit-learn docs' first image).
        assert_eq!(tr.labels()[0], 0);
        assert_eq!(&tr.image(0)[..8], &[0, 0, 5, 13, 9, 1, 0, 0]);
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let e = parse_digits(b"not gzip", true).unwrap_err().to_string();
        assert!(
            e.contains("embedded digits") && e.contains("decompress"),
            "{e}"
        );
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, b"1,2,3\n").unwrap();
        let e = parse_digits(&enc.finish().unwrap(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 0 has 3 fields"), "{e}");
    }
}
