//! What a trained model needs besides its weights to see images as it saw them in training:
//! the normalisation statistics of its training split, the image shape and the class names.
//! They are stored in `model.safetensors`'s metadata, as timm's pretrained configurations
//! store theirs, so that a model evaluates on a test split alone (docs/library.md,
//! "Models carry their preprocessing").

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::Data;
use crate::{Error, Result};

/// The `__metadata__` key of a model file that holds its [`Preprocess`] as JSON.
pub const METADATA_KEY: &str = "sgr.preprocess";

/// A model's preprocessing, as its training run applied it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Image channels the network sees.
    pub channels: usize,
    /// Image side the network sees.
    pub size: usize,
    /// Number of classes.
    pub classes: usize,
    /// Per-channel means the images are normalised with (exactly the training run's).
    pub mean: Vec<f32>,
    /// Per-channel standard deviations.
    pub std: Vec<f32>,
    /// Class names by label, for data sets whose classes are named by folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
}

impl Preprocess {
    /// The preprocessing of a run's data.
    pub fn of(data: &Data) -> Self {
        Self {
            channels: data.channels,
            size: data.size,
            classes: data.classes,
            mean: data.normalize.mean.clone(),
            std: data.normalize.std.clone(),
            class_names: data.class_names.clone(),
        }
    }

    /// The metadata entries of a model file.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let json = serde_json::to_string(self).expect("plain data serialises");
        BTreeMap::from([(METADATA_KEY.to_string(), json)])
    }

    /// The preprocessing stored in the model file at `path`; `None` for a model written
    /// before it was stored, or by another program. Values out of range are an error naming
    /// the file.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let meta = sgr_core::checkpoint::read_metadata(path)?;
        let Some(json) = meta.get(METADATA_KEY) else {
            return Ok(None);
        };
        let bad = |problem: String| Error::File {
            path: path.to_path_buf(),
            problem: format!("its stored preprocessing (`{METADATA_KEY}`) {problem}"),
        };
        let p: Self = serde_json::from_str(json).map_err(|e| bad(format!("is invalid: {e}")))?;
        let problem = if !(1..=1024).contains(&p.channels) {
            Some(format!("has {} channels (1..=1024)", p.channels))
        } else if !(1..=crate::spec::MAX_IMAGE_SIZE).contains(&p.size) {
            Some(format!("has an image side of {}", p.size))
        } else if !(2..=1 << 20).contains(&p.classes) {
            Some(format!("has {} classes (2..=1048576)", p.classes))
        } else if p.mean.len() != p.channels || p.std.len() != p.channels {
            Some("does not have one mean and one deviation per channel".into())
        } else if !p.mean.iter().all(|m| m.is_finite())
            || !p.std.iter().all(|s| s.is_finite() && *s > 0.0)
        {
            Some("has a mean that is not finite or a deviation that is not positive".into())
        } else if p.class_names.as_ref().is_some_and(|n| n.len() != p.classes) {
            Some("names a different number of classes than it has".into())
        } else {
            None
        };
        match problem {
            Some(what) => Err(bad(what)),
            None => Ok(Some(p)),
        }
    }

    /// Checks that `data` (read with this preprocessing) has the shape the model expects.
    pub fn check(&self, data: &Data, path: &Path) -> Result<()> {
        if (data.channels, data.size, data.classes) == (self.channels, self.size, self.classes) {
            return Ok(());
        }
        Err(Error::File {
            path: path.to_path_buf(),
            problem: format!(
                "the model was trained on {}x{}x{} images of {} classes, the data here gives \
                 {}x{}x{} of {}: evaluate it on the data set it was trained on",
                self.channels,
                self.size,
                self.size,
                self.classes,
                data.channels,
                data.size,
                data.size,
                data.classes
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    fn model_with(dir: &Path, metadata: &BTreeMap<String, String>) -> std::path::PathBuf {
        let path = dir.join("model.safetensors");
        let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let map = HashMap::from([("w".to_string(), t)]);
        sgr_core::checkpoint::save_tensors_with_metadata(&path, &map, metadata).unwrap();
        path
    }

    fn grey() -> Preprocess {
        Preprocess {
            channels: 1,
            size: 28,
            classes: 10,
            mean: vec![0.13],
            std: vec![0.31],
            class_names: None,
        }
    }

    #[test]
    fn stored_preprocessing_reads_back_exactly_and_is_absent_from_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = Preprocess {
            mean: vec![0.1 + f32::EPSILON, 1.0 / 3.0, 7e-8],
            std: vec![0.2, 0.25, 1e-3],
            channels: 3,
            class_names: Some((0..10).map(|i| format!("c{i}")).collect()),
            ..grey()
        };
        let path = model_with(dir.path(), &p.to_metadata());
        assert_eq!(Preprocess::read(&path).unwrap(), Some(p));
        let path = model_with(dir.path(), &BTreeMap::new());
        assert_eq!(Preprocess::read(&path).unwrap(), None);
    }

    #[test]
    fn stored_preprocessing_out_of_range_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                Preprocess {
                    std: vec![0.0],
                    ..grey()
                },
                "deviation",
            ),
            (
                Preprocess {
                    mean: vec![0.1, 0.2],
                    ..grey()
                },
                "per channel",
            ),
            (
                Preprocess {
                    classes: 1,
                    ..grey()
                },
                "classes",
            ),
            (Preprocess { size: 0, ..grey() }, "image side"),
            (
                Preprocess {
                    class_names: Some(vec!["a".into()]),
                    ..grey()
                },
                "number of classes",
            ),
        ];
        let mut stored: Vec<(String, &str)> = cases
            .iter()
            .map(|(p, want)| (serde_json::to_string(p).unwrap(), *want))
            .collect();
        // Beyond f32 (JSON has no NaN or infinity).
        stored.push((
            r#"{"channels":1,"size":28,"classes":10,"mean":[1e39],"std":[0.3]}"#.into(),
            "out of range",
        ));
        stored.push((r#"{"channels":1,"size":28}"#.into(), "invalid"));
        for (json, want) in stored {
            let meta = BTreeMap::from([(METADATA_KEY.to_string(), json)]);
            let path = model_with(dir.path(), &meta);
            let e = Preprocess::read(&path).unwrap_err().to_string();
            assert!(
                e.contains("model.safetensors") && e.contains(want),
                "{want}: {e}"
            );
        }
    }
}
