//! Data sets of a run: the readers of `sgr-data` with each data set's standard transforms.

use std::path::PathBuf;
use std::sync::Arc;

use sgr_core::objective::PixelStats;
use sgr_data::{
    CifarKind, ImageDataset, ImageFolder, Normalize, Pipeline, Source, Subset, Transform,
};

use crate::preprocess::Preprocess;
use crate::spec::{Dataset, RunSpec};
use crate::{Error, Result};

/// Training and test data with their transform pipelines.
pub struct Data {
    /// Training samples.
    pub train: Arc<dyn Source>,
    /// Test samples.
    pub test: Arc<dyn Source>,
    /// Training transforms (augmentation, normalisation).
    pub train_pipeline: Pipeline,
    /// Evaluation transforms.
    pub test_pipeline: Pipeline,
    /// Image channels the network sees.
    pub channels: usize,
    /// Number of classes.
    pub classes: usize,
    /// Image side the network sees (square images).
    pub size: usize,
    /// The per-channel statistics the images are normalised with (InfoPro's reconstruction
    /// target undoes them).
    pub pixels: PixelStats,
    /// The normalisation itself, as the pipelines apply it.
    pub normalize: Normalize,
    /// Class names by label, for data sets whose classes are named by folders.
    pub class_names: Option<Vec<String>>,
    /// Whether `test` holds validation images taken out of the training set
    /// (`RunSpec::validation`) rather than the test split.
    pub validation: bool,
}

impl Data {
    /// The shape the network sees.
    pub fn input(&self) -> sgr_models::Input {
        sgr_models::Input {
            channels: self.channels,
            classes: self.classes,
            size: self.size,
        }
    }
}

/// Reads the specification's data set with its transform pipelines.
pub fn load_data(cfg: &RunSpec) -> Result<Data> {
    load(cfg, None)
}

/// Reads only the test split of the specification's data set, preprocessed as a trained model
/// stored it (its training split is not needed): `train` is empty. The test split's own
/// classes must be among the model's.
pub fn load_test_data(cfg: &RunSpec, stored: &Preprocess) -> Result<Data> {
    load(cfg, Some(stored))
}

