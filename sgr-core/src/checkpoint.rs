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
    for p in params {
        let t = &map[&p.name];
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    Ok(())
}
