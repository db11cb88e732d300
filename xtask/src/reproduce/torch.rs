//! The "saving vs PyTorch bp" column of the memory profiles: PyTorch's bp step at the same
//! model, input, classes, batch, thread count and device as sgr's bp cell.
//!
//! Where the number comes from, in this order (docs/reproduce.md):
//!
//! 1. **measured**: an interpreter with torch and timm (`--python PATH`, else `$PYTHON`, else
//!    `python3`; `python -c "import torch, timm"` decides) runs `scripts/torch_reference.py
//!    --method bp` with the bp cell's flags, as `scripts/compare_torch.sh` does. It prints the
//!    fields of `sgr bench --json`; the measurement is cached in the output folder under its key
//!    and torch's version.
//! 2. **record**: the last line of the records file (`docs/results/<table>-<profile>/
//!    torch_bp.jsonl` unless `--torch-records FILE`) with the same key, a measurement committed
//!    from a machine that had torch. `--save-torch-records` writes this run's measurements there.
//! 3. **n/a**: neither; the table says why under a footnote, and no number is made up.
//!
//! What is compared (like with like): on the CPU the peak resident memory of the whole process
//! (`peak_memory_bytes`, ru_maxrss, in both `sgr bench` and the twin) — PyTorch has no counting
//! allocator, so sgr's exact heap column is compared with sgr's bp only; on CUDA the peak device
//! memory allocated (`peak_device_memory_bytes`: sgr's allocator peak against
//! `torch.cuda.max_memory_allocated`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::run::{report_line, slug, write_atomic};

/// What a PyTorch bp measurement must match to stand beside sgr's cells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// `--model`.
    pub model: String,
    /// Input `[channels, height, width]`.
    pub input: [usize; 3],
    /// Classes.
    pub classes: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Compute threads (torch's `set_num_threads`, sgr's rayon pool).
    pub threads: usize,
    /// `cpu` or `cuda`.
    pub device: String,
}

impl Key {
    /// `deit-s, input 3×224×224, 1000 classes, batch 8, 2 threads, cpu`.
    pub fn describe(&self) -> String {
        let [c, h, w] = self.input;
        format!(
            "{}, input {c}×{h}×{w}, {} classes, batch {}, {} thread{}, {}",
            self.model,
            self.classes,
            self.batch_size,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.device
        )
    }
}

/// One PyTorch measurement, a line of the records file: what `scripts/torch_reference.py`
/// prints, with `classes` added (it does not print it); other fields are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `pytorch <version>`.
    pub implementation: String,
    /// `--model`.
    pub model: String,
    /// `--method`; only `bp` records are used.
    pub method: String,
    /// Input `[channels, height, width]`.
    pub input: [usize; 3],
    /// Classes (added by xtask).
    pub classes: usize,
    /// Images per step.
    pub batch_size: usize,
    /// torch's compute threads.
    pub threads: usize,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Timed steps, after one warm-up step.
    pub steps: usize,
    /// Peak resident memory of the whole Python process (ru_maxrss).
    pub peak_memory_bytes: u64,
    /// torch's allocator high-water mark on CUDA.
    #[serde(default)]
    pub peak_device_memory_bytes: Option<u64>,
    /// The rest of what the twin printed (timings, ...).
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

impl Record {
    /// The key the record matches.
    pub fn key(&self) -> Key {
        Key {
            model: self.model.clone(),
            input: self.input,
            classes: self.classes,
            batch_size: self.batch_size,
            threads: self.threads,
            device: self.device.clone(),
        }
    }

    /// The bytes compared with sgr's: device memory on CUDA, the process's RSS on the CPU.
    pub fn compared_bytes(&self) -> Option<u64> {
        if self.device == "cuda" {
            self.peak_device_memory_bytes
        } else {
            Some(self.peak_memory_bytes)
        }
    }
}

