//! Running one cell of a grid: `sgr train` into a directory keyed by the hash of the run's
//! specification, reusing a finished run of the same specification.
//!
//! The contract with the `sgr` binary:
//!
//! * `sgr train <flags> --print-spec` prints exactly one line of JSON to stdout,
//!   `{"spec_hash":"<hex>","spec":{...}}`, and exits 0 without training. The hash covers the
//!   whole resolved run specification, every default included; `--out` is not given to it (a
//!   run's output folder is not part of what it trains).
//! * The `summary.json` a run writes carries the same `spec_hash`.
//!
//! A cell with label `L` and hash `H` runs in `OUT/<slug of L>-<first 12 hex digits of H>`. Its
//! result is reused only when that directory's `summary.json` has `spec_hash` `H`; a directory
//! holding anything else is removed (said on stderr) and the cell rerun.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use sgr_schema::{BenchReport, Summary};

/// Hex digits of the spec hash in a cell's directory name.
pub const HASH_PREFIX: usize = 12;

/// What `sgr train <flags> --print-spec` prints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrintSpec {
    /// Hash of the whole resolved run specification, in hex.
    pub spec_hash: String,
    /// The resolved run specification (a JSON object).
    pub spec: serde_json::Value,
}

/// Parses the stdout of `sgr train <flags> --print-spec`: exactly one non-empty line, a JSON
/// object with `spec_hash` (at least [`HASH_PREFIX`] hex digits) and `spec` (an object); other
/// keys are ignored.
pub fn parse_print_spec(stdout: &str) -> Result<PrintSpec> {
    let lines: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let [line] = lines[..] else {
        bail!("expected one line of JSON, got {} lines", lines.len());
    };
    let p: PrintSpec = serde_json::from_str(line).with_context(|| {
        format!("expected {{\"spec_hash\":\"<hex>\",\"spec\":{{...}}}}, got {line}")
    })?;
    ensure!(
        p.spec_hash.len() >= HASH_PREFIX && p.spec_hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "spec_hash `{}` is not a hex string of at least {HASH_PREFIX} digits",
        p.spec_hash
    );
    ensure!(p.spec.is_object(), "spec is not a JSON object: {}", p.spec);
    Ok(p)
}

/// Runs `sgr train <args> --print-spec` and parses what it prints.
pub fn print_spec(sgr: &Path, args: &[String]) -> Result<PrintSpec> {
    print_spec_of(sgr, "train", args)
}

/// Runs `sgr <command> <args> --print-spec` (`train` or `bench`) and parses what it prints.
fn print_spec_of(sgr: &Path, command: &str, args: &[String]) -> Result<PrintSpec> {
    let shown = format!("sgr {command} {} --print-spec", args.join(" "));
    let out = Command::new(sgr)
        .arg(command)
        .args(args)
        .arg("--print-spec")
        .output()
        .with_context(|| format!("running {}", sgr.display()))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_print_spec(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("reading what `{shown}` printed"))
}

/// A label as a directory-name component: characters outside `[A-Za-z0-9._-]` (spaces, `=`,
/// `λ`) become `_`, runs of `_` collapse to one, and no leading `.`, `-` or `_` is kept (so the
/// name is never `.`/`..`); `run` if nothing is left.
pub fn slug(label: &str) -> String {
    let mut s = String::with_capacity(label.len());
    for c in label.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        };
        if !(c == '_' && s.ends_with('_')) {
            s.push(c);
        }
    }
    let s = s.trim_start_matches(['.', '-', '_']).trim_end_matches('_');
    if s.is_empty() {
        "run".into()
    } else {
        s.into()
    }
}

/// The directory of the cell `label` whose specification hashes to `spec_hash`:
/// `out/<slug>-<first HASH_PREFIX characters of the hash>`.
pub fn cell_dir(out: &Path, label: &str, spec_hash: &str) -> PathBuf {
    let prefix = spec_hash.get(..HASH_PREFIX).unwrap_or(spec_hash);
    out.join(format!("{}-{prefix}", slug(label)))
}

/// What a cell's directory holds, against the specification hash it should have been run with.
#[derive(Debug, PartialEq)]
pub enum CellState {
    /// There is no directory.
    Absent,
    /// A finished run of this specification: its summary.
    Finished(Box<Summary>),
    /// The directory exists without a `summary.json` (an interrupted or failed run).
    Unfinished,
    /// The `summary.json` is of another specification.
    Stale {
        /// The `spec_hash` it has (empty when written by an sgr that recorded none).
        found: String,
    },
}