fn load(cfg: &RunSpec, stored: Option<&Preprocess>) -> Result<Data> {
    let dir = || -> Result<PathBuf> {
        match (&cfg.data_dir, cfg.dataset) {
            (Some(d), _) => Ok(d.clone()),
            (None, Dataset::FashionMnist) => Ok(PathBuf::from("/usr/share/datasets/fashion-mnist")),
            (None, d) => Err(Error::Spec(format!("--dataset {d} needs --data-dir"))),
        }
    };
    let aug = cfg.augment;
    // In-memory data sets: normalised with the training split's channel statistics.
    // The training split is read only when no stored preprocessing replaces its statistics.
    let train_split = |read: &dyn Fn() -> sgr_data::Result<ImageDataset>| -> Result<_> {
        Ok(match stored {
            Some(_) => None,
            None => Some(read()?),
        })
    };
    let in_memory = |train: Option<ImageDataset>,
                     test: ImageDataset,
                     mut train_steps: Vec<Transform>,
                     pre: Vec<Transform>|
     -> Data {
        let to_rgb = pre.contains(&Transform::GreyToRgb);
        let size = pre
            .iter()
            .find_map(|t| match t {
                Transform::PadTo { size } => Some(*size),
                _ => None,
            })
            .unwrap_or(test.height);
        let channels = if to_rgb { 3 } else { test.channels };
        let (norm, classes) = match (&train, stored) {
            (Some(train), _) => {
                let norm = Normalize::from_dataset(train);
                let norm = if to_rgb { norm.repeated(3) } else { norm };
                (norm, train.num_classes)
            }
            (None, Some(p)) => (
                Normalize {
                    mean: p.mean.clone(),
                    std: p.std.clone(),
                },
                p.classes,
            ),
            (None, None) => unreachable!("the training split is read without stored statistics"),
        };
        let test: Arc<dyn Source> = Arc::new(test);
        let train: Arc<dyn Source> = match train {
            Some(t) => Arc::new(t),
            None => Arc::new(Subset::first(Arc::clone(&test), 0)),
        };
        let mut tr = pre.clone();
        if aug {
            tr.append(&mut train_steps);
        }
        tr.push(norm.transform());
        let mut te = pre;
        te.push(norm.transform());
        Data {
            classes,
            channels,
            size,
            pixels: pixel_stats(&norm),
            normalize: norm,
            class_names: None,
            validation: false,
            train,
            test,
            train_pipeline: Pipeline::new(tr),
            test_pipeline: Pipeline::new(te),
        }
    };
    let crop_flip = |size: usize, pad: usize, flip: bool| {
        let mut v = vec![Transform::RandomCrop { size, padding: pad }];
        if flip {
            v.push(Transform::HorizontalFlip { p: 0.5 });
        }
        v
    };
    // MNIST and Fashion-MNIST go to the CIFAR stems of the ResNets and ViTs padded to 32×32
    // RGB; LocalMixer takes them as they are (28×28 grey, as Ren et al.).
    let native = matches!(
        sgr_models::zoo::family(&cfg.model),
        Ok(sgr_models::zoo::Family::LocalMixer)
    );
    let mnist_pre = if native {
        vec![]
    } else {
        vec![Transform::PadTo { size: 32 }, Transform::GreyToRgb]
    };
    let mnist_aug = if native {
        vec![Transform::RandomCrop {
            size: 28,
            padding: 2,
        }]
    } else {
        crop_flip(32, 2, cfg.dataset == Dataset::FashionMnist)
    };
    let mut data = match cfg.dataset {
        Dataset::Digits => in_memory(
            train_split(&|| sgr_data::digits(true))?,
            sgr_data::digits(false)?,
            vec![],
            vec![],
        ),
        Dataset::Cifar10 | Dataset::Cifar100 => {
            let kind = if cfg.dataset == Dataset::Cifar10 {
                CifarKind::Cifar10
            } else {
                CifarKind::Cifar100Fine
            };
            let d = dir()?;
            // With the `download` feature, fetch the official archive (MD5-checked) when the
            // files are not there yet.
            #[cfg(feature = "download")]
            if stored.is_none() && sgr_data::load_cifar(&d, kind, false).is_err() {
                tracing::warn!("{kind:?} not found in {}: downloading it", d.display());
                sgr_data::download::download_cifar(kind, &d)?;
            }
            in_memory(
                train_split(&|| sgr_data::load_cifar(&d, kind, true))?,
                sgr_data::load_cifar(&d, kind, false)?,
                crop_flip(32, 4, true),
                vec![],
            )
        }
        Dataset::Mnist | Dataset::FashionMnist => {
            let d = dir()?;
            let name = cfg.dataset.name();
            in_memory(
                train_split(&|| sgr_data::load_mnist_dir(&d, true, name))?,
                sgr_data::load_mnist_dir(&d, false, name)?,
                mnist_aug,
                mnist_pre,
            )
        }
        Dataset::Svhn => {
            let d = dir()?;
            in_memory(
                train_split(&|| sgr_data::load_svhn_dir(&d, true))?,
                sgr_data::load_svhn_dir(&d, false)?,
                crop_flip(32, 2, false),
                vec![],
            )
        }
        Dataset::Stl10 => {
            let d = dir()?;
            in_memory(
                train_split(&|| sgr_data::load_stl10_dir(&d, true))?,
                sgr_data::load_stl10_dir(&d, false)?,
                crop_flip(96, 12, true),
                vec![],
            )
        }
        Dataset::Imagefolder => {
            let d = dir()?;
            let ci = cfg.class_index.as_deref();
            let (train, test): (Arc<dyn Source>, ImageFolder) = match stored {
                None => {
                    let train = ImageFolder::open(&d.join("train"), ci)?;
                    let test = ImageFolder::open(&d.join("val"), ci)?;
                    if train.classes() != test.classes() {
                        return Err(Error::Spec(format!(
                            "{}: the val classes differ from the train classes; pass \
                             --class-index",
                            d.display()
                        )));
                    }
                    (Arc::new(train), test)
                }
                Some(p) => {
                    let names = p.class_names.as_deref().ok_or_else(|| {
                        Error::Spec(
                            "the model's stored preprocessing has no class names, which an \
                             image folder needs"
                                .into(),
                        )
                    })?;
                    let test = ImageFolder::open_with_classes(&d.join("val"), names)?;
                    (Arc::new(Subset::first(Arc::new(test.clone()), 0)), test)
                }
            };
            // The test split is first read after a whole epoch: a bad file there is found
            // now. (Training images are read from the first step; one that fails mid-epoch
            // stops the run with a checkpoint.)
            test.check_files(sgr_data::default_workers().max(1))?;
            let class_names = Some(test.classes().to_vec());
            let norm = match stored {
                Some(p) => Normalize {
                    mean: p.mean.clone(),
                    std: p.std.clone(),
                },
                None => Normalize::imagenet(),
            };
            let size = cfg.image_size;
            let mut tr = if aug {
                vec![
                    Transform::RandomResizedCrop {
                        size,
                        scale: (0.08, 1.0),
                        ratio: (0.75, 4.0 / 3.0),
                    },
                    Transform::HorizontalFlip { p: 0.5 },
                ]
            } else {
                vec![
                    Transform::Resize {
                        size: size * 256 / 224,
                    },
                    Transform::CenterCrop { size },
                ]
            };
            tr.push(norm.transform());
            Data {
                classes: test.num_classes(),
                channels: 3,
                size,
                pixels: pixel_stats(&norm),
                normalize: norm.clone(),
                class_names,
                validation: false,
                train,
                test: Arc::new(test),
                train_pipeline: Pipeline::new(tr),
                test_pipeline: Pipeline::new(vec![
                    Transform::Resize {
                        size: size * 256 / 224,
                    },
                    Transform::CenterCrop { size },
                    norm.transform(),
                ]),
            }
        }
    };
    if let Some(p) = stored {
        if data.test.num_classes() > p.classes {
            return Err(Error::Spec(format!(
                "the test split has {} classes, the model was trained on {}: evaluate it on the \
                 data set it was trained on",
                data.test.num_classes(),
                p.classes
            )));
        }
    }
    // DeiT-style extras: RandAugment before normalisation, Random Erasing after it.
    if let Some((n, m)) = cfg.randaugment {
        let at = data.train_pipeline.steps.len().saturating_sub(1);
        data.train_pipeline.steps.insert(
            at,
            Transform::RandAugment {
                ops: n,
                magnitude: m,
            },
        );
    }
    if let Some(p) = cfg.random_erasing {
        data.train_pipeline
            .steps
            .push(Transform::RandomErasing { p });
    }
    if let Some(n) = cfg.validation {
        let len = data.train.len();
        if n >= len {
            return Err(Error::Spec(format!(
                "--validation {n}: the training set has only {len} images; hold out fewer"
            )));
        }
        data.test = Arc::new(Subset::range(data.train.clone(), len - n..len));
        data.train = Arc::new(Subset::range(data.train, 0..len - n));
        data.validation = true;
    }
    if let Some(n) = cfg.train_limit {
        data.train = Arc::new(Subset::first(data.train, n));
    }
    Ok(data)
}

fn pixel_stats(n: &Normalize) -> PixelStats {
    PixelStats {
        mean: n.mean.iter().map(|&v| v as f64).collect(),
        std: n.std.iter().map(|&v| v as f64).collect(),
    }
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Data")
            .field("train", &self.train.len())
            .field("test", &self.test.len())
            .field("channels", &self.channels)
            .field("classes", &self.classes)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}
