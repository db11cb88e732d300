//! Saving and loading named tensors as safetensors, atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor as st;

use crate::nn::Param;
use crate::trainer::ownership::Snapshot;
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

/// The key, in a safetensors file's `__metadata__`, of the SHA-256 checksum of its tensors.
///
/// The checksum is the lowercase hex SHA-256 over every tensor in name order (byte-wise), each
/// fed as: the name's length (u64, little-endian) and its UTF-8 bytes; the dtype's safetensors
/// spelling (`F32`, `BF16`, `U8`, ...) the same way; the rank (u64 LE) and every dimension
/// (u64 LE); the data's length in bytes (u64 LE) and the data as stored in the file.
pub const CHECKSUM_KEY: &str = "sgr.sha256";

/// Checks that no floating-point tensor among `params` (weights and buffers such as BatchNorm
/// running statistics) holds NaN or infinity; [`Error::NonFinite`] names the first that does.
///
/// One reduction per tensor, run as a tensor op on the tensor's own device, and one read back
/// per device; integer tensors are skipped. Meant to be called after each epoch, so that a
/// diverged run stops before it writes anything.
pub fn check_finite(params: &[Param]) -> Result<()> {
    match first_non_finite(params.iter().map(|p| (p.name.as_str(), p.var.as_tensor())))? {
        Some(tensor) => Err(Error::NonFinite { tensor, path: None }),
        None => Ok(()),
    }
}

/// Whether NaN/inf checks apply to `dtype` (the floating-point types candle computes with).
fn is_checked_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// A tensor's name, the tensor, and its sum (one element, f32).
type Summed<'a> = (&'a str, &'a Tensor, Tensor);