/// The reuse decision: what `dir` holds for a cell whose specification hashes to `spec_hash`.
/// A `summary.json` that cannot be read or parsed is an error naming it.
pub fn inspect(dir: &Path, spec_hash: &str) -> Result<CellState> {
    if !dir
        .try_exists()
        .with_context(|| format!("checking {}", dir.display()))?
    {
        return Ok(CellState::Absent);
    }
    if !dir.join("summary.json").exists() {
        return Ok(CellState::Unfinished);
    }
    let s = read_summary(dir)?;
    Ok(if s.spec_hash == spec_hash {
        CellState::Finished(Box::new(s))
    } else {
        CellState::Stale { found: s.spec_hash }
    })
}

/// Reads `dir/summary.json`.
pub fn read_summary(dir: &Path) -> Result<Summary> {
    let path = dir.join("summary.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid summary.json ({e}); delete {} to rerun this cell",
            path.display(),
            dir.display()
        )
    })
}

/// The numbers a table takes from one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunResult {
    /// Final test top-1 accuracy.
    pub accuracy: f64,
    /// Seconds spent in training steps.
    pub seconds: f64,
    /// Mean over boundaries of the last epoch's cos(a, b); NaN without boundaries (K = 1).
    pub mean_cos: f64,
    /// Peak resident memory in MiB; NaN when the platform did not report it.
    pub peak_mib: f64,
}

impl RunResult {
    /// The numbers of `s`.
    pub fn from_summary(s: &Summary) -> Self {
        let cos = &s.final_boundary_cos;
        Self {
            accuracy: s.test_accuracy,
            seconds: s.train_seconds,
            mean_cos: if cos.is_empty() {
                f64::NAN
            } else {
                cos.iter().sum::<f64>() / cos.len() as f64
            },
            peak_mib: s
                .peak_memory_bytes
                .map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0)),
        }
    }
}

/// Runs the cell `label` (`sgr train <args>`) under `out`, or reuses its finished run of the
/// same specification (see the module documentation), or copies in a finished run of the same
/// specification found in one of the `reuse` folders (runs made by hand or by another table).
pub fn run(
    sgr: &Path,
    out: &Path,
    label: &str,
    args: &[String],
    reuse: &[PathBuf],
) -> Result<RunResult> {
    train_cell(sgr, out, label, args, reuse).map(|s| RunResult::from_summary(&s))
}

/// [`run`], returning the run's whole summary.
pub fn train_cell(
    sgr: &Path,
    out: &Path,
    label: &str,
    args: &[String],
    reuse: &[PathBuf],
) -> Result<Summary> {
    let spec = print_spec(sgr, args)?;
    let dir = cell_dir(out, label, &spec.spec_hash);
    match inspect(&dir, &spec.spec_hash)? {
        CellState::Finished(s) => {
            eprintln!("xtask: {label}: reusing {}", dir.display());
            return Ok(*s);
        }
        CellState::Absent => {
            if let Some(found) = find_finished(reuse, &spec.spec_hash)? {
                eprintln!(
                    "xtask: {label}: copying the finished run {} (same spec_hash)",
                    found.display()
                );
                copy_run(&found, &dir)?;
                return read_summary(&dir);
            }
        }
        CellState::Unfinished if resumable(&dir) => {
            eprintln!(
                "xtask: {label}: resuming the unfinished run in {} from its checkpoint",
                dir.display()
            );
            resume(sgr, &dir)?;
            return checked_summary(&dir, &spec.spec_hash);
        }
        CellState::Unfinished => {
            eprintln!(
                "xtask: removing {} (no summary.json and no checkpoint: an unfinished run) to \
                 rerun it",
                dir.display()
            );
            remove(&dir)?;
        }
        CellState::Stale { found } => {
            eprintln!(
                "xtask: removing {} (its summary.json has spec_hash `{found}`, not `{}`) to rerun it",
                dir.display(),
                spec.spec_hash
            );
            remove(&dir)?;
        }
    }
    train(sgr, &dir, args)?;
    checked_summary(&dir, &spec.spec_hash)
}

