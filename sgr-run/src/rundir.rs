//! The files of a run directory and how they are read and written. Every file is written
//! atomically (a temporary file, then a rename), so a crash leaves the previous version.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sgr_core::checkpoint::write_atomic;
use sgr_schema::{EpochRecord, Summary};

use crate::spec::RunSpec;
use crate::{Error, Result};

/// A run directory: `config.json`, `metrics.jsonl`, `checkpoint.safetensors`,
/// `model.safetensors`, `summary.json` and the model card `README.md`.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// The run directory at `path` (nothing is read or created).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `config.json`: the run specification.
    pub fn config(&self) -> PathBuf {
        self.path.join("config.json")
    }

    /// `metrics.jsonl`: one [`EpochRecord`] per completed epoch.
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// `checkpoint.safetensors`: weights, optimizer state and position.
    pub fn checkpoint(&self) -> PathBuf {
        self.path.join("checkpoint.safetensors")
    }

    /// `model.safetensors`: the weights alone.
    pub fn model(&self) -> PathBuf {
        self.path.join("model.safetensors")
    }

    /// `summary.json`: the run's [`Summary`].
    pub fn summary(&self) -> PathBuf {
        self.path.join("summary.json")
    }

    /// `README.md`: the model card.
    pub fn card(&self) -> PathBuf {
        self.path.join("README.md")
    }

    /// The lock file held while a process trains the run.
    pub fn lock_file(&self) -> PathBuf {
        self.path.join(".sgr-lock")
    }

    /// The files a run writes (the lock file aside).
    pub fn run_files(&self) -> [PathBuf; 6] {
        [
            self.config(),
            self.metrics(),
            self.checkpoint(),
            self.model(),
            self.summary(),
            self.card(),
        ]
    }

    /// Whether the folder holds (part of) a run.
    pub fn holds_run(&self) -> bool {
        self.run_files().iter().any(|p| p.exists())
    }

    /// Whether the folder holds a run that stopped before its first checkpoint (a crash, a
    /// kill, a data error in the first epoch): its configuration and no record, no weights.
    /// Nothing trained would be lost by replacing it, and there is nothing to resume.
    pub fn unstarted(&self) -> bool {
        let empty = |p: PathBuf| match std::fs::symlink_metadata(&p) {
            Ok(m) => m.is_file() && m.len() == 0,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        self.holds_run()
            && [self.checkpoint(), self.model(), self.summary(), self.card()]
                .iter()
                .all(|p| !p.exists())
            && empty(self.metrics())
    }

    /// Takes the run's lock: the folder is created if needed, and a folder that another
    /// process trains in is an error naming that process. The lock lasts as long as the
    /// returned guard (the operating system drops it when the process ends, even by kill -9).
    /// With `claim`, the lock file records this process as the owner ([`RunLock::claim`]).
    pub fn lock(&self, claim: bool) -> Result<RunLock> {
        let io = |source| Error::Io {
            path: self.lock_file(),
            source,
        };
        if self.path.is_file() {
            return Err(Error::File {
                path: self.path.clone(),
                problem: "is a file, and a run directory (a folder) is expected here: choose \
                          another --out"
                    .into(),
            });
        }
        std::fs::create_dir_all(&self.path).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        self.check_name_room()?;
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        // Never through a link: writing the owner into `.sgr-lock -> victim` would truncate
        // the victim (any file, for root). A FIFO must not block the open either.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            &mut options,
            libc::O_NOFOLLOW | libc::O_NONBLOCK,
        );
        let not_a_file = || Error::Io {
            path: self.lock_file(),
            source: std::io::Error::other(
                "the run's lock file is a symbolic link or not a regular file; sgr only ever \
                 makes a regular file there: remove it, or choose another --out",
            ),
        };
        if std::fs::symlink_metadata(self.lock_file()).is_ok_and(|m| !m.file_type().is_file()) {
            return Err(not_a_file());
        }
        let f = options.open(self.lock_file()).map_err(|e| {
            // O_NOFOLLOW on a link (made since the check above) fails with ELOOP.
            #[cfg(unix)]
            let link = e.raw_os_error() == Some(libc::ELOOP);
            #[cfg(not(unix))]
            let link = false;
            if link {
                not_a_file()
            } else {
                io(e)
            }
        })?;
        if !f.metadata().map_err(io)?.is_file() {
            return Err(not_a_file());
        }
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = read_text(&self.lock_file()).unwrap_or_default();
                return Err(Error::Locked {
                    dir: self.path.clone(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut lock = RunLock {
            file: f,
            path: self.lock_file(),
        };
        if claim {
            lock.claim()?;
        }
        Ok(lock)
    }

    /// Fails now, not after an epoch of training, when the folder's path leaves no room for
    /// the longest file name a run writes there (an atomic write's temporary file).
    fn check_name_room(&self) -> Result<()> {
        let probe = self
            .path
            .join(format!(".checkpoint.safetensors.tmp-{}", u32::MAX));
        match std::fs::File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidFilename => Err(Error::File {
                path: self.path.clone(),
                problem: format!(
                    "the path is too long for the files a run writes there ({} bytes): choose \
                     a shorter --out",
                    self.path.as_os_str().len()
                ),
            }),
            // Other failures (a read-only folder) are reported where the file is written.
            Err(_) => Ok(()),
        }
    }

    /// Removes the files of a run (before a new run replaces it, so that no folder mixes two).
    pub fn clear(&self) -> Result<()> {
        for p in self.run_files() {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Io { path: p, source }),
            }
        }
        Ok(())
    }

    /// Reads `config.json`.
    pub fn read_spec(&self) -> Result<RunSpec> {
        let path = self.config();
        let text = read_text(&path).map_err(|e| Error::File {
            path: path.clone(),
            problem: format!("{e} (is {} a run directory?)", self.path.display()),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::File {
            path,
            problem: format!("invalid run configuration: {e}"),
        })
    }

    /// Writes `config.json`.
    pub fn write_spec(&self, spec: &RunSpec) -> Result<()> {
        write_json(&self.config(), spec)
    }

    /// Reads the first `epochs` records of `metrics.jsonl` (all when `None`).
    pub fn read_records(&self, epochs: Option<usize>) -> Result<Vec<EpochRecord>> {
        let path = self.metrics();
        let text = match read_text(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && epochs.unwrap_or(0) == 0 => {
                return Ok(Vec::new())
            }
            Err(source) => return Err(Error::Io { path, source }),
        };
        let bad = |problem: String| Error::File {
            path: path.clone(),
            problem,
        };
        let records = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(epochs.unwrap_or(usize::MAX))
            .enumerate()
            .map(|(i, l)| {
                let r: EpochRecord =
                    serde_json::from_str(l).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
                let in_range = |v: f64| (0.0..=1.0).contains(&v);
                if r.train.epoch != i {
                    return Err(bad(format!(
                        "line {} records epoch {}, expected {}: lines are missing or out of order",
                        i + 1,
                        r.train.epoch + 1,
                        i + 1
                    )));
                }
                if !in_range(r.test_accuracy)
                    || !in_range(r.train.train_accuracy)
                    || !r.test_top5.is_none_or(in_range)
                    || !r.test_loss.is_finite()
                {
                    return Err(bad(format!(
                        "line {}: an accuracy outside [0, 1] or a non-finite test loss",
                        i + 1
                    )));
                }
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(want) = epochs {
            if records.len() < want {
                return Err(bad(format!(
                    "{} epoch records, but the checkpoint is after epoch {want}: lines are \
                     missing (truncated?). Restore the file, or start the run anew with --overwrite",
                    records.len()
                )));
            }
        }
        Ok(records)
    }

    /// Writes `metrics.jsonl`.
    pub fn write_records(&self, records: &[EpochRecord]) -> Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).map_err(|e| Error::Spec(e.to_string()))?);
            text.push('\n');
        }
        Ok(write_atomic(&self.metrics(), text.as_bytes())?)
    }

    /// Reads `summary.json`.
    pub fn read_summary(&self) -> Result<Summary> {
        let path = self.summary();
        let text = read_text(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::File {
            path,
            problem: e.to_string(),
        })
    }

    /// Writes `summary.json` and the model card.
    pub fn write_summary(&self, spec: &RunSpec, s: &Summary) -> Result<()> {
        write_json(&self.summary(), s)?;
        Ok(write_atomic(&self.card(), model_card(spec, s).as_bytes())?)
    }
}

