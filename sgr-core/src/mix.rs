//! Batch-level regularisers of the DeiT recipe that change the targets: label smoothing, mixup
//! and cutmix (docs/models.md, "Training recipe"). Each turns a batch's labels into soft
//! targets; the trainer applies them before the forward pass, with a generator seeded by the
//! run seed and the step, so a resumed run mixes exactly as an uninterrupted one.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::loss::one_hot;
use crate::objective::{Batch, Targets};
use crate::{Error, Result};

/// Mixup and cutmix as timm's `Mixup` in batch mode: one draw per batch; the batch is mixed
/// with itself reversed. Defaults: the DeiT recipe (mixup α 0.8, cutmix α 1.0, always applied,
/// cutmix half of the time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixConfig {
    /// Beta(α, α) of mixup's λ (0: no mixup).
    pub mixup_alpha: f64,
    /// Beta(α, α) of cutmix's λ (0: no cutmix).
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
    /// Probability of cutmix rather than mixup when both are on.
    pub switch_prob: f64,
}

impl Default for MixConfig {
    fn default() -> Self {
        Self {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
        }
    }
}

impl MixConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        for (what, a) in [
            ("mixup alpha", self.mixup_alpha),
            ("cutmix alpha", self.cutmix_alpha),
        ] {
            if !(a.is_finite() && a >= 0.0) {
                return bad(format!("{what} must be finite and >= 0, got {a}"));
            }
        }
        for (what, p) in [("mix prob", self.prob), ("switch prob", self.switch_prob)] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{what} must be in [0, 1], got {p}"));
            }
        }
        if self.mixup_alpha == 0.0 && self.cutmix_alpha == 0.0 {
            return bad("mixup and cutmix are both off (alpha 0): leave the mix out".into());
        }
        Ok(())
    }
}

/// Smoothed one-hot targets: `1 - s + s/C` on the label, `s/C` elsewhere (PyTorch's
/// `CrossEntropyLoss(label_smoothing=s)`).
pub fn smooth_labels(labels: &Tensor, classes: usize, smoothing: f64) -> Result<Tensor> {
    let oh = one_hot(labels, classes, DType::F32)?;
    let off = smoothing / classes as f64;
    Ok(oh.affine(1.0 - smoothing, off)?)
}

/// Checks a label-smoothing value.
pub fn check_smoothing(s: f64) -> Result<()> {
    if !(0.0..1.0).contains(&s) {
        return Err(Error::InvalidConfig(format!(
            "label smoothing must be in [0, 1), got {s}"
        )));
    }
    Ok(())
}

/// A Gamma(α, 1) draw (Marsaglia and Tsang; α < 1 by boosting).
fn gamma(rng: &mut ChaCha8Rng, alpha: f64) -> f64 {
    if alpha < 1.0 {
        let u: f64 = 1.0 - rng.gen::<f64>();
        return gamma(rng, alpha + 1.0) * u.powf(1.0 / alpha);
    }
    let d = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let (x, v) = loop {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            let x = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let v = 1.0 + c * x;
            if v > 0.0 {
                break (x, v * v * v);
            }
        };
        let u: f64 = 1.0 - rng.gen::<f64>();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A Beta(α, α) draw.
fn beta(rng: &mut ChaCha8Rng, alpha: f64) -> f64 {
    let a = gamma(rng, alpha);
    let b = gamma(rng, alpha);
    if a + b == 0.0 {
        0.5
    } else {
        a / (a + b)
    }
}

/// What a mix did to one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MixDraw {
    /// The batch was left as it is.
    None,
    /// Mixup with weight λ on the batch itself.
    Mixup(f64),
    /// Cutmix: rows `y0..y1`, columns `x0..x1` pasted from the reversed batch; λ is the area
    /// kept.
    Cutmix {
        /// Area fraction kept from the batch itself.
        lambda: f64,
        /// Box rows.
        rows: (usize, usize),
        /// Box columns.
        cols: (usize, usize),
    },
}

impl MixConfig {
    /// Draws what to do with a batch of `h × w` images.
    pub fn draw(&self, seed: u64, h: usize, w: usize) -> MixDraw {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        if rng.gen::<f64>() >= self.prob {
            return MixDraw::None;
        }
        let cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.gen::<f64>() < self.switch_prob,
            (false, true) => true,
            _ => false,
        };
        if !cutmix {
            return MixDraw::Mixup(beta(&mut rng, self.mixup_alpha));
        }
        // timm's rand_bbox: a box of side sqrt(1 - λ) times the image's, centred uniformly,
        // clipped to the image; λ is then corrected to the area actually kept.
        let lam = beta(&mut rng, self.cutmix_alpha);
        let ratio = (1.0 - lam).sqrt();
        let (ch, cw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
        let cy = rng.gen_range(0..h);
        let cx = rng.gen_range(0..w);
        let rows = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(h));
        let cols = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(w));
        let area = (rows.1 - rows.0) * (cols.1 - cols.0);
        MixDraw::Cutmix {
            lambda: 1.0 - area as f64 / (h * w) as f64,
            rows,
            cols,
        }
    }
}

