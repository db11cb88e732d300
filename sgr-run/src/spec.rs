//! The run specification: everything that decides what a run computes. It is what
//! `sgr train --config FILE` reads and what every run writes as `config.json`: one schema.
//! Fields left out of a file take the defaults of [`RunSpec::default`], the quickstart job (SGR
//! on the embedded 8×8 digits).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sgr_core::objective::InfoproConfig;
use sgr_core::optim::{DecayScope, OptimizerConfig};
use sgr_core::trainer::TrainerConfig;
use sgr_models::{HeadKind, SplitStrategy};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The data sets a run can train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dataset {
    /// Embedded 8x8 handwritten digits (1438 train / 359 test).
    Digits,
    /// CIFAR-10 binary files in the data folder.
    Cifar10,
    /// CIFAR-100 binary files (fine labels) in the data folder.
    Cifar100,
    /// MNIST IDX files (raw or .gz); padded to 32x32, grey repeated to RGB.
    Mnist,
    /// Fashion-MNIST IDX files (default folder: Debian's /usr/share/datasets/fashion-mnist).
    FashionMnist,
    /// SVHN train_32x32.mat / test_32x32.mat.
    Svhn,
    /// STL-10 binary files (stl10_binary).
    Stl10,
    /// ImageNet-style folders: `train/<class>/*` and `val/<class>/*`.
    Imagefolder,
}

sgr_core::named_enum!(Dataset, "data set", {
    "digits" => Digits,
    "cifar10" => Cifar10,
    "cifar100" => Cifar100,
    "mnist" => Mnist,
    "fashion-mnist" => FashionMnist,
    "svhn" => Svhn,
    "stl10" => Stl10,
    "imagefolder" => Imagefolder,
});

/// Where a run computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceKind {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with the `cuda` feature).
    Cuda,
}

sgr_core::named_enum!(DeviceKind, "device", { "cpu" => Cpu, "cuda" => Cuda });

impl DeviceKind {
    /// The candle device.
    pub fn device(&self) -> Result<candle_core::Device> {
        match self {
            DeviceKind::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda if !cuda_driver_present() => Err(Error::Spec(
                "--device cuda: no CUDA device was found: the NVIDIA driver (libcuda.so.1) is \
                 not installed here; train on --device cpu, or run on a machine with an NVIDIA \
                 GPU and its driver"
                    .into(),
            )),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
                Error::Spec(format!(
                    "--device cuda: no usable CUDA device was found ({e}); check that an NVIDIA \
                     GPU and its driver are present (`nvidia-smi`), or train on --device cpu"
                ))
            }),
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda => Err(Error::Spec(
                "--device cuda: this sgr was built without GPU support; build one with \
                 `scripts/cuda/build.sh` (CUDA from PyPI's wheels, no system toolkit needed)"
                    .into(),
            )),
        }
    }
}

/// Whether the NVIDIA driver library can be opened (cudarc would panic at first use otherwise).
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> bool {
    // SAFETY: this only opens the library (running its initialisers, as any load would) and
    // closes it again.
    unsafe { candle_core::cuda_backend::cudarc::driver::sys::is_culib_present() }
}

/// The kinds of optimizer, for choosing one by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// SGD with Nesterov momentum 0.9.
    Sgd,
    /// AdamW with betas 0.9/0.999.
    Adamw,
}

sgr_core::named_enum!(OptimizerKind, "optimizer", { "sgd" => Sgd, "adamw" => Adamw });

impl OptimizerKind {
    /// The optimizer's settings with `weight_decay`.
    pub fn config(&self, weight_decay: f64) -> OptimizerConfig {
        match self {
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay,
                decay: DecayScope::All,
            },
            OptimizerKind::Adamw => OptimizerConfig::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
                decay: DecayScope::Weights,
            },
        }
    }
}

/// The kinds of learning-rate schedule, for choosing one by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Linear warm-up, then cosine decay to 0 at the last step.
    Cosine,
    /// A constant learning rate.
    Constant,
}

sgr_core::named_enum!(ScheduleKind, "schedule", { "cosine" => Cosine, "constant" => Constant });