/// Where a PyTorch number came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Source {
    /// Measured by the twin on this machine (now, or earlier into the output folder's cache).
    #[serde(rename = "measured")]
    Measured,
    /// Read from the committed records.
    #[serde(rename = "record")]
    Record,
    /// No number.
    #[serde(rename = "n/a")]
    Missing,
}

impl Source {
    /// The word the table prints beside a saving.
    pub fn word(self) -> &'static str {
        match self {
            Source::Measured => "measured",
            Source::Record => "record",
            Source::Missing => "n/a",
        }
    }
}

/// PyTorch's bp at one model's key, as the table uses it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TorchBp {
    /// What it matches.
    #[serde(flatten)]
    pub key: Key,
    /// Where the number came from.
    pub source: Source,
    /// The compared peak in MiB (see the module documentation); `None` when missing.
    pub memory_mib: Option<f64>,
    /// `pytorch <version>`, when there is a number.
    pub implementation: Option<String>,
    /// The interpreter and cache file (measured), the file and line (record), or why there is
    /// no number (n/a).
    pub detail: String,
}

/// The PyTorch twin: an interpreter and `scripts/torch_reference.py`.
#[derive(Debug, Clone)]
pub struct Twin {
    /// The interpreter.
    pub python: PathBuf,
    /// The script.
    pub script: PathBuf,
}