/// The name of the first tensor (in the order given) that holds NaN or infinity.
pub(crate) fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<Option<String>> {
    // One sum per tensor (NaN and inf propagate into it), gathered per device so that a
    // device is read back once rather than once per tensor.
    let mut groups: Vec<(Device, Vec<Summed<'a>>)> = Vec::new();
    for (name, t) in tensors {
        if !is_checked_float(t.dtype()) || t.elem_count() == 0 {
            continue;
        }
        let sum = t.detach().sum_all()?.to_dtype(DType::F32)?.reshape(1)?;
        match groups.iter_mut().find(|(d, _)| d.same_device(t.device())) {
            Some((_, g)) => g.push((name, t, sum)),
            None => groups.push((t.device().clone(), vec![(name, t, sum)])),
        }
    }
    for (_, group) in groups {
        let sums: Vec<Tensor> = group.iter().map(|(_, _, s)| s.clone()).collect();
        let sums = Tensor::cat(&sums, 0)?.to_vec1::<f32>()?;
        for ((name, t, _), sum) in group.iter().zip(sums) {
            // A non-finite sum is NaN/inf in the tensor, or finite values whose sum
            // overflowed: x·0 is 0 for every finite x and NaN otherwise, and cannot overflow.
            if !sum.is_finite()
                && !t
                    .detach()
                    .affine(0.0, 0.0)?
                    .sum_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    .is_finite()
            {
                return Ok(Some(name.to_string()));
            }
        }
    }
    Ok(None)
}

/// A tensor's bytes as a safetensors file stores them.
struct RawTensor {
    dtype: st::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl st::View for &RawTensor {
    fn dtype(&self) -> st::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Copies `t` (from any device) into the little-endian bytes safetensors stores.
fn raw_tensor(path: &Path, name: &str, t: &Tensor) -> Result<RawTensor> {
    use candle_core::{CpuStorage, Storage};
    let unsupported = || Error::Checkpoint {
        path: path.to_path_buf(),
        problem: format!(
            "cannot save tensor `{name}`: dtype {:?} is not supported",
            t.dtype()
        ),
    };
    let dtype = match t.dtype() {
        DType::U8 => st::Dtype::U8,
        DType::U32 => st::Dtype::U32,
        DType::I16 => st::Dtype::I16,
        DType::I32 => st::Dtype::I32,
        DType::I64 => st::Dtype::I64,
        DType::BF16 => st::Dtype::BF16,
        DType::F16 => st::Dtype::F16,
        DType::F32 => st::Dtype::F32,
        DType::F64 => st::Dtype::F64,
        _ => return Err(unsupported()),
    };
    let cpu = t
        .detach()
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .contiguous()?;
    let (storage, layout) = cpu.storage_and_layout();
    let (Storage::Cpu(storage), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(unsupported());
    };
    macro_rules! le {
        ($v:expr) => {
            $v[a..b].iter().flat_map(|x| x.to_le_bytes()).collect()
        };
    }
    let data: Vec<u8> = match storage {
        CpuStorage::U8(v) => v[a..b].to_vec(),
        CpuStorage::U32(v) => le!(v),
        CpuStorage::I16(v) => le!(v),
        CpuStorage::I32(v) => le!(v),
        CpuStorage::I64(v) => le!(v),
        CpuStorage::BF16(v) => le!(v),
        CpuStorage::F16(v) => le!(v),
        CpuStorage::F32(v) => le!(v),
        CpuStorage::F64(v) => le!(v),
        _ => return Err(unsupported()),
    };
    Ok(RawTensor {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// The [`CHECKSUM_KEY`] checksum of named tensors, sorted by name.
fn checksum<'a>(
    tensors: impl IntoIterator<Item = (&'a str, st::Dtype, &'a [usize], &'a [u8])>,
) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for (name, dtype, shape, data) in tensors {
        field(name.as_bytes());
        field(dtype.to_string().as_bytes());
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        field(&dims);
        field(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Saves named tensors to a safetensors file atomically (temporary file, fsync, rename), with
/// the [`CHECKSUM_KEY`] checksum of their data in the file's metadata.
///
/// Refuses, with [`Error::NonFinite`] naming the tensor and the file, to write a floating-point
/// tensor holding NaN or infinity; nothing is written then, and a file already at `path` stays
/// as it was.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    save_tensors_with_metadata(path, tensors, &BTreeMap::new())
}

/// [`save_tensors`] with `metadata` entries beside the checksum in the file's `__metadata__`
/// (read back by [`read_metadata`]); [`CHECKSUM_KEY`] is reserved.
pub fn save_tensors_with_metadata(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    if metadata.contains_key(CHECKSUM_KEY) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            problem: format!("the metadata key `{CHECKSUM_KEY}` is reserved for the checksum"),
        });
    }
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    if let Some(tensor) = first_non_finite(named.iter().map(|(n, t)| (n.as_str(), *t)))? {
        return Err(Error::NonFinite {
            tensor,
            path: Some(path.to_path_buf()),
        });
    }
    let raw: Vec<(&String, RawTensor)> = named
        .iter()
        .map(|(n, t)| Ok((*n, raw_tensor(path, n, t)?)))
        .collect::<Result<_>>()?;
    let sum = checksum(
        raw.iter()
            .map(|(n, r)| (n.as_str(), r.dtype, r.shape.as_slice(), r.data.as_slice())),
    );
    let mut metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    metadata.insert(CHECKSUM_KEY.to_string(), sum);

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
    let result = st::serialize_to_file(raw.iter().map(|(n, r)| (*n, r)), Some(metadata), &tmp)
        .map_err(|e| match e {
            st::SafeTensorError::IoError(source) => io(source),
            e => Error::Checkpoint {
                path: path.to_path_buf(),
                problem: format!("cannot serialise the tensors: {e}"),
            },
        })
        .and_then(|_| {
            canonical_header(&tmp)
                .and_then(|f| f.sync_all())
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(io)
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Rewrites the JSON header of the safetensors file at `path` with its keys in sorted order,
/// so that equal tensors and metadata give equal files (safetensors writes the metadata map
/// in a random order). The header keeps its length, so the data offsets stay valid; only the
/// header is read and written. Returns the file, open for writing.
fn canonical_header(path: &Path) -> std::io::Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom, Write};
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Ok(f);
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return Ok(f);
    };
    let mut sorted = String::with_capacity(header.len());
    write(&value, &mut sorted);
    if sorted.len() <= header.len() {
        let mut out = sorted.into_bytes();
        out.resize(header.len(), b' ');
        f.seek(SeekFrom::Start(8))?;
        f.write_all(&out)?;
    }
    Ok(f)
}

/// When the file's metadata holds a [`CHECKSUM_KEY`] checksum, recomputes it over the tensor
/// data and fails with [`Error::Corrupt`] on a mismatch. Files without one (PyTorch exports,
/// older files) and files this parser cannot read are left to the loader.
fn verify_checksum(path: &Path, bytes: &[u8]) -> Result<()> {
    let Ok((_, header)) = st::SafeTensors::read_metadata(bytes) else {
        return Ok(());
    };
    let Some(stored) = header.metadata().as_ref().and_then(|m| m.get(CHECKSUM_KEY)) else {
        return Ok(());
    };
    let Ok(file) = st::SafeTensors::deserialize(bytes) else {
        return Ok(());
    };
    let mut views = file.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let found = checksum(
        views
            .iter()
            .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
    );
    if found == *stored {
        return Ok(());
    }
    let advice = if views.iter().any(|(n, _)| n == STATE) {
        "resume from an earlier copy of the checkpoint, or start the run anew"
    } else {
        "copy or download it again, or retrain"
    };
    Err(Error::Corrupt {
        path: path.to_path_buf(),
        detail: format!(
            "its tensor data does not match the checksum recorded when it was written \
             (`{CHECKSUM_KEY}`); {advice}"
        ),
    })
}

/// Loads every tensor of a safetensors file, naming the file in any error. When the file
/// records a [`CHECKSUM_KEY`] checksum it is verified first: a mismatch is
/// [`Error::Corrupt`]. Every floating-point tensor must be finite, with or without a checksum
/// (PyTorch's exports have none): [`Error::NonFiniteInFile`] names the first, by name order.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = sgr_schema::file::read_regular(path, sgr_schema::file::limits::TENSORS).map_err(
        |source| Error::Io {
            path: path.to_path_buf(),
            source,
        },
    )?;
    verify_checksum(path, &bytes)?;
    let map =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            problem: format!("not a readable safetensors file ({e})"),
        })?;
    let mut named: Vec<(&str, &Tensor)> = map.iter().map(|(n, t)| (n.as_str(), t)).collect();
    named.sort_by_key(|(n, _)| *n);
    if let Some(tensor) = first_non_finite(named)? {
        return Err(Error::NonFiniteInFile {
            tensor,
            path: path.to_path_buf(),
        });
    }
    Ok(map)
}