/// The summary of the run in `dir`, which must carry `spec_hash`.
fn checked_summary(dir: &Path, spec_hash: &str) -> Result<Summary> {
    let s = read_summary(dir)?;
    ensure!(
        s.spec_hash == spec_hash,
        "{}: spec_hash `{}` differs from the `{spec_hash}` that --print-spec printed for the same \
         flags",
        dir.join("summary.json").display(),
        s.spec_hash
    );
    Ok(s)
}

/// Whether an unfinished cell can continue: its directory (named by the spec's hash, so of
/// this spec) holds the run's `config.json` and an epoch-boundary checkpoint.
fn resumable(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("checkpoint.safetensors").is_file()
}

/// Runs `sgr train --resume dir`, its stdout appended to `dir/train.log`.
fn resume(sgr: &Path, dir: &Path) -> Result<()> {
    let log_path = dir.join("train.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let status = Command::new(sgr)
        .arg("train")
        .arg("--resume")
        .arg(dir)
        .stdout(log)
        .status()
        .with_context(|| format!("running {}", sgr.display()))?;
    if !status.success() {
        bail!(
            "sgr train --resume {} failed; see {}",
            dir.display(),
            log_path.display()
        );
    }
    Ok(())
}

/// A measurement and whether it came from the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// What `sgr bench --json` printed.
    pub report: BenchReport,
    /// It was read from the cache, not measured now.
    pub cached: bool,
}

/// Runs `sgr bench <args> --json` as the measurement `label` under `out`, or reuses the
/// measurement of the same specification: `out/<slug>-<hash prefix>.json` (the hash that
/// `sgr bench <args> --print-spec` prints). A failed measurement is an error with the end of
/// what `sgr bench` said; nothing is cached for it.
pub fn bench(sgr: &Path, out: &Path, label: &str, args: &[String]) -> Result<Measured> {
    let spec = print_spec_of(sgr, "bench", args)?;
    let prefix = &spec.spec_hash[..HASH_PREFIX];
    let path = out.join(format!("{}-{prefix}.json", slug(label)));
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<BenchReport>(&text) {
            Ok(report) if report.spec_hash == spec.spec_hash => {
                return Ok(Measured {
                    report,
                    cached: true,
                })
            }
            _ => eprintln!(
                "xtask: replacing {} (another or no spec_hash)",
                path.display()
            ),
        }
    }
    let ran = Command::new(sgr)
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .with_context(|| format!("running {}", sgr.display()))?;
    let line = report_line(&ran, &format!("sgr bench {}", args.join(" ")), 5)?;
    let line = line.as_str();
    let report: BenchReport = serde_json::from_str(line)
        .with_context(|| format!("sgr bench {} printed no report: {line}", args.join(" ")))?;
    ensure!(
        report.spec_hash == spec.spec_hash,
        "sgr bench {}: spec_hash `{}` differs from the `{}` that --print-spec printed",
        args.join(" "),
        report.spec_hash,
        spec.spec_hash
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&path, line.as_bytes())?;
    Ok(Measured {
        report,
        cached: false,
    })
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so an
/// interrupted write never leaves a half-written result to be reused.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}

/// The first run directory directly under one of `folders` whose `summary.json` has
/// `spec_hash`.
pub fn find_finished(folders: &[PathBuf], spec_hash: &str) -> Result<Option<PathBuf>> {
    for folder in folders {
        let entries = std::fs::read_dir(folder)
            .with_context(|| format!("--reuse {}: cannot list it", folder.display()))?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("summary.json").is_file())
            .collect();
        dirs.sort();
        for d in dirs {
            if read_summary(&d).is_ok_and(|s| s.spec_hash == spec_hash) {
                return Ok(Some(d));
            }
        }
    }
    Ok(None)
}

