//! Shuffled, deterministic batching into candle tensors, with decoding and augmentation on
//! background threads feeding a bounded prefetch queue.
//!
//! The order of an epoch is a permutation seeded by (seed, epoch); every sample's augmentation
//! uses its own generator seeded by (seed, epoch, sample index). So an epoch's batches are the
//! same whatever the number of workers, and a run can resume at any (epoch, step).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::image::Source;
use crate::transforms::{Pipeline, Transform};
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
    /// The statistics of an in-memory data set (use the training split's for every split).
    pub fn from_dataset(d: &ImageDataset) -> Self {
        let (mean, std) = d.channel_stats();
        Self { mean, std }
    }

    /// ImageNet's statistics (torchvision).
    pub fn imagenet() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }

    /// The same statistics repeated for `channels` channels (after grey → RGB).
    pub fn repeated(&self, channels: usize) -> Self {
        Self {
            mean: (0..channels)
                .map(|c| self.mean[c % self.mean.len()])
                .collect(),
            std: (0..channels)
                .map(|c| self.std[c % self.std.len()])
                .collect(),
        }
    }

    /// As a transform.
    pub fn transform(&self) -> Transform {
        Transform::Normalize {
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}

/// Batching settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch (≥ 1).
    pub batch_size: usize,
    /// Shuffle by (seed, epoch).
    pub shuffle: bool,
    /// Seed of shuffling and augmentation.
    pub seed: u64,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Background threads decoding and augmenting (0: on the caller's thread).
    pub workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    pub prefetch: usize,
}

impl LoaderConfig {
    /// Evaluation settings: no shuffling, keep the last batch.
    pub fn eval(batch_size: usize) -> Self {
        Self {
            batch_size,
            shuffle: false,
            seed: 0,
            drop_last: false,
            workers: default_workers(),
            prefetch: 2,
        }
    }

    /// Training settings: shuffled by `seed`.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            shuffle: true,
            seed,
            ..Self::eval(batch_size)
        }
    }
}

/// Worker threads by default: the available parallelism, at most 4.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().min(4))
        .unwrap_or(1)
}

/// Batches a [`Source`] through a transform [`Pipeline`].
#[derive(Clone)]
pub struct Loader {
    source: Arc<dyn Source>,
    cfg: LoaderConfig,
    pipeline: Arc<Pipeline>,
    device: Device,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("source", &self.source.name())
            .field("cfg", &self.cfg)
            .field("pipeline", &self.pipeline)
            .finish()
    }
}

type Raw = (Vec<f32>, [usize; 3], Vec<u32>);

fn sample_seed(seed: u64, epoch: usize, index: usize) -> u64 {
    // splitmix64 of the three, so nearby indices get unrelated streams.
    let mut z = seed
        .wrapping_add((epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn build_batch(
    source: &dyn Source,
    pipeline: &Pipeline,
    seed: u64,
    epoch: usize,
    idx: &[usize],
) -> Result<Raw> {
    let mut data = Vec::new();
    let mut labels = Vec::with_capacity(idx.len());
    let mut shape: Option<[usize; 3]> = None;
    for &i in idx {
        let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(seed, epoch, i));
        let img = pipeline.apply(source.image(i)?, &mut rng)?;
        let s = [img.channels, img.height, img.width];
        match shape {
            None => {
                shape = Some(s);
                data.reserve(idx.len() * img.data.len());
            }
            Some(prev) if prev != s => {
                return Err(DataError::Invalid(format!(
                    "{}: sample {i} is {s:?} after transforms, the batch is {prev:?}; add a resize/crop",
                    source.name()
                )))
            }
            _ => {}
        }
        data.extend_from_slice(&img.data);
        labels.push(source.label(i));
    }
    Ok((data, shape.unwrap_or([0, 0, 0]), labels))
}

impl Loader {
    /// A loader over `source`.
    pub fn new(
        source: Arc<dyn Source>,
        cfg: LoaderConfig,
        pipeline: Pipeline,
        device: &Device,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::Invalid("batch size must be >= 1".into()));
        }
        if source.is_empty() {
            return Err(DataError::Invalid(format!("{} is empty", source.name())));
        }
        Ok(Self {
            source,
            cfg: LoaderConfig {
                prefetch: cfg.prefetch.max(1),
                ..cfg
            },
            pipeline: Arc::new(pipeline),
            device: device.clone(),
        })
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    /// Settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.source.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// The sample order of an epoch.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.source.len()).collect();
        if self.cfg.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            idx.shuffle(&mut rng);
        }
        idx
    }

    /// The batches of `epoch`: `(images (B, C, H, W) f32, labels (B,) u32)`.
    pub fn epoch(&self, epoch: usize) -> Batches {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `start` on (resuming mid-epoch).
    pub fn epoch_from(&self, epoch: usize, start: usize) -> Batches {
        let order = Arc::new(self.order(epoch));
        let end = self.batches_per_epoch();
        let bs = self.cfg.batch_size;
        let workers = self.cfg.workers;
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel::<Result<Raw>>(self.cfg.prefetch);
            let source = Arc::clone(&self.source);
            let pipeline = Arc::clone(&self.pipeline);
            let order = Arc::clone(&order);
            let seed = self.cfg.seed;
            handles.push(std::thread::spawn(move || {
                let mut b = start + (w + workers - start % workers) % workers;
                while b < end {
                    let hi = ((b + 1) * bs).min(order.len());
                    let r =
                        build_batch(source.as_ref(), &pipeline, seed, epoch, &order[b * bs..hi]);
                    if tx.send(r).is_err() {
                        return;
                    }
                    b += workers;
                }
            }));
            receivers.push(rx);
        }
        Batches {
            loader: self.clone(),
            order,
            epoch,
            next: start,
            end,
            receivers,
            handles,
        }
    }
}