/// What a run computes: model, data, method, optimizer, schedule, device and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSpec {
    /// Model preset (`resnet20`, `resnet50`, `deit-s`, ...; `sgr_models::zoo::names`).
    pub model: String,
    /// Data set.
    pub dataset: Dataset,
    /// Folder with the data set's files (default: the data set's standard place, if any).
    pub data_dir: Option<PathBuf>,
    /// Number of modules K (default: 1 for end-to-end methods, 4 otherwise).
    pub modules: Option<usize>,
    /// How the network is cut into modules.
    pub split: SplitStrategy,
    /// The measured end points of the balanced split, one per module (filled in when the
    /// split is measured; see `crate::memory::balanced_spec`).
    pub split_ends: Option<Vec<usize>>,
    /// Auxiliary head of modules 1..K-1 (`auto`: the model family's usual head).
    pub aux_head: HeadKind,
    /// Dropout probability inside Transformer blocks.
    pub dropout: f64,
    /// Stochastic-depth probability of the last Transformer block (linear in depth).
    pub drop_path: f64,
    /// InfoPro's loss weights and contrastive settings (methods `infopro*`).
    #[serde(skip_serializing_if = "InfoproConfig::is_default")]
    pub infopro: InfoproConfig,
    /// Batch size.
    pub batch_size: usize,
    /// Seed of initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    /// Use only the first N training samples (after the validation images are taken out).
    pub train_limit: Option<usize>,
    /// Hold out the last N images of the training set and evaluate on them instead of the
    /// test split (for choosing hyperparameters without looking at the test set). The
    /// normalisation statistics stay those of the whole training set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<usize>,
    /// The data set's standard training augmentation (crop, flip).
    pub augment: bool,
    /// RandAugment (N operations, magnitude M of 30).
    pub randaugment: Option<(usize, usize)>,
    /// Random Erasing probability.
    pub random_erasing: Option<f32>,
    /// Image side for image folders (train: random-resized-crop; eval: resize + centre crop).
    pub image_size: usize,
    /// Class-index file for image folders (one class folder name per line).
    pub class_index: Option<PathBuf>,
    /// Where to compute.
    pub device: DeviceKind,
    /// Method, optimizer, learning rate, schedule and epochs.
    pub trainer: TrainerConfig,
}

impl Default for RunSpec {
    /// The quickstart job: ResNet-20 cut into 4 modules with SGR on the embedded digits.
    fn default() -> Self {
        Self {
            model: "resnet20".into(),
            dataset: Dataset::Digits,
            data_dir: None,
            modules: None,
            split: SplitStrategy::Auto,
            split_ends: None,
            aux_head: HeadKind::Auto,
            dropout: 0.0,
            drop_path: 0.0,
            infopro: InfoproConfig::default(),
            batch_size: 64,
            seed: 0,
            train_limit: None,
            validation: None,
            augment: true,
            randaugment: None,
            random_erasing: None,
            image_size: 224,
            class_index: None,
            device: DeviceKind::Cpu,
            trainer: TrainerConfig::default(),
        }
    }
}

/// Largest batch size accepted.
pub const MAX_BATCH: usize = 1 << 16;
/// Smallest and largest image side accepted for image folders.
pub const MIN_IMAGE_SIZE: usize = 8;
/// Largest image side accepted for image folders.
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Largest number of modules accepted.
pub const MAX_MODULES: usize = 1024;
/// Largest number of epochs accepted.
pub const MAX_EPOCHS: usize = 1_000_000;
/// Largest number of RandAugment operations accepted.
pub const MAX_RANDAUGMENT_OPS: usize = 16;
/// Largest number of data-loading workers accepted.
pub const MAX_WORKERS: usize = 256;

/// The number of data-loading workers: `workers`, or the default, within [`MAX_WORKERS`].
pub fn check_workers(workers: Option<usize>) -> Result<usize> {
    match workers {
        Some(n) if n > MAX_WORKERS => Err(Error::Spec(format!(
            "--workers must be at most {MAX_WORKERS}, got {n}"
        ))),
        Some(n) => Ok(n),
        None => Ok(sgr_data::default_workers()),
    }
}

/// The default number of modules of local methods.
pub const DEFAULT_MODULES: usize = 4;

/// The smallest `--sgr-fd-epsilon`: a step along a unit-RMS direction that still moves f32
/// activations of order 1 by about 100 units in the last place.
pub const MIN_FD_EPSILON: f64 = 1e-5;

/// SHA-256, in hex, of `value`'s JSON (fields in declaration order): the key under which a
/// specification's result may be reused (`sgr train --print-spec`, `sgr bench --print-spec`).
pub fn hash_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    let json = serde_json::to_vec(value).map_err(|e| Error::Spec(e.to_string()))?;
    let digest = Sha256::digest(&json);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

impl RunSpec {
    /// K, with the default when not set: 1 for end-to-end methods, the number of measured
    /// ends for the balanced split, one module per unit for the block split, else 4.
    pub fn num_modules(&self) -> usize {
        if let Some(k) = self.modules {
            return k;
        }
        if self.trainer.method.objective.is_end_to_end() {
            return 1;
        }
        match (&self.split_ends, self.split) {
            (Some(ends), _) => ends.len(),
            (None, SplitStrategy::Block) => {
                sgr_models::zoo::units(&self.model).unwrap_or(DEFAULT_MODULES)
            }
            _ => DEFAULT_MODULES,
        }
    }

