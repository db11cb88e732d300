//! Memory before it is spent: a training step's heap estimated from steps of the same model at
//! batch 2 and 4 (and, for large images, at smaller images), checked against the memory the
//! machine has, so that a batch or image size that cannot fit is refused with numbers instead
//! of aborting in the allocator (docs/models.md, "Steps that cannot fit").
//!
//! A step's heap is close to affine in the batch size (weights, gradients and optimizer state,
//! plus activations per image), so two small steps measure both parts. Activations per image
//! grow with the image area (convolutions) up to its square (attention scores); a step at a
//! large image side could itself be too large to measure, so it is measured at halved sides and
//! the growth per doubling is fitted from two of them, never below the area's.

use std::sync::Arc;

use candle_core::Device;
use sgr_models::Input;

use crate::memory::{measure_step, random_batch, random_images, warm_trainer, MemoryMeter};
use crate::{Error, Result, RunSpec};

/// Environment variable that caps the memory sgr plans against (bytes, or with a `K`, `M`,
/// `G` suffix in binary units), for a machine shared with other jobs.
pub const LIMIT_ENV: &str = "SGR_MEMORY_LIMIT";

/// The smaller of the two measured batches (the larger is twice it).
const PROBE_BATCH: usize = 2;

/// Image sides at or below this are measured directly.
const DIRECT_SIZE: usize = 256;

/// The estimated heap of a training step and an evaluation batch.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEstimate {
    /// Bytes that do not grow with the batch (weights, gradients, optimizer state).
    pub fixed: u64,
    /// Bytes per image of a training step.
    pub per_image: u64,
    /// Bytes per image of an evaluation (forward only).
    pub per_eval_image: u64,
    /// The image side the numbers were measured at (smaller than the input's when scaled).
    pub measured_size: usize,
}

impl StepEstimate {
    /// Heap of a training step at `batch` images.
    pub fn train_bytes(&self, batch: usize) -> u64 {
        self.fixed
            .saturating_add(self.per_image.saturating_mul(batch as u64))
    }

    /// Heap of an evaluation at `batch` images.
    pub fn eval_bytes(&self, batch: usize) -> u64 {
        self.fixed
            .saturating_add(self.per_eval_image.saturating_mul(batch as u64))
    }
}

/// One size's measurement: (fixed, per training image, per evaluation image).
type Measured = (u64, u64, u64);

fn measure_at(
    spec: &RunSpec,
    input: Input,
    meter: &Arc<dyn MemoryMeter>,
    device: &Device,
) -> Result<Measured> {
    let base = meter.live();
    let mut trainer = warm_trainer(spec, input, device)?;
    let mut peaks = [0u64; 2];
    let mut evals = [0u64; 2];
    for (i, b) in [PROBE_BATCH, 2 * PROBE_BATCH].into_iter().enumerate() {
        let batch = random_batch(input, b, device)?;
        peaks[i] = measure_step(&mut trainer, &batch, Arc::clone(meter))?.peak;
        drop(batch);
        let images = random_images(input, b, device)?;
        meter.reset_peak();
        trainer.evaluate(std::iter::once(Ok::<_, sgr_core::Error>(images)))?;
        evals[i] = meter.peak();
    }
    drop(trainer);
    let b = PROBE_BATCH as u64;
    let per = peaks[1].saturating_sub(peaks[0]) / b;
    let per_eval = evals[1].saturating_sub(evals[0]) / b;
    let fixed = peaks[0].saturating_sub(per * b).saturating_sub(base);
    Ok((fixed, per, per_eval))
}

/// Growth of `b` over `a` per doubling of the image side, as an exponent of 2, between `lo`
/// and 4 (attention scores grow with the square of the area).
fn doubling_exponent(a: u64, b: u64, lo: f64) -> f64 {
    if a == 0 || b == 0 {
        return 4.0;
    }
    (b as f64 / a as f64).log2().clamp(lo, 4.0)
}

fn scale(v: u64, exponent: f64, doublings: u32) -> u64 {
    let f = 2f64.powf(exponent * doublings as f64);
    (v as f64 * f).min(u64::MAX as f64) as u64
}

