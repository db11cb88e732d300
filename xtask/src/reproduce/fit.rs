//! The largest batch that fits: a memory profile measures every method of a model at one
//! batch size, the largest whose bp step stays within the memory budget.
//!
//! A step's memory is close to affine in the batch size (weights and optimizer state, plus
//! activations per image). Two small bp steps give the line; the batch it predicts for the
//! budget is then measured, and shrunk in proportion while the measurement is over budget.

use anyhow::{bail, ensure, Context, Result};

/// The batch sizes the line is fitted on.
pub const PROBES: [usize; 2] = [2, 4];

/// At most this many measurements at the predicted batch before giving up.
pub const MAX_TRIES: usize = 4;

/// The largest batch the line through `(b1, m1)` and `(b2, m2)` (bytes) predicts under
/// `budget` bytes, rounded down to a multiple of 8 from 8 up, and at most `max`; `None` when
/// not even the smallest probe's batch fits.
pub fn predict(b1: usize, m1: u64, b2: usize, m2: u64, budget: u64, max: usize) -> Option<usize> {
    if m1 > budget || m2 > budget {
        return None;
    }
    let slope = (m2 as f64 - m1 as f64) / (b2 as f64 - b1 as f64);
    if slope <= 0.0 {
        return Some(max);
    }
    let base = m1 as f64 - slope * b1 as f64;
    let b = ((budget as f64 - base) / slope).floor().max(1.0) as usize;
    Some(round_batch(b).min(max).max(b2.min(max)))
}

/// `b` rounded down to a multiple of 8 when it is at least 8.
pub fn round_batch(b: usize) -> usize {
    if b >= 8 {
        b / 8 * 8
    } else {
        b.max(1)
    }
}

/// The next batch to try after `batch` measured `measured` bytes over `budget`: smaller in
/// proportion to the excess, with a 5 % margin, and always smaller than `batch`.
pub fn shrink(batch: usize, measured: u64, budget: u64) -> usize {
    let scaled = (batch as f64 * budget as f64 / measured as f64 * 0.95).floor() as usize;
    round_batch(scaled).min(batch.saturating_sub(1)).max(1)
}

/// The memory budget on the CPU: `fraction` of the memory available now
/// (`MemAvailable` of `/proc/meminfo`).
pub fn cpu_budget(fraction: f64) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .context("reading /proc/meminfo for the memory available; pass --memory-budget GIB")?;
    let kib = parse_meminfo(&text)
        .context("/proc/meminfo has no MemAvailable line; pass --memory-budget GIB")?;
    Ok((kib as f64 * 1024.0 * fraction) as u64)
}

/// `MemAvailable` of `/proc/meminfo`, in KiB.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Parses `--memory-budget` (GiB, positive).
pub fn parse_budget(text: &str) -> Result<u64> {
    let gib: f64 = text
        .parse()
        .with_context(|| format!("--memory-budget: `{text}` is not a number of GiB"))?;
    ensure!(
        gib.is_finite() && gib > 0.0,
        "--memory-budget must be a positive number of GiB, got {text}"
    );
    Ok((gib * (1u64 << 30) as f64) as u64)
}

/// Finds the largest batch whose measurement fits: `measure(batch)` returns the peak bytes of
/// a bp step at `batch`. Returns the batch and its measured peak.
pub fn fit(
    budget: u64,
    max: usize,
    mut measure: impl FnMut(usize) -> Result<u64>,
) -> Result<(usize, u64)> {
    let [b1, b2] = PROBES;
    let (m1, m2) = (measure(b1)?, measure(b2)?);
    let Some(mut batch) = predict(b1, m1, b2, m2, budget, max) else {
        bail!(
            "even a batch of {b1} needs {} MiB, over the memory budget of {} MiB; \
             pass a larger --memory-budget or a smaller model",
            m1 >> 20,
            budget >> 20
        );
    };
    for _ in 0..MAX_TRIES {
        let m = if batch == b2 { m2 } else { measure(batch)? };
        if m <= budget {
            return Ok((batch, m));
        }
        batch = shrink(batch, m, budget);
    }
    bail!(
        "no batch fitted the memory budget of {} MiB after {MAX_TRIES} tries",
        budget >> 20
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_line_predicts_the_largest_multiple_of_eight() {
        // 100 MiB fixed, 10 MiB per image: 1000 MiB fit 90 images, rounded to 88.
        assert_eq!(
            predict(2, 120 * MIB, 4, 140 * MIB, 1000 * MIB, 4096),
            Some(88)
        );
        assert_eq!(
            predict(2, 120 * MIB, 4, 140 * MIB, 1000 * MIB, 64),
            Some(64)
        );
        assert_eq!(predict(2, 120 * MIB, 4, 140 * MIB, 130 * MIB, 4096), None);
        assert_eq!(
            predict(2, 120 * MIB, 4, 140 * MIB, 145 * MIB, 4096),
            Some(4)
        );
        assert_eq!(
            predict(2, 100 * MIB, 4, 100 * MIB, 145 * MIB, 512),
            Some(512)
        );
        assert_eq!(round_batch(7), 7);
        assert_eq!(round_batch(0), 1);
    }

    #[test]
    fn over_budget_measurements_shrink_until_one_fits() {
        // The line through 2 and 4 predicts 88, but past 4 images each takes 12 MiB: 88 is
        // over budget (1156 MiB), 72 fits (964 MiB).
        let real =
            |b: usize| 100 * MIB + 10 * MIB * b as u64 + if b > 4 { 2 * MIB * b as u64 } else { 0 };
        let mut seen = Vec::new();
        let (b, m) = fit(1000 * MIB, 4096, |b| {
            seen.push(b);
            Ok(real(b))
        })
        .unwrap();
        assert_eq!((b, m), (72, real(72)));
        assert_eq!(seen, [2, 4, 88, 72]);
        let e = fit(50 * MIB, 4096, |b| Ok(real(b)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("even a batch of 2 needs 120 MiB, over the memory budget of 50 MiB"),
            "{e}"
        );
    }

    #[test]
    fn budgets_are_read_and_checked() {
        assert_eq!(parse_budget("1.5").unwrap(), 3 << 29);
        for bad in ["0", "-1", "x", "inf"] {
            assert!(parse_budget(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemAvailable:    2048 kB\n"),
            Some(2048)
        );
        assert_eq!(parse_meminfo("MemTotal: 10 kB\n"), None);
    }
}