/// The batches of one epoch (an iterator). Dropping it stops the workers.
pub struct Batches {
    loader: Loader,
    order: Arc<Vec<usize>>,
    epoch: usize,
    next: usize,
    end: usize,
    receivers: Vec<Receiver<Result<Raw>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let b = self.next;
        self.next += 1;
        let raw = if self.receivers.is_empty() {
            let bs = self.loader.cfg.batch_size;
            let hi = ((b + 1) * bs).min(self.order.len());
            build_batch(
                self.loader.source.as_ref(),
                &self.loader.pipeline,
                self.loader.cfg.seed,
                self.epoch,
                &self.order[b * bs..hi],
            )
        } else {
            let w = b % self.receivers.len();
            match self.receivers[w].recv() {
                Ok(r) => r,
                Err(_) => Err(DataError::Invalid("a data-loading worker stopped".into())),
            }
        };
        Some(raw.and_then(|(data, [c, h, w], labels)| {
            let n = labels.len();
            let x = Tensor::from_vec(data, (n, c, h, w), &self.loader.device)?;
            let y = Tensor::from_vec(labels, n, &self.loader.device)?;
            Ok((x, y))
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end - self.next;
        (n, Some(n))
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits_loader(workers: usize, shuffle: bool, pipeline: Pipeline) -> Loader {
        let d = crate::digits(false).unwrap();
        let cfg = LoaderConfig {
            workers,
            shuffle,
            seed: 7,
            ..LoaderConfig::eval(64)
        };
        Loader::new(Arc::new(d), cfg, pipeline, &Device::Cpu).unwrap()
    }

    fn all(b: Batches) -> Vec<(Vec<f32>, Vec<u32>)> {
        b.map(|r| {
            let (x, y) = r.unwrap();
            (
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                y.to_vec1::<u32>().unwrap(),
            )
        })
        .collect()
    }

    #[test]
    fn shuffles_deterministically_and_covers_everything() {
        let l = digits_loader(0, true, Pipeline::default());
        assert_eq!(l.order(0), l.order(0));
        assert_ne!(l.order(0), l.order(1));
        let mut o = l.order(3);
        o.sort();
        assert_eq!(o, (0..359).collect::<Vec<_>>());
        let batches = all(l.epoch(0));
        assert_eq!(batches.len(), 6);
        assert_eq!(batches[5].1.len(), 359 - 5 * 64);
        let mut l2 = l.clone();
        l2.cfg.drop_last = true;
        assert_eq!(l2.epoch(0).count(), 5);
    }

    #[test]
    fn workers_and_resume_give_the_same_batches() {
        let aug = Pipeline::new(vec![
            Transform::RandomCrop {
                size: 8,
                padding: 2,
            },
            Transform::HorizontalFlip { p: 0.5 },
        ]);
        let serial = all(digits_loader(0, true, aug.clone()).epoch(2));
        for workers in [1, 2, 3] {
            let par = all(digits_loader(workers, true, aug.clone()).epoch(2));
            assert_eq!(serial, par, "{workers} workers");
        }
        let resumed = all(digits_loader(2, true, aug.clone()).epoch_from(2, 4));
        assert_eq!(&serial[4..], resumed.as_slice());
        // Augmentation really varies with the epoch.
        assert_ne!(serial, all(digits_loader(0, true, aug).epoch(3)));
    }

    #[test]
    fn dropping_mid_epoch_stops_workers() {
        let l = digits_loader(3, true, Pipeline::default());
        let mut b = l.epoch(0);
        assert!(b.next().is_some());
        drop(b); // must not hang
    }

    #[test]
    fn normalised_digits_have_zero_mean_unit_variance() {
        let d = crate::digits(false).unwrap();
        let norm = Normalize::from_dataset(&d);
        let l = Loader::new(
            Arc::new(d),
            LoaderConfig::eval(359),
            Pipeline::new(vec![norm.transform()]),
            &Device::Cpu,
        )
        .unwrap();
        let x = l.epoch(0).next().unwrap().unwrap().0;
        let mean = x.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let var = x
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
