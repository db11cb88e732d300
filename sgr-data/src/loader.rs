//! Deterministic shuffled batching into candle tensors.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{DataError, ImageDataset, Result};

/// Per-channel normalisation of pixels scaled to [0, 1]: (x − mean) / std.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    /// Channel means.
    pub mean: Vec<f32>,
    /// Channel standard deviations.
    pub std: Vec<f32>,
}

impl Normalize {
    /// The statistics of a data set (use the training split's for every split).
    pub fn from_dataset(d: &ImageDataset) -> Self {
        let (mean, std) = d.channel_stats();
        Self { mean, std }
    }
}

/// Batches a data set, shuffled by (seed, epoch) when `shuffle` is set.
#[derive(Debug, Clone)]
pub struct Loader<'a> {
    data: &'a ImageDataset,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    norm: Normalize,
    device: Device,
}

impl<'a> Loader<'a> {
    /// A loader; `batch_size` must be ≥ 1.
    pub fn new(
        data: &'a ImageDataset,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        norm: Normalize,
        device: &Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::Invalid("batch size must be >= 1".into()));
        }
        if norm.mean.len() != data.channels || norm.std.len() != data.channels {
            return Err(DataError::Invalid(format!(
                "normalisation has {} channels, {} has {}",
                norm.mean.len(),
                data.name,
                data.channels
            )));
        }
        Ok(Self {
            data,
            batch_size,
            shuffle,
            drop_last: false,
            seed,
            norm,
            device: device.clone(),
        })
    }

    /// Drop the last incomplete batch.
    pub fn drop_last(mut self, yes: bool) -> Self {
        self.drop_last = yes;
        self
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.data.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The sample order of an epoch.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.data.len()).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            idx.shuffle(&mut rng);
        }
        idx
    }

    /// The batches of `epoch`: `(images (B, C, H, W) f32, labels (B,) u32)`.
    pub fn epoch(&self, epoch: usize) -> impl Iterator<Item = Result<(Tensor, Tensor)>> + '_ {
        let order = self.order(epoch);
        let n_batches = self.batches_per_epoch();
        (0..n_batches).map(move |b| {
            let end = ((b + 1) * self.batch_size).min(order.len());
            self.batch(&order[b * self.batch_size..end])
        })
    }

    /// Builds the batch of the given sample indices.
    pub fn batch(&self, idx: &[usize]) -> Result<(Tensor, Tensor)> {
        let d = self.data;
        let hw = d.height * d.width;
        let mut x = Vec::with_capacity(idx.len() * d.image_len());
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            let img = d.image(i);
            for c in 0..d.channels {
                let (m, s) = (self.norm.mean[c], self.norm.std[c]);
                x.extend(
                    img[c * hw..(c + 1) * hw]
                        .iter()
                        .map(|&p| (p as f32 / d.pixel_max - m) / s),
                );
            }
            y.push(d.labels()[i]);
        }
        let x = Tensor::from_vec(x, (idx.len(), d.channels, d.height, d.width), &self.device)?;
        let y = Tensor::from_vec(y, idx.len(), &self.device)?;
        Ok((x, y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_deterministically_and_covers_everything() {
        let d = crate::digits(false).unwrap();
        let norm = Normalize::from_dataset(&d);
        let l = Loader::new(&d, 64, true, 7, norm, &Device::Cpu).unwrap();
        assert_eq!(l.order(0), l.order(0));
        assert_ne!(l.order(0), l.order(1));
        let mut o = l.order(3);
        o.sort();
        assert_eq!(o, (0..d.len()).collect::<Vec<_>>());
        let batches: Vec<_> = l.epoch(0).collect::<Result<_>>().unwrap();
        assert_eq!(batches.len(), 6);
        assert_eq!(batches[5].0.dims(), &[359 - 5 * 64, 1, 8, 8]);
        let l = l.drop_last(true);
        assert_eq!(l.epoch(0).count(), 5);
        // Normalised with its own statistics: mean ≈ 0, std ≈ 1.
        let all = Loader::new(&d, 359, false, 0, Normalize::from_dataset(&d), &Device::Cpu)
            .unwrap()
            .epoch(0)
            .next()
            .unwrap()
            .unwrap()
            .0;
        let mean = all.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let var = all
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "{mean} {var}"
        );
    }
}