/// Copies the files of the run directory `from` (not its lock) into the new directory `to`,
/// through a temporary sibling and a rename.
fn copy_run(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("copying");
    if tmp.exists() {
        remove(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let e = e?;
        let name = e.file_name();
        if name == ".sgr-lock" || !e.file_type()?.is_file() {
            continue;
        }
        std::fs::copy(e.path(), tmp.join(&name))
            .with_context(|| format!("copying {}", e.path().display()))?;
    }
    std::fs::rename(&tmp, to).with_context(|| format!("renaming {} into place", tmp.display()))
}

/// Removes the directory `dir` and everything in it.
fn remove(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Runs `sgr train <args> --out dir`, its stdout into `dir/train.log`.
fn train(sgr: &Path, dir: &Path, args: &[String]) -> Result<()> {
    eprintln!(
        "xtask: sgr train {} --out {}",
        args.join(" "),
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("train.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let status = Command::new(sgr)
        .arg("train")
        .args(args)
        .arg("--out")
        .arg(dir)
        .stdout(log)
        .status()
        .with_context(|| format!("running {}", sgr.display()))?;
    if !status.success() {
        bail!(
            "sgr train {} failed; see {}",
            args.join(" "),
            log_path.display()
        );
    }
    Ok(())
}

/// The last non-empty line a measuring process printed (its JSON report), or, when it failed,
/// an error naming `shown` (the command) with the last `tail` lines of its stderr.
pub(crate) fn report_line(ran: &std::process::Output, shown: &str, tail: usize) -> Result<String> {
    if !ran.status.success() {
        let err = String::from_utf8_lossy(&ran.stderr);
        let last: Vec<&str> = err.lines().rev().take(tail).collect();
        let detail = if last.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                last.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )
        };
        bail!("{shown} failed ({}){detail}", ran.status);
    }
    let stdout = String::from_utf8_lossy(&ran.stdout);
    Ok(stdout
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef";

    fn summary(spec_hash: &str) -> Summary {
        Summary {
            method: "sgr".into(),
            model: "resnet8".into(),
            dataset: "digits".into(),
            modules: 2,
            epochs: 1,
            steps: 10,
            train_samples: 100,
            test_samples: 50,
            test_accuracy: 0.75,
            test_error: 0.25,
            test_top5: Some(1.0),
            train_seconds: 3.0,
            peak_memory_bytes: Some(3 * 1024 * 1024),
            rank_peak_memory_bytes: Vec::new(),
            final_boundary_cos: vec![0.2, 0.4],
            initial_test_accuracy: None,
            spec_hash: spec_hash.into(),
            validation: false,
        }
    }

    fn write_summary(dir: &Path, s: &Summary) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("summary.json"), serde_json::to_string(s).unwrap()).unwrap();
    }

    #[test]
    fn print_spec_line_parses() {
        let p = parse_print_spec(&format!(
            "{{\"spec_hash\":\"{HASH}\",\"spec\":{{\"seed\":1,\"lr\":0.05}}}}\n"
        ))
        .unwrap();
        assert_eq!(p.spec_hash, HASH);
        assert_eq!(p.spec["seed"], 1);
    }

    #[test]
    fn print_spec_output_other_than_one_valid_line_is_rejected() {
        let good = format!("{{\"spec_hash\":\"{HASH}\",\"spec\":{{}}}}");
        for (out, why) in [
            (String::new(), "one line"),
            (format!("sgr train: resnet8\n{good}\n"), "2 lines"),
            ("{\"spec\":{}}".to_string(), "spec_hash"),
            (format!("{{\"spec_hash\":\"{HASH}\"}}"), "spec"),
            (
                "{\"spec_hash\":\"0123abcd\",\"spec\":{}}".into(),
                "at least 12",
            ),
            (
                format!("{{\"spec_hash\":\"{HASH}/..\",\"spec\":{{}}}}"),
                "hex",
            ),
            (
                format!("{{\"spec_hash\":\"{HASH}\",\"spec\":[1]}}"),
                "not a JSON object",
            ),
        ] {
            let e = format!("{:#}", parse_print_spec(&out).unwrap_err());
            assert!(e.contains(why), "{out:?}: {e}");
        }
    }

    #[test]
    fn labels_become_readable_directory_names() {
        assert_eq!(slug("sgr squared-l2 λ=0.3 s0"), "sgr_squared-l2_0.3_s0");
        assert_eq!(slug("greedy-k4"), "greedy-k4");
        assert_eq!(slug("a/b\\c: d"), "a_b_c_d");
        assert_eq!(slug(".."), "run");
        assert_eq!(slug("-x "), "x");
        assert_eq!(slug("λ"), "run");
        assert_eq!(
            cell_dir(Path::new("runs/sweep"), "bp s1", HASH),
            Path::new("runs/sweep/bp_s1-0123456789ab")
        );
    }

    #[test]
    fn reuse_decision_follows_the_summary_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cell");
        assert_eq!(inspect(&dir, HASH).unwrap(), CellState::Absent);

        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("train.log"), "epoch 1").unwrap();
        assert_eq!(inspect(&dir, HASH).unwrap(), CellState::Unfinished);

        write_summary(&dir, &summary(HASH));
        assert_eq!(
            inspect(&dir, HASH).unwrap(),
            CellState::Finished(Box::new(summary(HASH)))
        );

        let other = "fedcba9876543210";
        write_summary(&dir, &summary(other));
        assert_eq!(
            inspect(&dir, HASH).unwrap(),
            CellState::Stale {
                found: other.into()
            }
        );

        // A summary from before spec hashes were recorded parses, with an empty hash.
        let mut old = serde_json::to_value(summary("")).unwrap();
        old.as_object_mut().unwrap().remove("spec_hash");
        std::fs::write(dir.join("summary.json"), old.to_string()).unwrap();
        assert_eq!(
            inspect(&dir, HASH).unwrap(),
            CellState::Stale { found: "".into() }
        );

        std::fs::write(dir.join("summary.json"), "{\"method\":").unwrap();
        let e = inspect(&dir, HASH).unwrap_err().to_string();
        assert!(
            e.contains(&dir.join("summary.json").display().to_string())
                && e.contains(&format!("delete {} to rerun", dir.display())),
            "{e}"
        );
    }

    #[test]
    fn results_come_from_typed_summaries() {
        let r = RunResult::from_summary(&summary(HASH));
        assert_eq!((r.accuracy, r.seconds, r.peak_mib), (0.75, 3.0, 3.0));
        assert!((r.mean_cos - 0.3).abs() < 1e-12);
        let mut s = summary(HASH);
        s.final_boundary_cos.clear();
        s.peak_memory_bytes = None;
        let r = RunResult::from_summary(&s);
        assert!(r.mean_cos.is_nan() && r.peak_mib.is_nan());
    }

    /// `run` against a stand-in `sgr` that keeps the contract: it hashes `--seed`, writes
    /// `summary.json` with that hash and logs each invocation.
    #[cfg(unix)]
    #[test]
    fn run_trains_once_per_spec_and_replaces_stale_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let template = serde_json::to_string(&summary("HASH")).unwrap();
        std::fs::write(bin.join("summary.template"), template).unwrap();
        let sgr = fake_sgr(
            &bin,
            r#"#!/bin/sh
here=$(dirname "$0")
echo "$*" >> "$here/calls"
spec=0; out=; seed=
while [ $# -gt 0 ]; do
  case "$1" in
    --print-spec) spec=1 ;;
    --out) out=$2; shift ;;
    --resume) out=$2; seed=$(cat "$2/seed"); shift ;;
    --seed) seed=$2; shift ;;
  esac
  shift
