//! `cargo xtask reproduce <table> [--profile P] ...`: runs a table's grid, one `sgr` process
//! per cell, caches each cell under the hash of its specification, and prints the table with
//! the published numbers beside ours (docs/reproduce.md).

mod fit;
mod plan;
mod render;
mod table;
mod torch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::flags::Flags;
use crate::run::{bench, train_cell, write_atomic};
use plan::{Cell, Overrides, Plan};
use render::CellResult;
use table::{Kind, TableSpec};
use torch::TorchBp;

/// The flags `reproduce` takes (with a value), and its switches.
const FLAGS: [&str; 15] = [
    "profile",
    "data-dir",
    "out",
    "device",
    "models",
    "ks",
    "methods",
    "seeds",
    "epochs",
    "train-limit",
    "batch-size",
    "memory-budget",
    "reuse",
    "python",
    "torch-records",
];
const SWITCHES: [&str; 2] = ["dry-run", "save-torch-records"];

/// Share of the available memory a CPU memory profile may fill.
const CPU_BUDGET_FRACTION: f64 = 0.7;

/// The most images per step `sgr` accepts.
const MAX_BATCH: usize = 4096;

/// Usage line of `cargo xtask reproduce`.
pub const USAGE: &str = "cargo xtask reproduce <table> [--profile full|memory|fashion|smoke] \
[--data-dir DIR] [--out DIR] [--device cpu|cuda] [--models a,b] [--ks 2,4] [--methods m,n] \
[--seeds 0,1] [--epochs N] [--train-limit N] [--batch-size N] [--memory-budget GIB] \
[--reuse DIR]... [--python PATH] [--torch-records FILE] [--save-torch-records] [--dry-run] \
[-- <sgr train flags>]";

/// What `reproduce` takes from its environment: the binaries it runs.
#[derive(Debug, Clone, Default)]
struct Env {
    /// The `sgr` binary; built (or `$SGR`) when `None`.
    sgr: Option<PathBuf>,
    /// `$PYTHON`: the interpreter for PyTorch's bp when `--python` is not given.
    python: Option<PathBuf>,
    /// The PyTorch twin; `scripts/torch_reference.py` when `None`.
    torch_script: Option<PathBuf>,
}

/// Runs `cargo xtask reproduce`.
pub fn reproduce(args: &[String]) -> Result<()> {
    let env = Env {
        python: std::env::var_os("PYTHON")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        ..Env::default()
    };
    reproduce_with(args, &env)
}