/// Estimates the heap a training step of `spec` at images of `input` needs above what the
/// process holds now, measured with `meter` on steps at batch 2 and 4. Image sides above 256
/// are not measured (such a step can itself be too large, and is slow): the side is halved
/// until it is at most 256, measured there and at half that, and scaled back up.
pub fn estimate_step(
    spec: &RunSpec,
    input: Input,
    meter: Arc<dyn MemoryMeter>,
    device: &Device,
) -> Result<StepEstimate> {
    let at = |size: usize| Input { size, ..input };
    let mut side = input.size;
    while side > DIRECT_SIZE && side.is_multiple_of(2) && side / 2 >= 16 {
        side /= 2;
    }
    if side > DIRECT_SIZE {
        return Err(Error::Spec(format!(
            "cannot estimate the memory of a step at {0}x{0} images: the side halves to \
             {side}, above {DIRECT_SIZE}; use an image side that is a power of two times at \
             most {DIRECT_SIZE}",
            input.size
        )));
    }
    let m = measure_at(spec, at(side), &meter, device).map_err(|e| {
        if side == input.size {
            return e;
        }
        Error::Spec(format!(
            "{e}\n(while estimating the memory of a step at {0}x{0} images on {side}x{side} \
             images; use an image side that halves to one the model takes)",
            input.size
        ))
    })?;
    if side == input.size {
        return Ok(StepEstimate {
            fixed: m.0,
            per_image: m.1,
            per_eval_image: m.2,
            measured_size: side,
        });
    }
    // The growth per doubling from half the side, where the model takes it (a patch grid may
    // not divide it); the steepest otherwise.
    let mut measured = Vec::with_capacity(2);
    if side.is_multiple_of(2) && side / 2 >= 8 {
        if let Ok(half) = measure_at(spec, at(side / 2), &meter, device) {
            measured.push((side / 2, half));
        }
    }
    measured.push((side, m));
    let doublings = (input.size / side).trailing_zeros();
    let (fixed, per_image, per_eval_image) = predict(&measured, m, doublings);
    Ok(StepEstimate {
        fixed,
        per_image,
        per_eval_image,
        measured_size: side,
    })
}

/// `last` (the largest side measured) scaled up by `doublings` doublings of the side, with
/// the growth of the last two measurements (per image: at least the area's, 2; fixed: at
/// least 0), or the steepest growth when only one side was measured.
fn predict(measured: &[(usize, Measured)], last: Measured, doublings: u32) -> Measured {
    let (fixed_exp, per_exp, eval_exp) = match measured {
        [.., (_, a), _] => (
            doubling_exponent(a.0, last.0, 0.0),
            doubling_exponent(a.1, last.1, 2.0),
            doubling_exponent(a.2, last.2, 2.0),
        ),
        _ => (4.0, 4.0, 4.0),
    };
    (
        scale(last.0, fixed_exp, doublings),
        scale(last.1, per_exp, doublings),
        scale(last.2, eval_exp, doublings),
    )
}

/// Bytes the process may still allocate: `MemAvailable`, bounded by the cgroup's
/// `memory.max` less its `memory.current` and by [`LIMIT_ENV`] less the heap held now.
/// `None` when none of them can be read.
pub fn available_bytes(held: u64) -> Result<Option<u64>> {
    let mut avail: Option<u64> = meminfo_available();
    let mut take = |v: u64| avail = Some(avail.map_or(v, |a| a.min(v)));
    if let Some(v) = cgroup_room() {
        take(v);
    }
    if let Some(limit) = limit_from_env()? {
        take(limit.saturating_sub(held));
    }
    Ok(avail)
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

fn cgroup_room() -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Parses a byte count with an optional binary `K`, `M`, `G` or `T` suffix.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 10),
        'M' => (&s[..s.len() - 1], 20),
        'G' => (&s[..s.len() - 1], 30),
        'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1u64 << shift)
}

fn limit_from_env() -> Result<Option<u64>> {
    match std::env::var(LIMIT_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => parse_bytes(&v).map(Some).ok_or_else(|| {
            Error::Spec(format!(
                "{LIMIT_ENV}={v:?} is not a byte count: give bytes, or a number with a K, M, G \
                 or T suffix (for example 8G), or unset it"
            ))
        }),
        Err(e) => Err(Error::Spec(format!("{LIMIT_ENV}: {e}"))),
    }
}