    /// The model's options: K, split, objective, head, seed, dropout (no pixel statistics:
    /// the data supplies them, see `crate::run::build_network`).
    pub fn model_options(&self) -> sgr_models::ModelOptions {
        sgr_models::ModelOptions {
            modules: self.num_modules(),
            split: self.split,
            split_ends: self.split_ends.clone(),
            head: self.aux_head,
            seed: self.seed,
            dropout: self.dropout,
            drop_path: self.drop_path,
            objective: self.trainer.method.objective,
            infopro: self.infopro.clone(),
            pixels: None,
        }
    }

    /// Fills in defaults that depend on other fields (K, the trainer's seed), makes `data_dir`
    /// absolute (against the current directory), and checks every field, so that what is
    /// written as `config.json` is complete and valid.
    pub fn resolved(mut self) -> Result<Self> {
        self.modules = Some(self.num_modules());
        self.trainer.seed = self.seed;
        // Recorded absolute, so that a resume from another folder reads the same data.
        if let Some(d) = &self.data_dir {
            self.data_dir = Some(std::path::absolute(d).map_err(|source| Error::Io {
                path: d.clone(),
                source,
            })?);
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Spec(m));
        let m = &self.trainer.method;
        m.validate()?;
        let passes = self.trainer.fg_passes;
        if !(1..=sgr_core::trainer::MAX_FG_PASSES).contains(&passes) {
            return Err(Error::Spec(format!(
                "--fg-passes must be in 1..={}, got {passes}",
                sgr_core::trainer::MAX_FG_PASSES
            )));
        }
        if passes != 1 && !m.estimator.is_bp_free() {
            return Err(Error::Spec(format!(
                "fg_passes = {passes} needs a forward estimator (forward-activity or \
                 forward-weight); the estimator is `{}`: remove fg_passes or change the estimator",
                m.estimator
            )));
        }
        let k = self.num_modules();
        if m.objective.is_end_to_end() && k != 1 {
            return bad(format!(
                "method {m} trains end to end: --modules must be 1, got {k}"
            ));
        }
        if k == 0 {
            return bad("--modules must be >= 1".into());
        }
        sgr_models::zoo::family(&self.model)?;
        self.model_options().validate()?;
        if self.batch_size == 0 || self.trainer.epochs == 0 {
            return bad("--batch-size and --epochs must be >= 1".into());
        }
        self.check_settings_take_effect()?;
        if self.train_limit == Some(0) {
            return bad("--train-limit must be >= 1".into());
        }
        if self.validation == Some(0) {
            return bad("--validation must be >= 1 (or left out)".into());
        }
        if m.objective.is_infopro() {
            self.infopro.validate()?;
        } else if !self.infopro.is_default() {
            return bad(format!(
                "the `infopro` settings apply to the methods infopro and infopro-contrast \
                 (with or without +sgr); the method is {m}: remove them or change the method"
            ));
        }
        if m.objective == sgr_core::method::Objective::InfoproContrast
            && (self.trainer.mix.is_some() || self.trainer.label_smoothing > 0.0)
        {
            return bad(format!(
                "method {m} compares samples by their hard labels: it cannot train with \
                 --mixup, --cutmix or --label-smoothing"
            ));
        }
        if self.validation.is_some() && self.dataset == Dataset::Imagefolder {
            return bad(
                "--validation holds out the last training images, and an image folder lists \
                 them class by class (they would all be of the last classes): make a \
                 validation folder instead and pass it as the data set's val/"
                    .into(),
            );
        }
        if let Some((_, mag)) = self.randaugment {
            if mag > 30 {
                return bad(format!("--randaugment magnitude must be <= 30, got {mag}"));
            }
        }
        if let Some(p) = self.random_erasing {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!(
                    "--random-erasing is a probability in [0, 1], got {p}"
                ));
            }
        }
        if !(self.trainer.lr.is_finite() && self.trainer.lr > 0.0) {
            return bad(format!(
                "--lr must be finite and > 0, got {}",
                self.trainer.lr
            ));
        }
        self.trainer.optimizer.validate()?;
        sgr_core::mix::check_smoothing(self.trainer.label_smoothing)?;
        if let Some(m) = &self.trainer.mix {
            m.validate()?;
        }
        if let Some(c) = self.trainer.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("--clip-grad-norm must be finite and > 0, got {c}"));
            }
        }
        self.trainer.schedule.validate()?;
        // Bounds that keep every allocation they size reasonable.
        for (flag, v, max) in [
            ("--batch-size", self.batch_size, MAX_BATCH),
            ("--image-size", self.image_size, MAX_IMAGE_SIZE),
            ("--modules", k, MAX_MODULES),
            ("--epochs", self.trainer.epochs, MAX_EPOCHS),
        ] {
            if v > max {
                return bad(format!("{flag} must be at most {max}, got {v}"));
            }
        }
        if self.image_size < MIN_IMAGE_SIZE {
            return bad(format!(
                "--image-size must be at least {MIN_IMAGE_SIZE}, got {}",
                self.image_size
            ));
        }
        if let Some((ops, _)) = self.randaugment {
            if ops > MAX_RANDAUGMENT_OPS {
                return bad(format!(
                    "--randaugment takes at most {MAX_RANDAUGMENT_OPS} operations, got {ops}"
                ));
            }
        }
        Ok(())
    }

    /// Settings that would train as if they were not there are refused: a warm-up as long as
    /// the run, a finite-difference step too small to move an f32 activation, and trainer
    /// fields that the run computes itself (a config file could set them; they would change
    /// the hash and nothing else).
    fn check_settings_take_effect(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Spec(m));
        let t = &self.trainer;
        let epochs = t.epochs as f64;
        if let sgr_core::optim::Schedule::Cosine { warmup_epochs } = t.schedule {
            if warmup_epochs.is_finite() && warmup_epochs > 0.0 && warmup_epochs >= epochs {
                return bad(format!(
                    "--warmup-epochs {warmup_epochs} is not shorter than the run (--epochs {}): \
                     the learning rate would still be rising when training ends; use fewer \
                     warm-up epochs",
                    t.epochs
                ));
            }
        }
        if let Some(sgr) = &t.method.sgr {
            if sgr.warmup_epochs > 0.0 && sgr.warmup_epochs >= epochs {
                return bad(format!(
                    "--sgr-warmup {} is not shorter than the run (--epochs {}): λ would never \
                     reach --sgr-lambda; use a shorter SGR warm-up",
                    sgr.warmup_epochs, t.epochs
                ));
            }
            if let Some(e) = sgr.fd_epsilon {
                if !(MIN_FD_EPSILON..=1.0).contains(&e) {
                    return bad(format!(
                        "--sgr-fd-epsilon must be in [{MIN_FD_EPSILON}, 1], got {e}: below, the \
                         passes differ by f32 round-off only (the SGR term is noise, or exactly \
                         0 when h + εu rounds to h); above, the difference is no derivative"
                    ));
                }
            }
        }
        if t.steps_per_epoch != 0 {
            return bad(format!(
                "trainer.steps_per_epoch = {} is computed by the run from the data (batches per \
                 epoch): remove it from the configuration",
                t.steps_per_epoch
            ));
        }
        if t.seed != 0 && t.seed != self.seed {
            return bad(format!(
                "trainer.seed = {} differs from seed = {}: the run seeds everything from the \
                 top-level `seed` (--seed); remove trainer.seed",
                t.seed, self.seed
            ));
        }
        Ok(())
    }

    /// SHA-256 of the specification's canonical JSON (fields in declaration order, every
    /// default included): two runs with the same hash compute the same thing.
    pub fn hash(&self) -> Result<String> {
        hash_json(self)
    }

    /// Reads a specification from TOML, or JSON when the file name ends in `.json`; missing
    /// fields take the defaults, unknown or duplicate fields and bad values are errors naming
    /// the file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = sgr_schema::file::read_regular_string(path, sgr_schema::file::limits::TEXT)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let file = |problem: String| Error::File {
            path: path.to_path_buf(),
            problem,
        };
        let spec: Self = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| file(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| file(e.to_string()))?
        };
        // Ranges are checked here too, so that an error names the file the value came from.
        spec.validate().map_err(|e| file(e.to_string()))?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fg_passes_needs_a_forward_estimator_and_a_range() {
        let mut spec = RunSpec::default();
        spec.trainer.fg_passes = 4;
        let e = spec.clone().resolved().unwrap_err().to_string();
        assert!(
            e.contains("fg_passes = 4") && e.contains("forward-activity"),
            "{e}"
        );
        spec.trainer.method.estimator = sgr_core::method::Estimator::ForwardActivity;
        spec.trainer.fg_passes = 0;
        let e = spec.clone().resolved().unwrap_err().to_string();
        assert!(e.contains("--fg-passes must be in 1..=1024"), "{e}");
    }

    #[test]
    fn defaults_resolve_and_round_trip() {
        let s = RunSpec::default().resolved().unwrap();
        assert_eq!(s.modules, Some(4));
        let json = serde_json::to_string(&s).unwrap();
        let back: RunSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.hash().unwrap(), s.hash().unwrap());
        let mut other = s.clone();
        other.trainer.lr = 0.1;
        assert_ne!(other.hash().unwrap(), s.hash().unwrap());
        // A partial file keeps the defaults, and bp defaults to one module.
        let p: RunSpec =
            toml::from_str("model = \"resnet8\"\n[trainer]\nmethod = \"bp\"\n").unwrap();
        assert_eq!(p.num_modules(), 1);
        assert_eq!(p.trainer.lr, 0.05);
        assert!(toml::from_str::<RunSpec>("modle = 1").is_err());
    }
}