done
hash="${seed}0123456789abcdef"
if [ "$spec" = 1 ]; then
  printf '{"spec_hash":"%s","spec":{"seed":%s}}\n' "$hash" "$seed"
  exit 0
fi
echo training
sed "s/HASH/$hash/" "$here/summary.template" > "$out/summary.json"
"#,
        );
        let calls = || {
            std::fs::read_to_string(bin.join("calls"))
                .unwrap_or_default()
                .lines()
                .count()
        };
        let out = tmp.path().join("out");
        let args = |seed: &str| vec!["--seed".to_string(), seed.to_string()];

        // A stale result in the cell's directory is removed, with everything beside it.
        let dir = out.join("sgr_1_s1-10123456789a");
        write_summary(&dir, &summary("deadbeef"));
        std::fs::write(dir.join("stray"), "").unwrap();

        let r = run(&sgr, &out, "sgr λ=1 s1", &args("1"), &[]).unwrap();
        assert_eq!(r, RunResult::from_summary(&summary("x")));
        assert_eq!(calls(), 2, "--print-spec, then training");
        assert!(!dir.join("stray").exists());
        assert_eq!(read_summary(&dir).unwrap().spec_hash, "10123456789abcdef");
        assert_eq!(
            std::fs::read_to_string(dir.join("train.log")).unwrap(),
            "training\n"
        );

        run(&sgr, &out, "sgr λ=1 s1", &args("1"), &[]).unwrap();
        assert_eq!(calls(), 3, "reused: --print-spec only");

        run(&sgr, &out, "sgr λ=1 s1", &args("2"), &[]).unwrap();
        assert_eq!(calls(), 5, "another spec trains");
        assert!(out.join("sgr_1_s1-20123456789a/summary.json").exists());

        // An unfinished run with a checkpoint resumes; one without is removed and rerun.
        let dir3 = out.join("sgr_1_s1-30123456789a");
        std::fs::create_dir_all(&dir3).unwrap();
        for f in ["config.json", "checkpoint.safetensors"] {
            std::fs::write(dir3.join(f), "").unwrap();
        }
        std::fs::write(dir3.join("seed"), "3").unwrap();
        run(&sgr, &out, "sgr λ=1 s1", &args("3"), &[]).unwrap();
        let last = std::fs::read_to_string(bin.join("calls")).unwrap();
        assert!(
            last.lines().last().unwrap().starts_with("train --resume"),
            "{last}"
        );
        assert!(dir3.join("seed").exists(), "resumed in place, not removed");
        let dir4 = out.join("sgr_1_s1-40123456789a");
        std::fs::create_dir_all(&dir4).unwrap();
        std::fs::write(dir4.join("stray"), "").unwrap();
        run(&sgr, &out, "sgr λ=1 s1", &args("4"), &[]).unwrap();
        assert!(!dir4.join("stray").exists() && dir4.join("summary.json").exists());
    }

    /// Writes the executable stand-in script `dir/name` (a fake `sgr`, `python`, ...).
    #[cfg(unix)]
    pub(crate) fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Writes an executable stand-in `sgr` script into `dir`.
    #[cfg(unix)]
    fn fake_sgr(dir: &Path, text: &str) -> PathBuf {
        script(dir, "sgr", text)
    }

    /// `bench` against a stand-in `sgr bench` whose hash is its `--batch-size`: it measures
    /// once per spec, reads the cache after, and caches nothing for a failure.
    #[cfg(unix)]
    #[test]
    fn bench_measures_once_per_spec_and_caches_no_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        let sgr = fake_sgr(
            &bin,
            r#"#!/bin/sh
here=$(dirname "$0")
echo "$*" >> "$here/calls"
spec=0; batch=
while [ $# -gt 0 ]; do
  case "$1" in
    --print-spec) spec=1 ;;
    --batch-size) batch=$2; shift ;;
  esac
  shift