fn reproduce_with(args: &[String], env: &Env) -> Result<()> {
    let dir = table::tables_dir(&crate::root());
    let Some(name) = args.first().filter(|a| !a.starts_with("--")) else {
        bail!(
            "which table? available: {}\nusage: {USAGE}",
            table::available(&dir).join(", ")
        );
    };
    let t = TableSpec::load(&dir, name)?;
    let f = Flags::parse_with(&args[1..], &FLAGS, &SWITCHES)?;
    let profile_name = f.get("profile").unwrap_or("full");
    let profile = t.profile(profile_name)?;
    let over = overrides(&f)?;
    let plan = Plan::new(profile, over)?;
    let out = f.get("out").map(PathBuf::from).unwrap_or_else(|| {
        crate::root()
            .join("target/reproduce")
            .join(name)
            .join(profile_name)
    });
    let reuse: Vec<PathBuf> = f.all("reuse").into_iter().map(PathBuf::from).collect();

    eprintln!(
        "xtask: {} — profile `{profile_name}`: {}",
        t.title, profile.about
    );
    if profile.kind == Kind::Train {
        check_data(&plan)?;
    }
    let device = plan.device().to_string();
    if !["cpu", "cuda"].contains(&device.as_str()) {
        bail!("--device must be cpu or cuda, got `{device}`");
    }
    let torch_flags = ["python", "torch-records", "save-torch-records"];
    if profile.kind != Kind::Memory {
        if let Some(flag) = torch_flags.iter().find(|n| f.has(n)) {
            bail!(
                "--{flag} is for memory profiles (the PyTorch bp column); `{profile_name}` trains"
            );
        }
    }
    let sgr = match &env.sgr {
        Some(p) => p.clone(),
        None => crate::build_sgr(device == "cuda")?,
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let sources = (profile.kind == Kind::Memory).then(|| {
        let python = f
            .get("python")
            .map(PathBuf::from)
            .or_else(|| env.python.clone())
            .unwrap_or_else(|| PathBuf::from("python3"));
        let script = env
            .torch_script
            .clone()
            .unwrap_or_else(|| crate::root().join("scripts/torch_reference.py"));
        let records = f
            .get("torch-records")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                crate::root()
                    .join("docs/results")
                    .join(format!("{name}-{profile_name}"))
                    .join("torch_bp.jsonl")
            });
        let s = torch::Sources::find(&python, &script, &records);
        eprintln!("xtask: {}", s.describe());
        s
    });
    let results = match profile.kind {
        Kind::Train => run_training(&plan, &sgr, &out, &reuse, f.has("dry-run"))?,
        Kind::Memory => run_memory(&plan, &sgr, &out, f.get("memory-budget"), f.has("dry-run"))?,
    };
    let Some(results) = results else {
        return Ok(());
    };
    let torch = match &sources {
        Some(s) => torch_references(&plan, s, &results, &out, f.has("save-torch-records"))?,
        None => Vec::new(),
    };
    finish(&t, profile_name, &plan, &sgr, &out, &results, &torch)
}

/// PyTorch's bp for every model and batch that has a measured cell (module [`torch`]), and
/// with `save`, the new measurements written into the records file.
fn torch_references(
    plan: &Plan,
    sources: &torch::Sources,
    results: &[CellResult],
    out: &Path,
    save: bool,
) -> Result<Vec<TorchBp>> {
    let p = &plan.profile;
    let threads = torch::sgr_threads();
    let mut done: Vec<TorchBp> = Vec::new();
    let mut measured = Vec::new();
    for r in results.iter().filter(|r| r.failed.is_none()) {
        if done
            .iter()
            .any(|t| t.key.model == r.model && t.key.batch_size == r.batch)
        {
            continue;
        }
        let key = torch::Key {
            model: r.model.clone(),
            input: p.input,
            classes: p.classes,
            batch_size: r.batch,
            threads,
            device: plan.device().to_string(),
        };
        let (bp, new) = sources.reference(&key, p.steps, out);
        eprintln!(
            "xtask: PyTorch bp of {}: {}",
            key.describe(),
            match bp.memory_mib {
                Some(m) => format!("{m:.0} MiB ({})", bp.source.word()),
                None => format!("n/a ({})", bp.detail),
            }
        );
        done.push(bp);
        measured.extend(new);
    }
    if save {
        if measured.is_empty() {
            eprintln!(
                "xtask: --save-torch-records: nothing was measured; {} is unchanged",
                sources.records_file.display()
            );
        } else {
            torch::save_records(&sources.records_file, &measured)?;
            eprintln!(
                "xtask: wrote {} PyTorch record(s) into {}",
                measured.len(),
                sources.records_file.display()
            );
        }
    }
    Ok(done)
}

/// The command line's changes to the profile.
fn overrides(f: &Flags) -> Result<Overrides> {
    let words = |name: &str| {
        f.get(name).map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
    };
    let number = |name: &str| -> Result<Option<usize>> {
        f.get(name)
            .map(|v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("--{name}: `{v}` is not a positive integer"))
            })
            .transpose()
    };
    Ok(Overrides {
        models: words("models"),
        ks: match f.get("ks") {
            Some(_) => Some(f.list("ks", "")?.into_iter().map(|k| k as usize).collect()),
            None => None,
        },
        methods: words("methods"),
        seeds: match f.get("seeds") {
            Some(_) => Some(f.list("seeds", "")?),
            None => None,
        },
        epochs: number("epochs")?,
        train_limit: number("train-limit")?,
        batch: number("batch-size")?,
        device: f.get("device").map(str::to_string),
        data_dir: f.get("data-dir").map(PathBuf::from),
        extra: f.rest.clone(),
    })
}

