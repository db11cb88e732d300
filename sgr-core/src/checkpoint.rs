//! Saving and loading named tensors as safetensors, atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::nn::Param;
use crate::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Saves named tensors to a safetensors file atomically (temporary file, then rename).
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tensors".into());
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = candle_core::safetensors::save(tensors, &tmp)
        .map_err(Error::from)
        .and_then(|_| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(io)
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Loads every tensor of a safetensors file, naming the file in any error.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        problem: format!("not a readable safetensors file ({e})"),
    })
}

/// Saves model parameters (and buffers) under their names.
pub fn save_params(path: &Path, params: &[Param]) -> Result<()> {
    let map: HashMap<String, Tensor> = params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    save_tensors(path, &map)
}

/// Loads parameters saved by [`save_params`] into `params`. Every parameter must be present with
/// its shape; extra tensors in the file are an error (another model). Nothing is modified
/// unless the whole file matches.
pub fn load_params(path: &Path, params: &[Param]) -> Result<()> {
    let device = params
        .first()
        .map(|p| p.var.device().clone())
        .unwrap_or(Device::Cpu);
    let map = load_tensors(path, &device)?;
    check_model_tensors(path, params, &map)?;
    for p in params {
        let t = &map[&p.name];
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    Ok(())
}

/// Prefix of model tensors in a training checkpoint.
const MODEL: &str = "model/";
/// Prefix of optimizer state in a training checkpoint (`optim/<module>/<key>`).
const OPTIM: &str = "optim/";
/// The trainer state as UTF-8 JSON bytes.
const STATE: &str = "trainer_state_json";

/// Writes a whole training checkpoint — weights and buffers, every module's optimizer state,
/// and the trainer's position and partial epoch metrics — as ONE safetensors file, written
/// atomically, so a checkpoint on disk is always complete and self-consistent.
pub fn save_training_checkpoint(path: &Path, trainer: &crate::trainer::Trainer) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for p in trainer.network().params() {
        map.insert(format!("{MODEL}{}", p.name), p.var.as_tensor().clone());
    }
    for (k, opt) in trainer.optimizers().iter().enumerate() {
        for (key, t) in opt.state()? {
            map.insert(format!("{OPTIM}{k}/{key}"), t);
        }
    }
    let json = serde_json::to_vec(&trainer.state()?).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        problem: format!("cannot serialise the trainer state: {e}"),
    })?;
    let n = json.len();
    map.insert(STATE.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
    save_tensors(path, &map)
}

/// Restores a checkpoint written by [`save_training_checkpoint`] into `trainer` (built with the
/// same configuration). Checks everything before changing anything: a missing tensor, a wrong
/// shape, a tensor of another model or a corrupt file is an error naming the file and the
/// tensor, and leaves the trainer untouched.
pub fn load_training_checkpoint(path: &Path, trainer: &mut crate::trainer::Trainer) -> Result<()> {
    let device = trainer
        .network()
        .params()
        .first()
        .map(|p| p.var.device().clone())
        .unwrap_or(Device::Cpu);
    let map = load_tensors(path, &device)?;
    let bad = |problem: String| Error::Checkpoint {
        path: path.to_path_buf(),
        problem,
    };
    let state_bytes = map
        .get(STATE)
        .ok_or_else(|| bad("not a training checkpoint: no trainer state".into()))?
        .to_vec1::<u8>()?;
    let state: crate::trainer::TrainerState = serde_json::from_slice(&state_bytes)
        .map_err(|e| bad(format!("corrupt trainer state: {e}")))?;
    let params = trainer.network().params();
    let mut model = HashMap::new();
    let mut optim: Vec<HashMap<String, Tensor>> = vec![HashMap::new(); trainer.optimizers().len()];
    for (key, t) in &map {
        if let Some(name) = key.strip_prefix(MODEL) {
            model.insert(name.to_string(), t.clone());
        } else if let Some(rest) = key.strip_prefix(OPTIM) {
            let (k, name) = rest
                .split_once('/')
                .ok_or_else(|| bad(format!("malformed optimizer tensor name `{key}`")))?;
            let k: usize = k.parse().ok().filter(|&k| k < optim.len()).ok_or_else(|| {
                bad(format!(
                    "optimizer tensor `{key}` is for a module this network does not have"
                ))
            })?;
            optim[k].insert(name.to_string(), t.clone());
        } else if key != STATE {
            return Err(bad(format!("unexpected tensor `{key}`")));
        }
    }
    check_model_tensors(path, &params, &model)?;
    // Validate optimizer state on throw-away copies before touching the real ones.
    for (k, st) in optim.iter().enumerate() {
        for (name, t) in st {
            let param = name
                .rsplit_once('.')
                .map(|(p, _)| p)
                .unwrap_or(name.as_str());
            if name == "step" {
                continue;
            }
            let p = trainer.optimizers()[k]
                .params()
                .iter()
                .find(|p| p.name == param)
                .ok_or_else(|| {
                    bad(format!(
                        "optimizer state `{name}` of module {k} names no parameter of that module"
                    ))
                })?;
            if p.var.dims() != t.dims() {
                return Err(bad(format!(
                    "optimizer state `{name}` has shape {:?}, the parameter has {:?}",
                    t.dims(),
                    p.var.dims()
                )));
            }
        }
    }
    trainer
        .check_state(&state)
        .map_err(|e| bad(e.to_string()))?;
    for p in &params {
        p.var.set(&model[&p.name].to_dtype(p.var.dtype())?)?;
    }
    for (opt, st) in trainer.optimizers_mut().iter_mut().zip(&optim) {
        opt.load_state(st)?;
    }
    trainer.load_state(state)
}

fn check_model_tensors(path: &Path, params: &[Param], map: &HashMap<String, Tensor>) -> Result<()> {
    let bad = |problem: String| Error::Checkpoint {
        path: path.to_path_buf(),
        problem,
    };
    for p in params {
        let t = map
            .get(&p.name)
            .ok_or_else(|| bad(format!("tensor `{}` is missing", p.name)))?;
        if t.dims() != p.var.dims() {
            return Err(bad(format!(
                "tensor `{}` has shape {:?}, the model expects {:?}",
                p.name,
                t.dims(),
                p.var.dims()
            )));
        }
    }
    let known: std::collections::HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let mut extra: Vec<&String> = map.keys().filter(|k| !known.contains(k.as_str())).collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(bad(format!(
            "tensor `{}` does not belong to this model ({} unexpected tensors)",
            extra[0],
            extra.len()
        )));
    }
    Ok(())
}