done
hash="${batch}00000000000000000"
if [ "$spec" = 1 ]; then
  printf '{"spec_hash":"%s","spec":{"batch":%s}}\n' "$hash" "$batch"; exit 0
fi
if [ "$batch" = 999 ]; then echo "out of memory" >&2; exit 137; fi
printf '{"model":"m","method":"bp","modules":1,"sgr_grad":null,"batch_size":%s,"input":[1,8,8],"steps":1,"median_step_seconds":0.5,"images_per_s":2,"step_seconds":[0.5],"peak_memory_bytes":null,"peak_heap_bytes":%s000,"spec_hash":"%s"}\n' "$batch" "$batch" "$hash"
"#,
        );
        let calls = || {
            std::fs::read_to_string(bin.join("calls"))
                .unwrap_or_default()
                .lines()
                .count()
        };
        let out = tmp.path().join("out");
        let args = |b: &str| vec!["--batch-size".to_string(), b.to_string()];
        let m = bench(&sgr, &out, "bp b8", &args("8")).unwrap();
        assert!(!m.cached);
        assert_eq!((m.report.batch_size, m.report.peak_heap_bytes), (8, 8000));
        assert_eq!(calls(), 2, "--print-spec, then the measurement");
        assert!(out.join("bp_b8-800000000000.json").exists());
        let again = bench(&sgr, &out, "bp b8", &args("8")).unwrap();
        assert!(again.cached);
        assert_eq!(again.report, m.report);
        assert_eq!(calls(), 3, "cached: --print-spec only");
        let e = format!(
            "{:#}",
            bench(&sgr, &out, "bp b999", &args("999")).unwrap_err()
        );
        assert!(e.contains("failed") && e.contains("out of memory"), "{e}");
        assert!(!out.join("bp_b999-999000000000.json").exists());
    }
}
