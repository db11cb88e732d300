//! What a run's checkpoint records about the run, so that a resume continues the same run: a
//! hash of its configuration and a fingerprint of its data, stored as checkpoint tags
//! (`sgr_core::checkpoint::save_tagged_checkpoint`) and compared when the run resumes.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::data::Data;
use crate::spec::{hash_json, RunSpec};
use crate::{Error, Result};

/// Tag of the configuration's hash, without the settings a resume may change.
const SPEC_TAG: &str = "sgr.spec_key";
/// Tag of the data's fingerprint.
const DATA_TAG: &str = "sgr.data";
/// Tag of the data's sizes, for the message when the fingerprint differs.
const SIZES_TAG: &str = "sgr.data_sizes";
/// Samples of each split the fingerprint reads (evenly spaced, first and last included).
const SAMPLES: usize = 32;

/// The tags of a run's checkpoints.
pub fn tags(spec: &RunSpec, data: &Data) -> Result<BTreeMap<String, String>> {
    Ok(BTreeMap::from([
        (SPEC_TAG.to_string(), spec_key(spec)?),
        (DATA_TAG.to_string(), fingerprint(data)?),
        (SIZES_TAG.to_string(), sizes(data)),
    ]))
}

/// The configuration's hash with what `--resume` may change (epochs, device) set aside.
fn spec_key(spec: &RunSpec) -> Result<String> {
    let mut s = spec.clone();
    s.trainer.epochs = 0;
    s.device = RunSpec::default().device;
    hash_json(&s)
}

fn sizes(data: &Data) -> String {
    format!(
        "{} training and {} {} images, {} classes",
        data.train.len(),
        data.test.len(),
        if data.validation {
            "validation"
        } else {
            "test"
        },
        data.classes
    )
}

/// SHA-256 over the sizes and classes of both splits and, for up to [`SAMPLES`] evenly spaced
/// samples of each, the label and the decoded pixels: a changed, added or removed file almost
/// always changes it, at the cost of decoding 64 images.
fn fingerprint(data: &Data) -> Result<String> {
    let mut h = Sha256::new();
    for split in [&data.train, &data.test] {
        let n = split.len();
        h.update((n as u64).to_le_bytes());
        h.update((split.num_classes() as u64).to_le_bytes());
        let picks = if n <= SAMPLES {
            (0..n).collect::<Vec<_>>()
        } else {
            (0..SAMPLES).map(|j| j * (n - 1) / (SAMPLES - 1)).collect()
        };
        for i in picks {
            h.update(split.label(i).to_le_bytes());
            let img = split.image(i)?;
            for v in &img.data {
                h.update(v.to_bits().to_le_bytes());
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares the tags a checkpoint recorded with the run as it is now. A checkpoint without tags
/// (written before they existed) is accepted. `allow_data_change` accepts other data.
pub fn check(
    recorded: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
    dir: &Path,
    allow_data_change: bool,
) -> Result<()> {
    let d = dir.display();
    let differs = |tag: &str| {
        recorded
            .get(tag)
            .is_some_and(|r| now.get(tag).is_some_and(|n| n != r))
    };
    if differs(SPEC_TAG) {
        return Err(Error::Spec(format!(
            "{d}/config.json differs from the configuration its checkpoint was trained with \
             (edited since?): the checkpoint's weights and optimizer state belong to that one. \
             Restore config.json, or start a new run from the edited one with \
             `sgr train --config {d}/config.json --out NEW_DIR` (or --overwrite to replace this run)"
        )));
    }
    if differs(DATA_TAG) && !allow_data_change {
        let then = recorded.get(SIZES_TAG).map_or("?", String::as_str);
        let now = now.get(SIZES_TAG).map_or("?", String::as_str);
        return Err(Error::Spec(format!(
            "the data this run reads now differs from the data it was trained on (then: {then}; \
             now: {now}; sampled images or labels differ). Point --data-dir back at the original \
             data, start a new run (--out NEW_DIR), or continue on the new data on purpose with \
             `sgr train --resume {d} --allow-data-change`"
        )));
    }
    Ok(())
}