/// Checks the training data's folder before anything runs.
fn check_data(plan: &Plan) -> Result<()> {
    let Some(data) = &plan.profile.data else {
        return Ok(());
    };
    if !data.needs_dir() {
        return Ok(());
    }
    let (dir, given) = match (&plan.over.data_dir, &data.default_dir) {
        (Some(d), _) => (d.clone(), true),
        (None, Some(d)) => (d.clone(), false),
        (None, None) => bail!(
            "this profile trains on {} and needs --data-dir DIR, laid out as: {}",
            data.dataset,
            data.layout.as_deref().unwrap_or("(see docs/reproduce.md)")
        ),
    };
    data.check_dir(&dir, given)?;
    eprintln!(
        "xtask: data: {} in {}{}",
        data.dataset,
        dir.display(),
        data.layout
            .as_ref()
            .map(|l| format!(", expected as {l}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// `1h 05m`, `12m 30s`, `40s`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s:02}s"),
        (h, m, _) => format!("{h}h {m:02}m"),
    }
}

/// Time left: the estimates of the cells left, scaled by how the cells run so far compared
/// with their estimates; without estimates, the mean time of the cells run so far.
#[derive(Debug, Default)]
struct Eta {
    spent: f64,
    estimated_spent: f64,
    ran: usize,
}

impl Eta {
    fn record(&mut self, seconds: f64, estimate: Option<f64>) {
        self.spent += seconds;
        self.ran += 1;
        self.estimated_spent += estimate.unwrap_or(seconds);
    }

    fn left(&self, estimates: &[Option<f64>]) -> Option<f64> {
        let ratio = if self.estimated_spent > 0.0 {
            self.spent / self.estimated_spent
        } else {
            1.0
        };
        let mean = (self.ran > 0).then(|| self.spent / self.ran as f64);
        estimates
            .iter()
            .map(|e| e.map(|e| e * ratio).or(mean))
            .sum::<Option<f64>>()
    }
}

fn progress(done: usize, total: usize, left: Option<f64>, what: &str) {
    eprintln!(
        "xtask: [{done}/{total} cells done, {} left{}] {what}",
        total - done,
        left.map(|s| format!(", about {} to go", duration(s)))
            .unwrap_or_default()
    );
}

/// Training profiles: estimate, then run every cell (or print the plan with `--dry-run`).
fn run_training(
    plan: &Plan,
    sgr: &Path,
    out: &Path,
    reuse: &[PathBuf],
    dry_run: bool,
) -> Result<Option<Vec<CellResult>>> {
    let batch = plan.batch().unwrap_or(1);
    let mut pending: Vec<(usize, Option<f64>)> = Vec::new();
    for (i, c) in plan.cells.iter().enumerate() {
        let spec = crate::run::print_spec(sgr, &plan.train_args(c))?;
        let dir = crate::run::cell_dir(out, &c.name(), &spec.spec_hash);
        let finished = matches!(
            crate::run::inspect(&dir, &spec.spec_hash)?,
            crate::run::CellState::Finished(_)
        ) || crate::run::find_finished(reuse, &spec.spec_hash)?.is_some();
        if finished {
            continue;
        }
        let estimate = match plan.steps(c) {
            Some(n) => {
                let r = bench(
                    sgr,
                    &out.join("estimates"),
                    &c.name(),
                    &plan.bench_args(c, batch, 1),
                )
                .with_context(|| format!("timing a step of {} for the estimate", c.name()))?;
                Some(r.report.median_step_seconds * n as f64)
            }
            None => None,
        };
        pending.push((i, estimate));
    }
    let total: Option<f64> = pending.iter().map(|p| p.1).sum();
    eprintln!(
        "xtask: {} cells, {} already finished, {} to run; estimated time of their training \
         steps: {} (one step of each timed on {}; evaluation not included)",
        plan.cells.len(),
        plan.cells.len() - pending.len(),
        pending.len(),
        total.map_or("unknown".into(), duration),
        plan.device()
    );
    if dry_run {
        for (i, e) in &pending {
            let c = &plan.cells[*i];
            println!(
                "{}  (about {})\n  sgr train {}",
                c.name(),
                e.map_or("?".into(), duration),
                plan.train_args(c).join(" ")
            );
        }
        return Ok(None);
    }
    let mut eta = Eta::default();
    let mut results = Vec::new();
    for (i, c) in plan.cells.iter().enumerate() {
        let estimate = pending.iter().find(|p| p.0 == i).map(|p| p.1);
        let left: Vec<Option<f64>> = pending.iter().filter(|p| p.0 >= i).map(|p| p.1).collect();
        if estimate.is_some() {
            progress(
                i,
                plan.cells.len(),
                eta.left(&left),
                &format!("training {}", c.name()),
            );
        }
        let start = Instant::now();
        let r = train_cell(sgr, out, &c.name(), &plan.train_args(c), reuse);
        if let Some(e) = estimate {
            eta.record(start.elapsed().as_secs_f64(), e);
        }
        results.push(match r {
            Ok(s) => train_result(c, batch, out, &s),
            Err(e) => {
                eprintln!("xtask: {} failed: {e:#}", c.name());
                failed(c, batch, format!("{e:#}"))
            }
        });
    }
    Ok(Some(results))
}

fn train_result(c: &Cell, batch: usize, out: &Path, s: &sgr_schema::Summary) -> CellResult {
    let cos = &s.final_boundary_cos;
    CellResult {
        path: crate::run::cell_dir(out, &c.name(), &s.spec_hash)
            .display()
            .to_string(),
        error_pct: Some(100.0 * s.test_error),
        memory_mib: s.peak_memory_bytes.map(mib),
        step_seconds: (s.steps > 0).then(|| s.train_seconds / s.steps as f64),
        mean_cos: (!cos.is_empty()).then(|| cos.iter().sum::<f64>() / cos.len() as f64),
        failed: None,
        ..cell_result(c, batch)
    }
}

fn cell_result(c: &Cell, batch: usize) -> CellResult {
    CellResult {
        model: c.model.clone(),
        label: c.label.clone(),
        reference_model: c.reference_model.clone(),
        method: c.method.clone(),
        k: c.k,
        seed: c.seed,
        batch,
        path: String::new(),
        error_pct: None,
        memory_mib: None,
        peak_rss_mib: None,
        step_seconds: None,
        mean_cos: None,
        failed: None,
    }
}

fn failed(c: &Cell, batch: usize, why: String) -> CellResult {
    CellResult {
        failed: Some(why),
        ..cell_result(c, batch)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The training memory of a measurement: the device's peak on a GPU, the heap's on the CPU.
fn step_memory(r: &sgr_schema::BenchReport) -> u64 {
    r.peak_device_memory_bytes.unwrap_or(r.peak_heap_bytes)
}

/// Memory profiles: per model, the batch (fixed or fitted), then a measurement per cell.
fn run_memory(
    plan: &Plan,
    sgr: &Path,
    out: &Path,
    budget_flag: Option<&str>,
    dry_run: bool,
) -> Result<Option<Vec<CellResult>>> {
    let steps = plan.profile.steps;
    let mut batches: BTreeMap<String, usize> = BTreeMap::new();
    let budget = match (plan.batch(), budget_flag) {
        (Some(_), _) => None,
        (None, Some(b)) => Some(fit::parse_budget(b)?),
        (None, None) if plan.device() == "cpu" => Some(fit::cpu_budget(CPU_BUDGET_FRACTION)?),
        (None, None) => bail!(
            "the batch is fitted to the memory: pass --memory-budget GIB (the GPU's memory, \
             less a margin) or --batch-size N"
        ),
    };
    if let Some(b) = budget {
        eprintln!(
            "xtask: memory budget {} MiB{}",
            b >> 20,
            if budget_flag.is_none() {
                format!(
                    " ({:.0} % of the memory available now)",
                    CPU_BUDGET_FRACTION * 100.0
                )
            } else {
                String::new()
            }
        );
    }
    if dry_run {
        for c in &plan.cells {
            println!(
                "{}\n  sgr bench {}",
                c.name(),
                plan.bench_args(c, plan.batch().unwrap_or(0), steps)
                    .join(" ")
            );
        }
        return Ok(None);
    }
    let mut eta = Eta::default();
    let mut results = Vec::new();
    for (i, c) in plan.cells.iter().enumerate() {
        let batch = match (plan.batch(), batches.get(&c.model)) {
            (Some(b), _) => b,
            (None, Some(&b)) => b,
            (None, None) => {
                let probe = Cell {
                    method: "bp".into(),
                    k: 1,
                    ..c.clone()
                };
                let (b, m) = fit::fit(budget.unwrap_or(u64::MAX), MAX_BATCH, |batch| {
                    eprintln!(
                        "xtask: fitting the batch of {}: bp at batch {batch}",
                        c.model
                    );
                    let r = bench(
                        sgr,
                        out,
                        &probe.name(),
                        &plan.bench_args(&probe, batch, steps),
                    )?;
                    Ok(step_memory(&r.report))
                })
                .with_context(|| format!("fitting the batch of {}", c.model))?;
                eprintln!(
                    "xtask: {}: batch {b} (bp step {} MiB, the largest under the budget)",
                    c.model,
                    m >> 20
                );
                batches.insert(c.model.clone(), b);
                b
            }
        };
        let left: Vec<Option<f64>> = vec![None; plan.cells.len() - i];
        progress(
            i,
            plan.cells.len(),
            eta.left(&left),
            &format!("measuring {} at batch {batch}", c.name()),
        );
        let start = Instant::now();
        let r = bench(sgr, out, &c.name(), &plan.bench_args(c, batch, steps));
        if r.as_ref().is_ok_and(|m| !m.cached) {
            eta.record(start.elapsed().as_secs_f64(), None);
        }
        results.push(match r.map(|m| m.report) {
            Ok(r) => CellResult {
                path: out.display().to_string(),
                memory_mib: Some(mib(step_memory(&r))),
                peak_rss_mib: r.peak_memory_bytes.map(mib),
                step_seconds: Some(r.median_step_seconds),
                ..cell_result(c, batch)
            },
            Err(e) => {
                eprintln!("xtask: {} failed: {e:#}", c.name());
                failed(c, batch, format!("{e:#}"))
            }
        });
    }
    Ok(Some(results))
}

/// Writes `table.md`, `table.json` and the picture, prints the table, and fails when a cell
/// did.
fn finish(
    t: &TableSpec,
    profile_name: &str,
    plan: &Plan,
    sgr: &Path,
    out: &Path,
    results: &[CellResult],
    torch: &[TorchBp],
) -> Result<()> {
    let p = &plan.profile;
    let mut batches: Vec<String> = Vec::new();
    for r in results {
        let s = format!("{} {}", r.label, r.batch);
        if !batches.contains(&s) {
            batches.push(s);
        }
    }
    let recipe = match p.kind {
        Kind::Train => format!(
            "Epochs: {}. Training images: {}. Batch: {}.",
            epochs_text(plan),
            plan.train_images()
                .map_or("all".to_string(), |n| n.to_string()),
            plan.batch().unwrap_or(0)
        ),
        Kind::Memory => format!(
            "Random inputs of shape {:?}, {} classes; per cell one warm-up step, then timed steps: {}; batch per model: {}; compute threads: {}.",
            p.input,
            p.classes,
            p.steps,
            batches.join(", "),
            torch::sgr_threads()
        ),
    };
    let ctx = render::Context {
        table: t,
        profile: profile_name,
        kind: p.kind,
        about: &p.about,
        substitute: p.data.as_ref().and_then(|d| d.substitute.as_deref()),
        device: plan.device(),
        seeds: &plan.over.seeds.clone().unwrap_or_else(|| p.seeds.clone()),
        recipe,
        not_run: &p.not_run,
        torch,
    };
    let mut rows = render::rows(results);
    rows.extend(render::unrun_reference_rows(t, &rows));
    let md = render::markdown(&ctx, &rows);
    write_atomic(&out.join("table.md"), md.as_bytes())?;
    let json = serde_json::json!({
        "table": t.title,
        "profile": profile_name,
        "device": plan.device(),
        "cells": results,
        "rows": render::rows_json(&ctx, &rows),
        "torch_bp": torch,
    });
    write_atomic(
        &out.join("table.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    if let (Some(plot), Kind::Train) = (&t.plot, p.kind) {
        if let Some(chart) = render::chart(&ctx, &rows) {
            let data = out.join(&plot.file).with_extension("chart.json");
            write_atomic(&data, serde_json::to_string_pretty(&chart)?.as_bytes())?;
            let png = out.join(&plot.file);
            let status = std::process::Command::new(sgr)
                .args(["plot", "--lines"])
                .arg(&data)
                .arg("--out")
                .arg(&png)
                .stdout(std::process::Stdio::null())
                .status()
                .context("running sgr plot")?;
            if !status.success() {
                bail!("sgr plot --lines {} failed", data.display());
            }
            eprintln!("xtask: wrote {}", png.display());
        }
    }
    println!("{md}");
    eprintln!(
        "xtask: wrote {} and table.json",
        out.join("table.md").display()
    );
    let failures = results.iter().filter(|r| r.failed.is_some()).count();
    if failures > 0 {
        bail!("{failures} cells failed (listed under the table)");
    }
    Ok(())
}

/// The epochs of the plan's cells: one number, or per model.
fn epochs_text(plan: &Plan) -> String {
    let mut per: Vec<(String, usize)> = Vec::new();
    for c in &plan.cells {
        if !per.iter().any(|(l, _)| *l == c.label) {
            per.push((c.label.clone(), plan.epochs(c)));
        }
    }
    if per.windows(2).all(|w| w[0].1 == w[1].1) {
        per.first().map_or("0".into(), |p| p.1.to_string())
    } else {
        per.iter()
            .map(|(l, e)| format!("{e} ({l})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(40.4), "40s");
        assert_eq!(duration(750.0), "12m 30s");
        assert_eq!(duration(3900.0), "1h 05m");
    }

    #[test]
    fn time_left_scales_estimates_by_the_cells_run_so_far() {
        let mut eta = Eta::default();
        assert_eq!(eta.left(&[Some(10.0), Some(20.0)]), Some(30.0));
        assert_eq!(eta.left(&[None]), None);
        eta.record(20.0, Some(10.0));
        assert_eq!(eta.left(&[Some(10.0), Some(20.0)]), Some(60.0));
        assert_eq!(eta.left(&[None, None]), Some(40.0));
    }

    #[test]
    fn bad_command_lines_say_what_exists() {
        let e = reproduce(&["table7".into()]).unwrap_err().to_string();
        assert!(
            e.contains("unknown table `table7`; available: table1, table2"),
            "{e}"
        );
        let e = reproduce(&[]).unwrap_err().to_string();
        assert!(e.contains("which table? available: table1, table2"), "{e}");
        let e = reproduce(&["table1".into(), "--profile".into(), "quick".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown profile `quick`"), "{e}");
        let e = reproduce(&["table1".into(), "--seeds".into(), "0,x".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--seeds"), "{e}");
        let missing = std::env::temp_dir().join("sgr-xtask-no-such-cifar");
        let e = reproduce(&[
            "table1".into(),
            "--data-dir".into(),
            missing.display().to_string(),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("is not a folder") && e.contains("data_batch_1.bin"),
            "{e}"
        );
        let e = reproduce(&["table2".into()]).unwrap_err().to_string();
        assert!(
            e.contains("needs --data-dir DIR") && e.contains("train/"),
            "{e}"
        );
    }

    /// A stand-in `sgr bench` whose hash is its method and batch: bp's process peaks at 1000
    /// MiB RSS (800 MiB heap), a local method's at 500 MiB (300 MiB heap).
    #[cfg(unix)]
    const FAKE_SGR_BENCH: &str = r#"#!/bin/sh
spec=0; batch=; method=
while [ $# -gt 0 ]; do
  case "$1" in
    --print-spec) spec=1 ;;
    --batch-size) batch=$2; shift ;;
    --method) method=$2; shift ;;
  esac
  shift
done
case "$method" in bp) m=1; rss=1000; heap=800 ;; *) m=2; rss=500; heap=300 ;; esac
hash="${m}${batch}abcdef0123456789"
if [ "$spec" = 1 ]; then
  printf '{"spec_hash":"%s","spec":{"batch":%s}}\n' "$hash" "$batch"; exit 0
fi
printf '{"model":"deit-s","method":"%s","modules":1,"sgr_grad":null,"batch_size":%s,"input":[3,224,224],"steps":1,"median_step_seconds":0.5,"images_per_s":2,"step_seconds":[0.5],"peak_memory_bytes":%s,"peak_heap_bytes":%s,"spec_hash":"%s"}\n' "$method" "$batch" $((rss * 1048576)) $((heap * 1048576)) "$hash"
"#;

    /// `cargo xtask reproduce table2 --profile memory` for deit-s bp and greedy K = 2 at batch
    /// 8 against the stand-in `sgr`, with a stand-in python (with or without torch) and a
    /// records file holding `records`; returns table.md and table.json.
    #[cfg(unix)]
    fn memory_table(
        torch: bool,
        records: &[String],
        extra: &[&str],
    ) -> (String, serde_json::Value, tempfile::TempDir) {
        use crate::run::tests::script;
        use torch::tests::{FAKE_PYTHON, FAKE_TWIN};
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        let sgr = script(&bin, "sgr", FAKE_SGR_BENCH);
        script(&bin, "python", FAKE_PYTHON);
        let twin = script(&bin, "torch_reference.py", FAKE_TWIN);
        if !torch {
            std::fs::write(bin.join("no-torch"), "").unwrap();
        }
        let rec = tmp.path().join("torch_bp.jsonl");
        if !records.is_empty() {
            std::fs::write(&rec, records.join("\n")).unwrap();
        }
        let out = tmp.path().join("out");
        let mut args: Vec<String> = [
            "table2",
            "--profile",
            "memory",
            "--models",
            "deit-s",
            "--methods",
            "bp,greedy",
            "--ks",
            "2",
            "--batch-size",
            "8",
            "--out",
            &out.display().to_string(),
            "--torch-records",
            &rec.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = Env {
            sgr: Some(sgr),
            python: Some(bin.join("python")),
            torch_script: Some(twin),
        };
        reproduce_with(&args, &env).unwrap();
        let md = std::fs::read_to_string(out.join("table.md")).unwrap();
        let json = serde_json::from_str(&std::fs::read_to_string(out.join("table.json")).unwrap())
            .unwrap();
        (md, json, tmp)
    }

    /// A committed record of PyTorch's bp of deit-s on this process's threads.
    #[cfg(unix)]
    fn record(batch: usize, rss_mib: u64) -> String {
        format!(
            "{{\"implementation\":\"pytorch 2.9.0\",\"model\":\"deit-s\",\"method\":\"bp\",\
             \"input\":[3,224,224],\"classes\":1000,\"batch_size\":{batch},\"threads\":{},\
             \"device\":\"cpu\",\"steps\":1,\"peak_memory_bytes\":{}}}",
            torch::sgr_threads(),
            rss_mib << 20
        )
    }

    #[cfg(unix)]
    #[test]
    fn memory_profile_with_torch_measures_pytorch_bp() {
        // The twin measures 100 MiB per image: 800 MiB at batch 8; the record's 2000 is unused.
        let (md, json, tmp) = memory_table(true, &[record(8, 2000)], &["--save-torch-records"]);
        assert!(
            md.contains("| peak RSS MiB | saving vs PyTorch bp |"),
            "{md}"
        );
        assert!(
            md.contains("| deit-s | bp | 1 | – | 800 | – | 1000 | -25 % (measured) |"),
            "{md}"
        );
        assert!(
            md.contains("| deit-s | greedy | 2 | – | 300 | 62 % | 500 | 38 % (measured) |"),
            "{md}"
        );
        assert!(md.contains("RSS against RSS"), "{md}");
        assert!(
            md.contains(": 800 MiB, measured (pytorch 2.15.0-fake;"),
            "{md}"
        );
        let rows = json["rows"].as_array().unwrap();
        assert_eq!(rows[1]["saving_vs_torch_bp_pct"], 37.5);
        assert_eq!(rows[1]["torch_bp_source"], "measured");
        assert_eq!(rows[1]["saving_vs_bp_pct"], 62.5);
        assert_eq!(json["torch_bp"][0]["source"], "measured");
        assert_eq!(json["torch_bp"][0]["memory_mib"], 800.0);
        assert_eq!(json["cells"][1]["peak_rss_mib"], 500.0);
        // --save-torch-records replaced the record of the same key with the measurement.
        let saved = torch::load_records(&tmp.path().join("torch_bp.jsonl")).unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].1.peak_memory_bytes, 800 << 20);
        assert_eq!(saved[0].1.implementation, "pytorch 2.15.0-fake");
    }

    #[cfg(unix)]
    #[test]
    fn memory_profile_without_torch_reads_the_records_and_labels_them() {
        let (md, json, _tmp) = memory_table(false, &[record(16, 900), record(8, 2000)], &[]);
        assert!(
            md.contains("| deit-s | greedy | 2 | – | 300 | 62 % | 500 | 75 % (record) |"),
            "{md}"
        );
        assert!(
            md.contains("| deit-s | bp | 1 | – | 800 | – | 1000 | 50 % (record) |"),
            "{md}"
        );
        assert!(
            md.contains(": 2000 MiB, record (pytorch 2.9.0; record ")
                && md.contains("torch_bp.jsonl line 2; no PyTorch to measure with"),
            "{md}"
        );
        assert!(!md.contains("measured)"), "{md}");
        assert_eq!(json["rows"][1]["torch_bp_source"], "record");
        assert_eq!(json["rows"][1]["saving_vs_torch_bp_pct"], 75.0);
    }

    #[cfg(unix)]
    #[test]
    fn memory_profile_without_torch_or_a_record_prints_na() {
        let (md, json, _tmp) = memory_table(false, &[record(16, 900)], &[]);
        assert!(
            md.contains("| deit-s | greedy | 2 | – | 300 | 62 % | 500 | n/a † |"),
            "{md}"
        );
        assert!(md.contains("batch 8") && md.contains(": n/a †"), "{md}");
        assert!(
            md.contains(
                "† No PyTorch bp number for deit-s, input 3×224×224, 1000 classes, batch 8"
            ) && md.contains("No module named 'torch'")
                && md.contains("which has deit-s, input 3×224×224, 1000 classes, batch 16"),
            "{md}"
        );
        assert!(json["rows"][1]["saving_vs_torch_bp_pct"].is_null());
        assert_eq!(json["rows"][1]["torch_bp_source"], "n/a");
        assert_eq!(json["torch_bp"][0]["source"], "n/a");
        assert!(json["torch_bp"][0]["memory_mib"].is_null());
    }

    #[test]
    fn torch_flags_are_for_memory_profiles() {
        let e = reproduce(&[
            "table1".into(),
            "--profile".into(),
            "smoke".into(),
            "--python".into(),
            "python3".into(),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--python is for memory profiles"), "{e}");
    }
}