/// `path` relative to the workspace root when it is under it (as the table prints it).
fn shown(path: &Path) -> String {
    path.strip_prefix(crate::root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Whether `python` has torch and timm: `Ok(torch's version)` or `Err(why not)`.
pub fn probe(python: &Path) -> std::result::Result<String, String> {
    let out = Command::new(python)
        .args(["-c", "import torch, timm; print(torch.__version__)"])
        .output()
        .map_err(|e| format!("`{}` does not run ({e})", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!(
            "`{} -c \"import torch, timm\"` failed ({}){}",
            python.display(),
            out.status,
            if last.is_empty() {
                String::new()
            } else {
                format!(": {}", last.trim())
            }
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if version.is_empty() {
        return Err(format!(
            "`{}` imported torch but printed no version",
            python.display()
        ));
    }
    Ok(version)
}

/// The thread count of the `sgr bench` cells: `RAYON_NUM_THREADS` when set, else the cores
/// this process may use (rayon's default).
pub fn sgr_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The twin's flags for `key`: those of `sgr bench`'s bp cell, as `scripts/compare_torch.sh`
/// passes them, and `--threads`.
pub fn twin_args(key: &Key, steps: usize) -> Vec<String> {
    let [channels, side, _] = key.input;
    [
        "--model",
        &key.model,
        "--method",
        "bp",
        "--batch-size",
        &key.batch_size.to_string(),
        "--steps",
        &steps.to_string(),
        "--input-size",
        &side.to_string(),
        "--in-channels",
        &channels.to_string(),
        "--classes",
        &key.classes.to_string(),
        "--threads",
        &key.threads.to_string(),
        "--device",
        &key.device,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The cache file of a measurement of `key` under `out`.
fn cache_path(out: &Path, key: &Key) -> PathBuf {
    let [c, h, w] = key.input;
    out.join(format!(
        "torch-bp-{}-{c}x{h}x{w}-c{}-b{}-t{}-{}.json",
        slug(&key.model),
        key.classes,
        key.batch_size,
        key.threads,
        slug(&key.device)
    ))
}

/// Measures PyTorch's bp at `key` with the twin (torch `version`), or reads the measurement of
/// the same key, steps and version from the cache under `out`. Returns the record and its
/// cache file.
pub fn measure(
    twin: &Twin,
    version: &str,
    key: &Key,
    steps: usize,
    out: &Path,
) -> Result<(Record, PathBuf)> {
    let path = cache_path(out, key);
    let implementation = format!("pytorch {version}");
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<Record>(&text) {
            Ok(r) if r.key() == *key && r.steps == steps && r.implementation == implementation => {
                return Ok((r, path));
            }
            _ => eprintln!(
                "xtask: replacing {} (another key, step count or torch version)",
                path.display()
            ),
        }
    }
    let args = twin_args(key, steps);
    let shown = format!(
        "{} {} {}",
        twin.python.display(),
        twin.script.display(),
        args.join(" ")
    );
    eprintln!("xtask: PyTorch bp: {shown}");
    let ran = Command::new(&twin.python)
        .arg(&twin.script)
        .args(&args)
        .output()
        .with_context(|| format!("running {}", twin.python.display()))?;
    let line = report_line(&ran, &format!("`{shown}`"), 3)?;
    let line = line.as_str();
    let mut v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("`{shown}` printed no JSON report: {line}"))?;
    let obj = v
        .as_object_mut()
        .with_context(|| format!("`{shown}` printed JSON that is not an object: {line}"))?;
    obj.insert("classes".into(), key.classes.into());
    let record: Record = serde_json::from_value(v)
        .with_context(|| format!("`{shown}` printed a report without its fields: {line}"))?;
    ensure!(
        record.key() == *key && record.method == "bp",
        "`{shown}` reported {} ({}), not {}",
        record.key().describe(),
        record.method,
        key.describe()
    );
    ensure!(
        record.compared_bytes().is_some(),
        "`{shown}` reported no peak device memory on cuda"
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&path, serde_json::to_string(&record)?.as_bytes())?;
    Ok((record, path))
}

/// The records of `file`, each with its line number; no file is no records. A line that is not
/// a record is an error naming the file and line.
pub fn load_records(file: &Path) -> Result<Vec<(usize, Record)>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a PyTorch record", file.display(), i + 1))?;
        records.push((i + 1, r));
    }
    Ok(records)
}

/// Writes `new` into the records file, each replacing the bp records of its key; the other
/// lines stay as they were, in order.
pub fn save_records(file: &Path, new: &[Record]) -> Result<()> {
    let old = load_records(file)?;
    let keys: Vec<Key> = new.iter().map(Record::key).collect();
    let mut lines: Vec<String> = Vec::new();
    for (_, r) in old {
        if !(r.method == "bp" && keys.contains(&r.key())) {
            lines.push(serde_json::to_string(&r)?);
        }
    }
    for r in new {
        lines.push(serde_json::to_string(r)?);
    }
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomic(file, text.as_bytes())
}

/// Where the PyTorch numbers of a run may come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The twin with torch's version, or why there is none.
    pub twin: std::result::Result<(Twin, String), String>,
    /// The records file.
    pub records_file: PathBuf,
    /// Its records, or why they cannot be read.
    pub records: std::result::Result<Vec<(usize, Record)>, String>,
}

impl Sources {
    /// Probes `python` for torch and reads `records_file`.
    pub fn find(python: &Path, script: &Path, records_file: &Path) -> Self {
        let twin = probe(python).map(|v| {
            (
                Twin {
                    python: python.to_path_buf(),
                    script: script.to_path_buf(),
                },
                v,
            )
        });
        let records = load_records(records_file).map_err(|e| format!("{e:#}"));
        Self {
            twin,
            records_file: records_file.to_path_buf(),
            records,
        }
    }

    /// One line on stderr: where the column's numbers will come from.
    pub fn describe(&self) -> String {
        match &self.twin {
            Ok((t, v)) => format!(
                "PyTorch bp column: measured with {} (pytorch {v}); records in {} are the \
                 fallback",
                t.python.display(),
                shown(&self.records_file)
            ),
            Err(why) => format!(
                "PyTorch bp column: from the records in {} ({} usable): no PyTorch to measure \
                 with: {why}",
                shown(&self.records_file),
                match &self.records {
                    Ok(r) => r.len().to_string(),
                    Err(e) => format!("none, {e}"),
                }
            ),
        }
    }

    /// PyTorch's bp at `key`: measured when the twin is there (a failure falls back to the
    /// records, saying so), else the last matching record, else missing with the reasons.
    /// The second value is the new measurement, if one was made (for `--save-torch-records`).
    pub fn reference(&self, key: &Key, steps: usize, out: &Path) -> (TorchBp, Option<Record>) {
        let mut why = Vec::new();
        match &self.twin {
            Ok((twin, version)) => match measure(twin, version, key, steps, out) {
                Ok((r, path)) => {
                    let bp = TorchBp {
                        key: key.clone(),
                        source: Source::Measured,
                        memory_mib: r.compared_bytes().map(super::mib),
                        implementation: Some(r.implementation.clone()),
                        detail: format!(
                            "measured with {} (cached in {})",
                            twin.python.display(),
                            shown(&path)
                        ),
                    };
                    return (bp, Some(r));
                }
                Err(e) => {
                    eprintln!("xtask: PyTorch bp of {}: {e:#}", key.describe());
                    why.push(format!("the PyTorch measurement failed: {e:#}"));
                }
            },
            Err(e) => why.push(format!("no PyTorch to measure with: {e}")),
        }
        let file = shown(&self.records_file);
        match &self.records {
            Err(e) => why.push(format!("the records cannot be read: {e}")),
            Ok(records) => {
                let found = records
                    .iter()
                    .rev()
                    .find(|(_, r)| r.method == "bp" && r.key() == *key);
                match found.and_then(|(line, r)| r.compared_bytes().map(|b| (line, r, b))) {
                    Some((line, r, bytes)) => {
                        let bp = TorchBp {
                            key: key.clone(),
                            source: Source::Record,
                            memory_mib: Some(super::mib(bytes)),
                            implementation: Some(r.implementation.clone()),
                            detail: format!("record {file} line {line}; {}", why.join("; ")),
                        };
                        return (bp, None);
                    }
                    None => {
                        let same_model: Vec<String> = records
                            .iter()
                            .filter(|(_, r)| r.method == "bp" && r.model == key.model)
                            .map(|(_, r)| r.key().describe())
                            .collect();
                        why.push(if same_model.is_empty() {
                            format!("no record of it in {file}")
                        } else {
                            format!(
                                "no record of it in {file}, which has {}",
                                same_model.join("; ")
                            )
                        });
                    }
                }
            }
        }
        let bp = TorchBp {
            key: key.clone(),
            source: Source::Missing,
            memory_mib: None,
            implementation: None,
            detail: why.join("; "),
        };
        (bp, None)
    }
}

#[cfg(all(test, unix))]
pub(crate) mod tests {
    use super::*;
    use crate::run::tests::script;

    pub(crate) const FAKE_PYTHON: &str = r#"#!/bin/sh
here=$(dirname "$0")
if [ "$1" = "-c" ]; then
  if [ -e "$here/no-torch" ]; then echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1; fi
  echo "2.15.0-fake"; exit 0
fi
echo "$*" >> "$here/calls"
exec sh "$@"
"#;

    /// A stand-in `torch_reference.py`: peak RSS of 100 MiB per image, device memory half that.
    pub(crate) const FAKE_TWIN: &str = r#"
model=; batch=; side=; ch=; threads=; device=; steps=
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift ;;
    --batch-size) batch=$2; shift ;;
    --input-size) side=$2; shift ;;
    --in-channels) ch=$2; shift ;;
    --threads) threads=$2; shift ;;
    --device) device=$2; shift ;;
    --steps) steps=$2; shift ;;
  esac
  shift