fn gib(b: u64) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 0.1 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// What a run needs beside its steps: batches being loaded (`in_flight` of them at `batch`
/// images) and an evaluation at `eval_batch` images.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Images per training step (0: evaluation only).
    pub batch: usize,
    /// Images per evaluation batch (0: no evaluation).
    pub eval_batch: usize,
    /// The flag that sets the evaluation batch, where one does.
    pub eval_batch_flag: Option<&'static str>,
    /// Batches the loaders may hold at once.
    pub in_flight: usize,
    /// The flag that sets the image side (`--image-size`, `--input-size`), where one does.
    pub size_flag: Option<&'static str>,
    /// Plan against at most this many bytes above what the process holds now, besides what
    /// the machine has.
    pub limit: Option<u64>,
}

impl Plan {
    /// Training steps alone, on one batch held at a time (`sgr bench`, `sgr inspect`).
    pub fn steps(batch: usize, size_flag: &'static str) -> Self {
        Self {
            batch,
            eval_batch: 0,
            eval_batch_flag: None,
            in_flight: 1,
            size_flag: Some(size_flag),
            limit: None,
        }
    }
}

/// Refuses `spec` at `input` when its training step, its evaluation or the batches being
/// loaded need more than the machine has, naming the estimate, the memory available and the
/// flag to change. Does nothing when the available memory cannot be read (the estimate is not
/// measured then) or on a device whose memory is not the heap.
pub fn check_fits(
    spec: &RunSpec,
    input: Input,
    plan: Plan,
    meter: Arc<dyn MemoryMeter>,
    device: &Device,
) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    let held = meter.live();
    let Some(avail) = [available_bytes(held)?, plan.limit]
        .into_iter()
        .flatten()
        .min()
    else {
        return Ok(());
    };
    let est = estimate_step(spec, input, Arc::clone(&meter), device)?;
    let image_bytes = (input.channels * input.size * input.size * 4) as u64;
    let loading = image_bytes
        .saturating_mul(plan.batch.max(plan.eval_batch) as u64)
        .saturating_mul(plan.in_flight as u64);
    let train = est.train_bytes(plan.batch).saturating_add(loading);
    let eval = est.eval_bytes(plan.eval_batch).saturating_add(loading);
    if train.max(eval) <= avail {
        return Ok(());
    }
    let how = if est.measured_size == input.size {
        "measured on steps at batch 2 and 4".to_string()
    } else {
        format!(
            "measured on steps at batch 2 and 4 of {0}x{0} images and scaled",
            est.measured_size
        )
    };
    // The largest batch that fits, its images in flight included.
    let largest = |per_image: u64| {
        let per = per_image.saturating_add(image_bytes.saturating_mul(plan.in_flight as u64));
        avail.saturating_sub(est.fixed) / per.max(1)
    };
    let (what, flag, fit) = if train >= eval {
        let what = format!("a training step at batch {}", plan.batch);
        (what, Some("--batch-size"), largest(est.per_image))
    } else {
        let what = format!("an evaluation at batch {}", plan.eval_batch);
        (what, plan.eval_batch_flag, largest(est.per_eval_image))
    };
    let size = plan.size_flag.map(|f| format!("lower {f}"));
    let todo = match (flag.filter(|_| fit >= 1), size) {
        (Some(flag), Some(size)) => format!("lower {flag} to at most {fit}, or {size} "),
        (Some(flag), None) => format!("lower {flag} to at most {fit} "),
        (None, Some(size)) => format!("{size} or choose a smaller model "),
        (None, None) => "choose a smaller model ".to_string(),
    };
    Err(Error::Spec(format!(
        "{what} of {model} on {size}x{size} images needs about {need} ({how}), but {have} \
         is available: {todo}(or free memory; {LIMIT_ENV} caps what sgr plans against)",
        model = spec.model,
        size = input.size,
        need = gib(train.max(eval)),
        have = gib(avail)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("8G"), Some(8 << 30));
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes(" 3 K"), Some(3 << 10));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("99999999999T"), None);
        assert_eq!(parse_bytes(""), None);
    }

    #[test]
    fn growth_per_doubling_is_at_least_the_floor_and_at_most_attention() {
        assert_eq!(doubling_exponent(100, 400, 2.0), 2.0);
        assert_eq!(doubling_exponent(100, 150, 2.0), 2.0);
        assert_eq!(doubling_exponent(100, 100_000, 2.0), 4.0);
        assert!((doubling_exponent(100, 800, 0.0) - 3.0).abs() < 1e-12);
        assert_eq!(scale(10, 2.0, 3), 640);
        assert_eq!(scale(u64::MAX, 4.0, 10), u64::MAX);
    }
}