/// Saves model parameters (and buffers) under their names, with the [`CHECKSUM_KEY`] checksum
/// in the file's metadata. Refuses to write NaN or infinity: [`Error::NonFinite`] names the
/// tensor and the file, and a file already at `path` stays as it was.
pub fn save_params(path: &Path, params: &[Param]) -> Result<()> {
    save_params_with_metadata(path, params, &BTreeMap::new())
}

/// [`save_params`] with `metadata` entries in the file's `__metadata__`: what a model needs
/// besides its weights, such as its preprocessing (read back by [`read_metadata`]).
pub fn save_params_with_metadata(
    path: &Path,
    params: &[Param],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let map: HashMap<String, Tensor> = params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    save_tensors_with_metadata(path, &map, metadata)
}

/// Largest safetensors header [`read_metadata`] reads.
const MAX_HEADER: u64 = 100 << 20;

/// The `__metadata__` entries of a safetensors file, reading only its header (empty when it
/// has none). The file must be a regular file; a header that is not a JSON object of bounded
/// size is [`Error::Checkpoint`] naming the file.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let bad = |problem: String| Error::Checkpoint {
        path: path.to_path_buf(),
        problem,
    };
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f =
        sgr_schema::file::open_regular(path, sgr_schema::file::limits::TENSORS).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("not a safetensors file: shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(bad(format!(
            "not a safetensors file: its header claims {n} bytes (at most {MAX_HEADER})"
        )));
    }
    let mut header = Vec::with_capacity(n as usize);
    f.take(n).read_to_end(&mut header).map_err(io)?;
    if header.len() as u64 != n {
        return Err(bad("truncated: the file ends inside its header".into()));
    }
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| {
        bad(format!(
            "not a safetensors file: its header is not JSON ({e})"
        ))
    })?;
    let Some(meta) = json.get("__metadata__") else {
        return Ok(BTreeMap::new());
    };
    serde_json::from_value(meta.clone())
        .map_err(|e| bad(format!("its __metadata__ is not a map of strings ({e})")))
}