done
if [ "$model" = broken ]; then echo "RuntimeError: out of memory" >&2; exit 1; fi
rss=$((batch * 104857600)); dev=null
if [ "$device" = cuda ]; then dev=$((batch * 52428800)); fi
printf '{"implementation":"pytorch 2.15.0-fake","model":"%s","method":"bp","sgr_grad":null,"modules":1,"batch_size":%s,"input":[%s,%s,%s],"threads":%s,"steps":%s,"median_step_seconds":1.0,"images_per_s":%s,"step_seconds":[1.0],"peak_memory_bytes":%s,"device":"%s","cudnn_benchmark":null,"peak_device_memory_bytes":%s}\n' \
  "$model" "$batch" "$ch" "$side" "$side" "$threads" "$steps" "$batch" "$rss" "$device" "$dev"
"#;

    fn key(model: &str, batch: usize) -> Key {
        Key {
            model: model.into(),
            input: [3, 224, 224],
            classes: 1000,
            batch_size: batch,
            threads: 2,
            device: "cpu".into(),
        }
    }

    fn fake(dir: &Path, torch: bool) -> (PathBuf, PathBuf) {
        let python = script(dir, "python", FAKE_PYTHON);
        let twin = script(dir, "torch_reference.py", FAKE_TWIN);
        if !torch {
            std::fs::write(dir.join("no-torch"), "").unwrap();
        }
        (python, twin)
    }

    fn record_line(model: &str, batch: usize, threads: usize, rss_mib: u64) -> String {
        format!(
            "{{\"implementation\":\"pytorch 2.9.0\",\"model\":\"{model}\",\"method\":\"bp\",\
             \"input\":[3,224,224],\"classes\":1000,\"batch_size\":{batch},\"threads\":{threads},\
             \"device\":\"cpu\",\"steps\":1,\"peak_memory_bytes\":{},\"median_step_seconds\":2.5}}",
            rss_mib << 20
        )
    }

    fn calls(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    #[test]
    fn torch_present_measures_with_the_bp_cells_flags_and_caches() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        let (python, twin) = fake(&bin, true);
        let records = tmp.path().join("records.jsonl");
        std::fs::write(&records, record_line("deit-s", 8, 2, 1)).unwrap();
        let s = Sources::find(&python, &twin, &records);
        assert_eq!(s.twin.as_ref().unwrap().1, "2.15.0-fake");
        assert!(s.describe().contains("measured with"), "{}", s.describe());
        let out = tmp.path().join("out");
        let (bp, new) = s.reference(&key("deit-s", 8), 1, &out);
        assert_eq!(bp.source, Source::Measured, "{bp:?}");
        assert_eq!(
            bp.memory_mib,
            Some(800.0),
            "measured, not the record's 1 MiB"
        );
        assert_eq!(bp.implementation.as_deref(), Some("pytorch 2.15.0-fake"));
        let new = new.unwrap();
        assert_eq!(
            (new.classes, new.rest["median_step_seconds"].as_f64()),
            (1000, Some(1.0))
        );
        let line = std::fs::read_to_string(bin.join("calls")).unwrap();
        assert!(
            line.contains(
                "--model deit-s --method bp --batch-size 8 --steps 1 --input-size 224 \
                 --in-channels 3 --classes 1000 --threads 2 --device cpu"
            ),
            "{line}"
        );
        assert_eq!(calls(&bin), 1);
        let (again, _) = s.reference(&key("deit-s", 8), 1, &out);
        assert_eq!(again, bp);
        assert_eq!(calls(&bin), 1, "cached");
        s.reference(&key("deit-s", 8), 2, &out);
        assert_eq!(calls(&bin), 2, "another step count measures again");

        // CUDA compares device memory.
        let (bp, _) = s.reference(
            &Key {
                device: "cuda".into(),
                ..key("deit-s", 8)
            },
            1,
            &out,
        );
        assert_eq!(bp.memory_mib, Some(400.0));

        // A failed measurement falls back to the records, saying why.
        std::fs::write(&records, record_line("broken", 8, 2, 900)).unwrap();
        let s = Sources::find(&python, &twin, &records);
        let (bp, new) = s.reference(&key("broken", 8), 1, &out);
        assert_eq!(
            (bp.source, bp.memory_mib, new),
            (Source::Record, Some(900.0), None)
        );
        assert!(
            bp.detail.contains("measurement failed") && bp.detail.contains("out of memory"),
            "{}",
            bp.detail
        );
    }

    #[test]
    fn torch_absent_reads_the_matching_record_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let (python, twin) = fake(tmp.path(), false);
        let records = tmp.path().join("records.jsonl");
        std::fs::write(
            &records,
            [
                record_line("deit-s", 8, 2, 700),
                String::new(),
                record_line("deit-s", 8, 4, 750),
                record_line("deit-s", 8, 2, 710),
            ]
            .join("\n"),
        )
        .unwrap();
        let s = Sources::find(&python, &twin, &records);
        let why = s.twin.as_ref().unwrap_err();
        assert!(why.contains("No module named 'torch'"), "{why}");
        assert!(s.describe().contains("3 usable"), "{}", s.describe());
        let (bp, new) = s.reference(&key("deit-s", 8), 1, tmp.path());
        assert_eq!(bp.source, Source::Record);
        assert_eq!(bp.memory_mib, Some(710.0), "the last matching line wins");
        assert!(new.is_none());
        assert!(
            bp.detail
                .starts_with(&format!("record {} line 4", records.display())),
            "{}",
            bp.detail
        );
        assert_eq!(calls(tmp.path()), 0, "nothing ran");
    }

    #[test]
    fn neither_torch_nor_a_record_is_missing_with_the_reasons() {
        let tmp = tempfile::tempdir().unwrap();
        let (python, twin) = fake(tmp.path(), false);
        let records = tmp.path().join("records.jsonl");
        std::fs::write(&records, record_line("deit-s", 16, 2, 700)).unwrap();
        let s = Sources::find(&python, &twin, &records);
        let (bp, _) = s.reference(&key("deit-s", 8), 1, tmp.path());
        assert_eq!((bp.source, bp.memory_mib), (Source::Missing, None));
        assert!(
            bp.detail.contains("no PyTorch to measure with")
                && bp
                    .detail
                    .contains("which has deit-s, input 3×224×224, 1000 classes, batch 16"),
            "{}",
            bp.detail
        );
        // No records file at all, and an interpreter that does not exist.
        let s = Sources::find(
            &tmp.path().join("no-python"),
            &twin,
            &tmp.path().join("none.jsonl"),
        );
        assert!(s.records.as_ref().unwrap().is_empty());
        let (bp, _) = s.reference(&key("deit-s", 8), 1, tmp.path());
        assert_eq!(bp.source, Source::Missing);
        assert!(bp.detail.contains("does not run"), "{}", bp.detail);
        // A broken records file is a reason, not a crash.
        std::fs::write(&records, "{\"model\":").unwrap();
        let s = Sources::find(&python, &twin, &records);
        let (bp, _) = s.reference(&key("deit-s", 8), 1, tmp.path());
        assert_eq!(bp.source, Source::Missing);
        assert!(
            bp.detail.contains("line 1: not a PyTorch record"),
            "{}",
            bp.detail
        );
    }

    #[test]
    fn saving_records_replaces_the_same_key_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("d/torch_bp.jsonl");
        let parse = |l: String| serde_json::from_str::<Record>(&l).unwrap();
        save_records(&file, &[parse(record_line("deit-s", 8, 2, 700))]).unwrap();
        save_records(
            &file,
            &[
                parse(record_line("resnet101", 8, 2, 900)),
                parse(record_line("deit-s", 16, 2, 1200)),
            ],
        )
        .unwrap();
        save_records(&file, &[parse(record_line("deit-s", 8, 2, 720))]).unwrap();
        let got: Vec<(String, usize, u64)> = load_records(&file)
            .unwrap()
            .into_iter()
            .map(|(_, r)| (r.model, r.batch_size, r.peak_memory_bytes >> 20))
            .collect();
        assert_eq!(
            got,
            [
                ("resnet101".to_string(), 8, 900),
                ("deit-s".to_string(), 16, 1200),
                ("deit-s".to_string(), 8, 720)
            ]
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("\"median_step_seconds\":2.5"), "{text}");
    }
}