/// `batch` with `draw` applied and soft targets: the labels smoothed by `smoothing`, mixed with
/// the reversed batch's by λ. Soft targets given already are mixed the same way.
pub fn apply(batch: &Batch, draw: MixDraw, classes: usize, smoothing: f64) -> Result<Batch> {
    let x = &batch.input;
    let soft = match &batch.targets {
        Targets::Labels(y) => smooth_labels(y, classes, smoothing)?,
        Targets::Soft(p) => p.clone(),
    };
    let n = x.dim(0)?;
    let rev = Tensor::arange(0u32, n as u32, x.device())?.flip_rows(n)?;
    let mix = |a: &Tensor, b: &Tensor, lam: f64| -> Result<Tensor> {
        Ok(((a * lam)? + (b * (1.0 - lam))?)?)
    };
    let (input, lam) = match draw {
        MixDraw::None => return Ok(Batch::soft(x.clone(), soft)),
        MixDraw::Mixup(lam) => (mix(x, &x.index_select(&rev, 0)?, lam)?, lam),
        MixDraw::Cutmix { lambda, rows, cols } => {
            let (_, _, h, w) = x.dims4()?;
            let mask: Vec<f32> = (0..h * w)
                .map(|i| {
                    let (r, c) = (i / w, i % w);
                    f32::from(u8::from(
                        (rows.0..rows.1).contains(&r) && (cols.0..cols.1).contains(&c),
                    ))
                })
                .collect();
            let m = Tensor::from_vec(mask, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
            let pasted = x.index_select(&rev, 0)?.broadcast_mul(&m)?;
            let kept = x.broadcast_mul(&(1.0 - &m)?)?;
            ((kept + pasted)?, lambda)
        }
    };
    let targets = mix(&soft, &soft.index_select(&rev, 0)?, lam)?;
    Ok(Batch::soft(input, targets))
}

/// Reverses the order of a 1-D index tensor of length `n`.
trait FlipRows {
    fn flip_rows(&self, n: usize) -> candle_core::Result<Tensor>;
}

impl FlipRows for Tensor {
    fn flip_rows(&self, n: usize) -> candle_core::Result<Tensor> {
        let idx: Vec<u32> = (0..n as u32).rev().collect();
        self.index_select(&Tensor::from_vec(idx, n, self.device())?, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn beta_has_the_right_mean_and_spread() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for alpha in [0.2, 0.8, 1.0, 3.0] {
            let n = 20_000;
            let xs: Vec<f64> = (0..n).map(|_| beta(&mut rng, alpha)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            // Beta(α, α): mean 1/2, variance 1 / (4 (2α + 1)).
            let want = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((mean - 0.5).abs() < 0.01, "alpha {alpha}: mean {mean}");
            assert!(
                (var - want).abs() < 0.1 * want,
                "alpha {alpha}: var {var} vs {want}"
            );
        }
    }

    #[test]
    fn smoothing_and_mixing_keep_targets_distributions() {
        let dev = Device::Cpu;
        let y = Tensor::new(&[0u32, 2, 1, 2], &dev).unwrap();
        let s = smooth_labels(&y, 3, 0.1).unwrap().to_vec2::<f32>().unwrap();
        assert!((s[0][0] - (0.9 + 0.1 / 3.0)).abs() < 1e-6 && (s[0][1] - 0.1 / 3.0).abs() < 1e-6);
        let x = Tensor::arange(0f32, 4.0 * 2.0 * 4.0 * 4.0, &dev)
            .unwrap()
            .reshape((4, 2, 4, 4))
            .unwrap();
        let b = Batch::labelled(x.clone(), y);
        let cfg = MixConfig::default();
        let mut saw = (false, false);
        for seed in 0..40 {
            let d = cfg.draw(seed, 4, 4);
            let m = apply(&b, d, 3, 0.1).unwrap();
            let Targets::Soft(p) = &m.targets else {
                panic!("mixed targets are soft")
            };
            for row in p.to_vec2::<f32>().unwrap() {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            match d {
                MixDraw::Mixup(lam) => {
                    saw.0 = true;
                    // Sample 0 mixed with sample 3.
                    let got = m.input.get(0).unwrap().flatten_all().unwrap();
                    let want = ((x.get(0).unwrap() * lam).unwrap()
                        + (x.get(3).unwrap() * (1.0 - lam)).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                    let diff = (got - want).unwrap().abs().unwrap().max(0).unwrap();
                    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
                }
                MixDraw::Cutmix { lambda, rows, cols } => {
                    saw.1 = true;
                    let area = (rows.1 - rows.0) * (cols.1 - cols.0);
                    assert!((lambda - (1.0 - area as f64 / 16.0)).abs() < 1e-12);
                    // Outside the box sample 0 is itself; inside it is sample 3's.
                    let v = m.input.to_vec3::<f32>().err();
                    assert!(v.is_some(), "4-D tensor");
                    let got = m
                        .input
                        .get(0)
                        .unwrap()
                        .get(0)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap();
                    let own = x.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
                    let other = x.get(3).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
                    for r in 0..4 {
                        for c in 0..4 {
                            let inside =
                                (rows.0..rows.1).contains(&r) && (cols.0..cols.1).contains(&c);
                            assert_eq!(got[r][c], if inside { other[r][c] } else { own[r][c] });
                        }
                    }
                }
                MixDraw::None => {}
            }
        }
        assert!(saw.0 && saw.1, "both kinds drawn over 40 seeds");
        assert!(MixConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            ..MixConfig::default()
        }
        .validate()
        .is_err());
    }
}