/// The exclusive lock of a run directory, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    /// Records this process as the owner in the lock file (what a second process reports).
    pub fn claim(&mut self) -> Result<()> {
        use std::io::{Seek, Write};
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let owner = format!(
            "process {} (sgr {})\n",
            std::process::id(),
            env!("CARGO_PKG_VERSION")
        );
        self.file.set_len(0).map_err(io)?;
        self.file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        self.file.write_all(owner.as_bytes()).map_err(io)
    }
}

/// Pretty JSON with a final newline, written atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).map_err(|e| Error::Spec(e.to_string()))?;
    s.push('\n');
    Ok(write_atomic(path, s.as_bytes())?)
}

/// A Hugging Face Hub model card for a run.
pub fn model_card(spec: &RunSpec, s: &Summary) -> String {
    let cos = if s.final_boundary_cos.is_empty() {
        "–".to_string()
    } else {
        s.final_boundary_cos
            .iter()
            .map(|c| format!("{c:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "---\nlibrary_name: sgr\ntags:\n- image-classification\n- local-learning\n- {method}\nmetrics:\n- accuracy\n---\n\n\
# {model} trained with `{method}` (K={k}) on {dataset}\n\n\
Trained with [sgr](https://github.com/sgr-rs/sgr): local learning with Successive Gradient \
Reconciliation (Yang et al., ICML 2024).\n\n\
| metric | value |\n|---|---|\n\
| test accuracy | {acc:.4} |\n| test error | {err:.2}% |\n| epochs | {epochs} |\n| steps | {steps} |\n\
| train samples | {ntr} |\n| training time | {secs:.1} s |\n| peak memory | {mem} |\n\
| final cos(a, b) per boundary | {cos} |\n\n\
Files: `model.safetensors` (torchvision-style names; aux heads under `aux.<k>`), `config.json` \
(the run specification), `metrics.jsonl` (per epoch), `summary.json`, `checkpoint.safetensors` \
(weights, optimizer state and position, for `sgr train --resume`).\n\n\
Method: `{method}`, split `{split}`, aux head `{head}`, optimizer `{opt:?}`, lr {lr}, batch {batch}, \
seed {seed}.\n",
        method = s.method,
        model = spec.model,
        k = s.modules,
        dataset = s.dataset,
        acc = s.test_accuracy,
        err = 100.0 * s.test_error,
        epochs = s.epochs,
        steps = s.steps,
        ntr = s.train_samples,
        secs = s.train_seconds,
        mem = s
            .peak_memory_bytes
            .map(|b| format!("{} MiB", b / (1024 * 1024)))
            .unwrap_or_else(|| "–".into()),
        cos = cos,
        split = spec.split,
        head = spec.aux_head,
        opt = spec.trainer.optimizer,
        lr = spec.trainer.lr,
        batch = spec.batch_size,
        seed = spec.seed,
    )
}

/// A run file's text: a regular file of bounded size (`sgr_schema::file`).
fn read_text(path: &Path) -> std::io::Result<String> {
    sgr_schema::file::read_regular_string(path, sgr_schema::file::limits::TEXT)
}