/// Loads parameters saved by [`save_params`] (or any safetensors file with the same names)
/// into `params`; a recorded checksum that does not match is [`Error::Corrupt`]. Every parameter must be present with
/// its shape; extra tensors in the file are an error (another model). Nothing is modified
/// unless the whole file matches.
pub fn load_params(path: &Path, params: &[Param]) -> Result<()> {
    let device = params
        .first()
        .map(|p| p.var.device().clone())
        .unwrap_or(Device::Cpu);
    let map = load_tensors(path, &device)?;
    if map.contains_key(STATE) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            problem: "this is a training checkpoint (weights with optimizer state and the \
                      position), not a model: give the run directory or its \
                      model.safetensors, or continue the run with `sgr train --resume DIR`"
                .into(),
        });
    }
    check_model_tensors(path, params, &map)?;
    for p in params {
        let t = map[&p.name].reshape(p.var.dims())?;
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
/// A checkpoint's tags: what the program that trains records about the run (the run's
/// configuration and data), checked when it resumes.
const TAGS: &str = "checkpoint_tags_json";

/// Writes a whole training checkpoint — weights and buffers, every module's optimizer state,
/// and the trainer's position and partial epoch metrics — as ONE safetensors file, written
/// atomically, so a checkpoint on disk is always complete and self-consistent, with the
/// [`CHECKSUM_KEY`] checksum of its tensors in its metadata.
///
/// Refuses to write NaN or infinity anywhere (weights, buffers, optimizer state):
/// [`Error::NonFinite`] names the tensor (a model tensor by its own name, optimizer state as
/// `optim/<module>/<key>`) and the file, and a checkpoint already at `path` stays as it was.
pub fn save_training_checkpoint(path: &Path, trainer: &crate::trainer::Trainer) -> Result<()> {
    save_tagged_checkpoint(path, trainer, &BTreeMap::new())
}

/// [`save_training_checkpoint`] with `tags`, strings about the run that the checksum covers
/// with the tensors and [`checkpoint_tags`] reads back: what a resume checks against (the run
/// program's configuration hash, a fingerprint of its data). Empty tags write no tensor.
pub fn save_tagged_checkpoint(
    path: &Path,
    trainer: &crate::trainer::Trainer,
    tags: &BTreeMap<String, String>,
) -> Result<()> {
    save_snapshot(path, &trainer.snapshot()?, tags)
}

/// [`save_tagged_checkpoint`] of a [`Snapshot`]: the whole training state as it is gathered
/// on rank 0 of a distributed run ([`crate::trainer::Trainer::gather`]), where no rank holds
/// every module. The file is the one the trainer that held it all would write, byte for byte.
pub fn save_snapshot(
    path: &Path,
    snapshot: &Snapshot,
    tags: &BTreeMap<String, String>,
) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for p in &snapshot.params {
        map.insert(format!("{MODEL}{}", p.name), p.var.as_tensor().clone());
    }
    for (k, state) in snapshot.optimizer_states.iter().enumerate() {
        for (key, t) in state {
            map.insert(format!("{OPTIM}{k}/{key}"), t.clone());
        }
    }
    let json = serde_json::to_vec(&snapshot.state).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        problem: format!("cannot serialise the trainer state: {e}"),
    })?;
    let n = json.len();
    map.insert(STATE.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
    if !tags.is_empty() {
        let json = serde_json::to_vec(tags).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            problem: format!("cannot serialise the checkpoint's tags: {e}"),
        })?;
        let n = json.len();
        map.insert(TAGS.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
    }
    save_tensors(path, &map).map_err(|e| match e {
        // Name a model tensor as the model does (`layer1.0.bn1.running_var`).
        Error::NonFinite { tensor, path } => Error::NonFinite {
            tensor: tensor
                .strip_prefix(MODEL)
                .map(str::to_string)
                .unwrap_or(tensor),
            path,
        },
        e => e,
    })
}

/// The tags a checkpoint was saved with ([`save_tagged_checkpoint`]); empty for a checkpoint
/// saved without. The file's checksum is verified first.
pub fn checkpoint_tags(path: &Path) -> Result<BTreeMap<String, String>> {
    let map = load_tensors(path, &Device::Cpu)?;
    let Some(t) = map.get(TAGS) else {
        return Ok(BTreeMap::new());
    };
    serde_json::from_slice(&t.to_vec1::<u8>()?).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        problem: format!("corrupt checkpoint tags: {e}"),
    })
}

/// Restores a checkpoint written by [`save_training_checkpoint`] into `trainer` (built with the
/// same configuration). Checks everything before changing anything: a missing tensor, a wrong
/// shape, a tensor of another model or a corrupt file is an error naming the file and the
/// tensor, and leaves the trainer untouched. A recorded checksum that does not match is
/// [`Error::Corrupt`], advising to resume from an earlier copy or start anew.
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
        } else if key != STATE && key != TAGS {
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

/// A one-element tensor stored as a scalar where the model holds `[1]` (or the reverse):
/// PyTorch writes BatchNorm's `num_batches_tracked` with shape `[]`.
fn scalar_counter(file: &[usize], model: &[usize]) -> bool {
    matches!((file, model), ([], [1]) | ([1], []))
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
        if t.dims() != p.var.dims() && !scalar_counter(t.dims(), p.var.dims()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ParamKind;

    /// PyTorch's BatchNorm counter is an int64 scalar; it loads into the model's `[1]`.
    #[test]
    fn a_pytorch_scalar_counter_loads() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torch.safetensors");
        let counter = Tensor::new(7i64, &dev).unwrap();
        let w = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let map: HashMap<String, Tensor> = [
            ("bn1.num_batches_tracked".to_string(), counter),
            ("bn1.weight".to_string(), w),
        ]
        .into();
        candle_core::safetensors::save(&map, &path).unwrap();
        let params = vec![
            Param {
                name: "bn1.num_batches_tracked".into(),
                var: candle_core::Var::zeros(1, candle_core::DType::F32, &dev).unwrap(),
                kind: ParamKind::Buffer,
            },
            Param {
                name: "bn1.weight".into(),
                var: candle_core::Var::zeros(2, candle_core::DType::F32, &dev).unwrap(),
                kind: ParamKind::Trainable,
            },
        ];
        load_params(&path, &params).unwrap();
        assert_eq!(
            params[0].var.as_tensor().to_vec1::<f32>().unwrap(),
            vec![7.0]
        );
        assert_eq!(
            params[1].var.as_tensor().to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0]
        );
    }
}
