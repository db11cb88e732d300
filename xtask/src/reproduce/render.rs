//! The finished table: one row per model, method and K (seeds averaged), as Markdown with the
//! published numbers beside ours, as JSON, and as the data of its picture.

use serde::{Deserialize, Serialize};
use sgr_schema::{LineChart, Series};

use super::table::{Kind, Reference, TableSpec};
use super::torch::{Source, TorchBp};

/// The outcome of one cell, as `table.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// `--model`.
    pub model: String,
    /// The model's name in the table.
    pub label: String,
    /// The model the published numbers are of.
    pub reference_model: String,
    /// `--method`.
    pub method: String,
    /// Modules K.
    pub k: usize,
    /// Seed.
    pub seed: u64,
    /// Images per step.
    pub batch: usize,
    /// Where the run or the measurement is.
    pub path: String,
    /// Top-1 test error in percent (training cells).
    pub error_pct: Option<f64>,
    /// Peak training memory in MiB (see [`memory_note`]).
    pub memory_mib: Option<f64>,
    /// Peak resident memory of the whole `sgr bench` process in MiB (memory cells): what the
    /// CPU's "saving vs PyTorch bp" compares (see [`torch_note`]).
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// Seconds per training step.
    pub step_seconds: Option<f64>,
    /// Mean over boundaries of the last epoch's cos(a, b).
    pub mean_cos: Option<f64>,
    /// Why the cell has no result, when it failed.
    pub failed: Option<String>,
}

/// One row of the table: the cells of one model, method and K over the seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The model's name in the table.
    pub label: String,
    /// `--model`.
    pub model: String,
    /// Images per step.
    pub batch: usize,
    /// The model the published numbers are of.
    pub reference_model: String,
    /// Method.
    pub method: String,
    /// K.
    pub k: usize,
    /// Test errors of the seeds that finished.
    pub errors: Vec<f64>,
    /// Mean peak memory (MiB).
    pub memory: Option<f64>,
    /// Mean peak resident memory of the process (MiB, memory cells).
    pub rss: Option<f64>,
    /// Mean seconds per step.
    pub step: Option<f64>,
    /// Mean boundary cos.
    pub cos: Option<f64>,
    /// Failures, one line each.
    pub failed: Vec<String>,
}

/// Groups results into rows, in the order their first cell appears.
pub fn rows(results: &[CellResult]) -> Vec<Row> {
    let mut rows: Vec<(Row, Vec<&CellResult>)> = Vec::new();
    for r in results {
        let same = |row: &Row| row.label == r.label && row.method == r.method && row.k == r.k;
        match rows.iter_mut().find(|(row, _)| same(row)) {
            Some((_, cells)) => cells.push(r),
            None => rows.push((
                Row {
                    label: r.label.clone(),
                    model: r.model.clone(),
                    batch: r.batch,
                    reference_model: r.reference_model.clone(),
                    method: r.method.clone(),
                    k: r.k,
                    errors: vec![],
                    memory: None,
                    rss: None,
                    step: None,
                    cos: None,
                    failed: vec![],
                },
                vec![r],
            )),
        }
    }
    rows.into_iter()
        .map(|(mut row, cells)| {
            let mean = |f: &dyn Fn(&CellResult) -> Option<f64>| {
                let v: Vec<f64> = cells.iter().filter_map(|c| f(c)).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            row.errors = cells.iter().filter_map(|c| c.error_pct).collect();
            row.memory = mean(&|c| c.memory_mib);
            row.rss = mean(&|c| c.peak_rss_mib);
            row.step = mean(&|c| c.step_seconds);
            row.cos = mean(&|c| c.mean_cos);
            row.failed = cells
                .iter()
                .filter_map(|c| c.failed.as_ref().map(|f| format!("seed {}: {f}", c.seed)))
                .collect();
            row
        })
        .collect()
}

/// Rows for the published numbers of the grid's models and Ks that no cell measured (the
/// table's `show_unrun_references`): methods sgr does not run there still show their numbers.
pub fn unrun_reference_rows(t: &TableSpec, rows: &[Row]) -> Vec<Row> {
    let mut extra = Vec::new();
    if !t.show_unrun_references {
        return extra;
    }
    for r in &t.reference {
        let Some(model_row) = rows.iter().find(|row| row.reference_model == r.model) else {
            continue;
        };
        for &k in &r.ks {
            let measured = rows
                .iter()
                .any(|row| row.reference_model == r.model && row.method == r.method && row.k == k);
            if !measured {
                extra.push(Row {
                    label: model_row.label.clone(),
                    model: model_row.model.clone(),
                    batch: model_row.batch,
                    reference_model: r.model.clone(),
                    method: r.method.clone(),
                    k,
                    errors: vec![],
                    memory: None,
                    rss: None,
                    step: None,
                    cos: None,
                    failed: vec![],
                });
            }
        }
    }
    extra
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, None);
    }
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, Some(var.sqrt()))
}

/// What the renderer needs to know about the run beside the results.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The table.
    pub table: &'a TableSpec,
    /// The profile's name.
    pub profile: &'a str,
    /// What the profile measures.
    pub kind: Kind,
    /// The profile's description.
    pub about: &'a str,
    /// The stand-in data set note, when the data is not the paper's.
    pub substitute: Option<&'a str>,
    /// Where it ran.
    pub device: &'a str,
    /// Seeds.
    pub seeds: &'a [u64],
    /// Epochs and training images (training profiles).
    pub recipe: String,
    /// Why methods are missing.
    pub not_run: &'a [String],
    /// PyTorch's bp per model and batch (memory profiles; empty otherwise).
    pub torch: &'a [TorchBp],
}

/// What the memory column measures.
pub fn memory_note(kind: Kind) -> &'static str {
    match kind {
        Kind::Memory => {
            "peak memory: the highest live heap bytes of the training step (warm-up step \
             included): weights, optimizer state, the batch, activations and gradients, as \
             `sgr bench` counts them with its counting allocator; on CUDA, the peak device \
             memory allocated"
        }
        Kind::Train => {
            "peak memory: the peak resident memory of the whole training process (the data set \
             in memory and evaluation included), as `summary.json` reports it"
        }
    }
}

/// What the "saving vs PyTorch bp" column compares on `device`.
pub fn torch_note(device: &str) -> String {
    let ours = if device == "cuda" {
        "this row's peak device memory allocated (the memory column) against PyTorch's \
         `torch.cuda.max_memory_allocated` over the same warm-up and timed steps: device memory \
         against device memory"
    } else {
        "this row's peak resident memory (RSS) of the whole `sgr bench` process (the RSS column) \
         against the peak RSS (ru_maxrss) of the whole `scripts/torch_reference.py --method bp` \
         process: RSS against RSS, both whole processes (runtime and libraries, weights, \
         optimizer state, batch, activations, gradients), since PyTorch has no counting \
         allocator. The heap column and its saving vs bp compare sgr with sgr's own bp"
    };
    format!(
        "Saving vs PyTorch bp: 1 − ours / PyTorch's bp at the same model, input, classes, batch, \
         thread count and device; ours is {ours}. Beside each saving, where PyTorch's number came \
         from: `measured` (by scripts/torch_reference.py on this machine) or `record` (a \
         committed measurement, docs/reproduce.md)"
    )
}

/// PyTorch's bp of `row`'s model and batch, when the run looked for one.
fn torch_of<'a>(ctx: &Context<'a>, row: &Row) -> Option<&'a TorchBp> {
    ctx.torch
        .iter()
        .find(|t| t.key.model == row.model && t.key.batch_size == row.batch)
}

/// 1 − memory / bp's, in percent, against sgr's bp of the same model.
fn saving_vs_bp(row: &Row, rows: &[Row]) -> Option<f64> {
    let bp = rows
        .iter()
        .find(|r| r.label == row.label && r.method == "bp")
        .and_then(|r| r.memory)?;
    match row.memory {
        Some(m) if row.method != "bp" && bp > 0.0 => Some(100.0 * (1.0 - m / bp)),
        _ => None,
    }
}

/// The "saving vs PyTorch bp" of a row.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TorchSaving {
    /// No number of ours to compare, or no PyTorch column in this profile.
    None,
    /// PyTorch's number is missing (footnote).
    Missing,
    /// The saving in percent, and where PyTorch's number came from.
    Saving(f64, Source),
}

fn saving_vs_torch(ctx: &Context, row: &Row) -> TorchSaving {
    if ctx.kind != Kind::Memory {
        return TorchSaving::None;
    }
    let ours = if ctx.device == "cuda" {
        row.memory
    } else {
        row.rss
    };
    let Some(ours) = ours else {
        return TorchSaving::None;
    };
    match torch_of(ctx, row) {
        Some(TorchBp {
            memory_mib: Some(t),
            source,
            ..
        }) if *t > 0.0 => TorchSaving::Saving(100.0 * (1.0 - ours / t), *source),
        _ => TorchSaving::Missing,
    }
}

/// The rows as `table.json` records them: what the Markdown shows, the savings as numbers.
pub fn rows_json(ctx: &Context, rows: &[Row]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|row| {
            let (torch_saving, torch_source) = match saving_vs_torch(ctx, row) {
                TorchSaving::Saving(s, src) => (Some(s), Some(src)),
                TorchSaving::Missing => (None, Some(Source::Missing)),
                TorchSaving::None => (None, None),
            };
            serde_json::json!({
                "label": row.label,
                "model": row.model,
                "method": row.method,
                "k": row.k,
                "batch": row.batch,
                "errors_pct": row.errors,
                "memory_mib": row.memory,
                "peak_rss_mib": row.rss,
                "saving_vs_bp_pct": saving_vs_bp(row, rows),
                "saving_vs_torch_bp_pct": torch_saving,
                "torch_bp_source": torch_source,
                "step_seconds": row.step,
                "mean_cos": row.cos,
            })
        })
        .collect()
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// Renders the rows as Markdown, with reference columns and their sources.
pub fn markdown(ctx: &Context, rows: &[Row]) -> String {
    let t = ctx.table;
    let mut sources: Vec<String> = Vec::new();
    let mut cite = |r: &Reference| -> usize {
        match sources.iter().position(|s| *s == r.source) {
            Some(i) => i + 1,
            None => {
                sources.push(r.source.clone());
                sources.len()
            }
        }
    };
    let mut md = format!(
        "## {} — profile `{}`\n\n{}\n\n",
        t.title, ctx.profile, t.about
    );
    md.push_str(&format!("> **Profile `{}`**: {}", ctx.profile, ctx.about));
    if let Some(s) = ctx.substitute {
        md.push_str(&format!(
            " **Substitute data set:** {s} The published columns are on the paper's data and \
             are not comparable number for number."
        ));
    }
    if ctx.profile == "smoke" {
        md.push_str(
            " **Smoke run:** scaled-down models and data check that every cell runs end to end; \
             the numbers say nothing about the methods.",
        );
    }
    md.push_str(&format!(
        "\n>\n> Device: {}. Seeds: {:?}. {}\n\n",
        ctx.device, ctx.seeds, ctx.recipe
    ));
    let has_paper = rows.iter().any(|r| is_sgr(&r.method));
    // Memory profiles: PyTorch's bp beside sgr's (and, on the CPU, the RSS it is compared with).
    let torch_columns: &[&str] = match (ctx.kind, ctx.device) {
        (Kind::Memory, "cuda") => &["saving vs PyTorch bp"],
        (Kind::Memory, _) => &["peak RSS MiB", "saving vs PyTorch bp"],
        (Kind::Train, _) => &[],
    };
    md.push_str("| model | method | K | top-1 error % | peak memory MiB | saving vs bp |");
    for c in torch_columns {
        md.push_str(&format!(" {c} |"));
    }
    md.push_str(" s/step | boundary cos | published error % | published memory GB |");
    if has_paper {
        md.push_str(" SGR paper error % |");
    }
    md.push('\n');
    md.push_str(&"|---".repeat(10 + torch_columns.len()));
    md.push('|');
    if has_paper {
        md.push_str("---|");
    }
    md.push('\n');
    let mut missing_torch = false;
    for row in rows {
        let saving = saving_vs_bp(row, rows).map_or("–".into(), |s| format!("{s:.0} %"));
        let mut torch_cells = String::new();
        if !torch_columns.is_empty() {
            if torch_columns.len() == 2 {
                torch_cells.push_str(&format!(" {} |", fmt(row.rss, 0)));
            }
            torch_cells.push_str(&match saving_vs_torch(ctx, row) {
                TorchSaving::Saving(s, src) => format!(" {s:.0} % ({}) |", src.word()),
                TorchSaving::Missing => {
                    missing_torch = true;
                    " n/a † |".into()
                }
                TorchSaving::None => " – |".into(),
            });
        }
        let error = if !row.failed.is_empty() && row.errors.is_empty() && row.memory.is_none() {
            "failed".to_string()
        } else if row.failed.is_empty() && row.memory.is_none() && row.errors.is_empty() {
            "not run".to_string()
        } else if row.errors.is_empty() {
            "–".into()
        } else {
            match mean_std(&row.errors) {
                (m, Some(s)) => format!("{m:.2} ± {s:.2}"),
                (m, None) => format!("{m:.2}"),
            }
        };
        let reference = t.reference.iter().find(|r| {
            r.model == row.reference_model && r.method == row.method && r.ks.contains(&row.k)
        });
        let (pub_err, pub_mem) = match reference {
            Some(r) => {
                let n = cite(r);
                let (e, m) = r.at(row.k);
                (
                    e.map_or("–".into(), |e| format!("{e:.2} [{n}]")),
                    m.map_or("–".into(), |m| format!("{m:.2} [{n}]")),
                )
            }
            None => ("–".into(), "–".into()),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |{} {} | {} | {} | {} |",
            row.label,
            row.method,
            row.k,
            error,
            fmt(row.memory, 0),
            saving,
            torch_cells,
            fmt(row.step, 3),
            fmt(row.cos, 2),
            pub_err,
            pub_mem
        ));
        if has_paper {
            let paper = t
                .paper
                .iter()
                .find(|r| r.model == row.reference_model && r.method == row.method)
                .and_then(|r| r.at(row.k).0);
            md.push_str(&match (is_sgr(&row.method), paper) {
                (false, _) => " – |".to_string(),
                (true, Some(e)) => format!(" {e:.2} |"),
                (true, None) => " n/a |".to_string(),
            });
        }
        md.push('\n');
    }
    md.push('\n');
    md.push_str(&format!("{}.\n", capitalise(memory_note(ctx.kind))));
    if !torch_columns.is_empty() {
        md.push_str(&format!("\n{}.\n", torch_note(ctx.device)));
        if !ctx.torch.is_empty() {
            md.push_str("\nPyTorch's bp, the denominators:\n");
        }
        for t in ctx.torch {
            md.push_str(&match t.memory_mib {
                Some(m) => format!(
                    "- {}: {m:.0} MiB, {} ({}; {})\n",
                    t.key.describe(),
                    t.source.word(),
                    t.implementation.as_deref().unwrap_or("pytorch"),
                    t.detail
                ),
                None => format!("- {}: n/a †\n", t.key.describe()),
            });
        }
        if missing_torch || ctx.torch.iter().any(|t| t.memory_mib.is_none()) {
            md.push('\n');
            for t in ctx.torch.iter().filter(|t| t.memory_mib.is_none()) {
                md.push_str(&format!(
                    "† No PyTorch bp number for {}: {}. Install torch and timm for `--python` \
                     (or `$PYTHON`) to measure it, or add a record (docs/reproduce.md).\n",
                    t.key.describe(),
                    t.detail
                ));
            }
            if rows.iter().any(|r| {
                saving_vs_torch(ctx, r) == TorchSaving::Missing && torch_of(ctx, r).is_none()
            }) {
                md.push_str("† PyTorch's bp was not looked for at this model and batch.\n");
            }
        }
    }
    if !sources.is_empty() {
        md.push_str("\nSources of the published columns:\n");
        for (i, s) in sources.iter().enumerate() {
            md.push_str(&format!("[{}] {s}\n", i + 1));
        }
    }
    if has_paper {
        md.push_str(
            "\nThe SGR paper's own values are not at hand (docs/reproduce.md): its column reads \
             n/a until `paper` entries of the table file are filled in from the PDF.\n",
        );
    }
    for n in ctx.not_run {
        md.push_str(&format!("\nNot run: {n}\n"));
    }
    let failures: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.failed
                .iter()
                .map(move |f| format!("- {} {} K={}: {f}", r.label, r.method, r.k))
        })
        .collect();
    if !failures.is_empty() {
        md.push_str(&format!("\nFailed cells:\n{}\n", failures.join("\n")));
    }
    md
}

fn is_sgr(method: &str) -> bool {
    method == "sgr" || method.ends_with("+sgr")
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// The picture's data: test error against K, one line per model and local method, bp as a
/// dashed level, and the published lines of the same models and methods dashed.
pub fn chart(ctx: &Context, rows: &[Row]) -> Option<LineChart> {
    let measured: Vec<&Row> = rows.iter().filter(|r| !r.errors.is_empty()).collect();
    let ks: Vec<usize> = measured
        .iter()
        .filter(|r| r.method != "bp")
        .map(|r| r.k)
        .collect();
    let (lo, hi) = (*ks.iter().min()?, *ks.iter().max()?);
    let mut series: Vec<Series> = Vec::new();
    let mut labels: Vec<(String, String, String)> = Vec::new();
    for r in &measured {
        let key = (r.label.clone(), r.method.clone(), r.reference_model.clone());
        if !labels.contains(&key) {
            labels.push(key);
        }
    }
    for (label, method, _) in &labels {
        let points: Vec<(f64, f64)> = measured
            .iter()
            .filter(|r| &r.label == label && &r.method == method)
            .map(|r| (r.k as f64, mean_std(&r.errors).0))
            .collect();
        if method == "bp" {
            let e = points[0].1;
            series.push(Series {
                label: format!("{label} bp (K = 1)"),
                points: vec![(lo as f64, e), (hi as f64, e)],
                dashed: true,
            });
        } else {
            series.push(Series {
                label: format!("{label} {method}"),
                points,
                dashed: false,
            });
        }
    }
    for r in &ctx.table.reference {
        let shown = labels
            .iter()
            .any(|(_, m, rm)| *rm == r.model && *m == r.method && m != "bp");
        if !shown || r.error.is_empty() {
            continue;
        }
        series.push(Series {
            label: format!("{} {} (published)", r.model, r.method),
            points: r
                .ks
                .iter()
                .zip(&r.error)
                .map(|(&k, &e)| (k as f64, e))
                .collect(),
            dashed: true,
        });
    }
    Some(LineChart {
        title: format!(
            "{}: test error against K (profile {})",
            ctx.table.title, ctx.profile
        ),
        x_label: "K (modules)".into(),
        y_label: "top-1 test error %".into(),
        x_log2: true,
        series,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reproduce::table::{tables_dir, TableSpec};

    fn result(method: &str, k: usize, seed: u64, error: f64, mem: f64) -> CellResult {
        CellResult {
            model: "resnet32".into(),
            label: "resnet32".into(),
            reference_model: "resnet32".into(),
            method: method.into(),
            k,
            seed,
            batch: 128,
            path: "x".into(),
            error_pct: Some(error),
            memory_mib: Some(mem),
            peak_rss_mib: None,
            step_seconds: Some(0.5),
            mean_cos: (k > 1).then_some(0.4),
            failed: None,
        }
    }

    #[test]
    fn rows_average_seeds_and_the_table_cites_its_sources() {
        let t = TableSpec::load(&tables_dir(&crate::root()), "table1").unwrap();
        let results = vec![
            result("bp", 1, 0, 14.0, 600.0),
            result("greedy", 16, 0, 23.0, 300.0),
            result("greedy", 16, 1, 25.0, 300.0),
            result("greedy+sgr", 16, 0, 22.0, 360.0),
            CellResult {
                failed: Some("killed".into()),
                error_pct: None,
                memory_mib: None,
                ..result("infopro", 16, 0, 0.0, 0.0)
            },
        ];
        let rows = rows(&results);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1].errors, vec![23.0, 25.0]);
        let ctx = Context {
            table: &t,
            profile: "fashion",
            kind: Kind::Train,
            about: "about",
            substitute: Some("Fashion-MNIST."),
            device: "cpu",
            seeds: &[0, 1],
            recipe: "5 epochs".into(),
            not_run: &[],
            torch: &[],
        };
        let md = markdown(&ctx, &rows);
        assert!(md.contains("| resnet32 | greedy | 16 | 24.00 ± 1.41 | 300 | 50 % | 0.500 | 0.40 | 24.59 [1] | – | – |"), "{md}");
        assert!(
            md.contains("| resnet32 | greedy+sgr | 16 | 22.00 | 360 | 40 % |"),
            "{md}"
        );
        assert!(md.contains("n/a |"), "{md}");
        assert!(md.contains("| resnet32 | infopro | 16 | failed |"), "{md}");
        assert!(md.contains("[1] InfoPro"), "{md}");
        assert!(md.contains("Substitute data set"), "{md}");
        assert!(
            md.contains("- resnet32 infopro K=16: seed 0: killed"),
            "{md}"
        );
        let c = chart(&ctx, &rows).unwrap();
        let labels: Vec<&str> = c.series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "resnet32 bp (K = 1)",
                "resnet32 greedy",
                "resnet32 greedy+sgr",
                "resnet32 greedy (published)"
            ]
        );
        assert_eq!(c.series[0].points, vec![(16.0, 14.0), (16.0, 14.0)]);
    }

    /// On CUDA the PyTorch saving compares device memory (the memory column) with torch's
    /// allocator peak: one extra column, no RSS.
    #[test]
    fn on_cuda_the_pytorch_saving_compares_device_memory() {
        let t = TableSpec::load(&tables_dir(&crate::root()), "table2").unwrap();
        let cell = |method: &str, k: usize, mem: f64| CellResult {
            model: "deit-s".into(),
            label: "deit-s".into(),
            reference_model: "deit-s".into(),
            error_pct: None,
            peak_rss_mib: Some(9000.0),
            mean_cos: None,
            ..result(method, k, 0, 0.0, mem)
        };
        let torch = [TorchBp {
            key: crate::reproduce::torch::Key {
                model: "deit-s".into(),
                input: [3, 224, 224],
                classes: 1000,
                batch_size: 128,
                threads: 16,
                device: "cuda".into(),
            },
            source: Source::Record,
            memory_mib: Some(2000.0),
            implementation: Some("pytorch 2.15.0".into()),
            detail: "record docs/results/table2-memory/torch_bp.jsonl line 3".into(),
        }];
        let ctx = Context {
            table: &t,
            profile: "memory",
            kind: Kind::Memory,
            about: "about",
            substitute: None,
            device: "cuda",
            seeds: &[0],
            recipe: String::new(),
            not_run: &[],
            torch: &torch,
        };
        let rows = rows(&[cell("bp", 1, 2500.0), cell("greedy", 2, 1000.0)]);
        let md = markdown(&ctx, &rows);
        assert!(
            md.contains("| saving vs bp | saving vs PyTorch bp | s/step |")
                && !md.contains("RSS MiB"),
            "{md}"
        );
        assert!(
            md.contains("| deit-s | greedy | 2 | – | 1000 | 60 % | 50 % (record) | 0.500 |"),
            "{md}"
        );
        assert!(
            md.contains("| deit-s | bp | 1 | – | 2500 | – | -25 % (record) |"),
            "{md}"
        );
        assert!(md.contains("device memory against device memory"), "{md}");
        let json = rows_json(&ctx, &rows);
        assert_eq!(json[1]["saving_vs_torch_bp_pct"], 50.0);
        assert_eq!(json[1]["torch_bp_source"], "record");
    }

    #[test]
    fn mean_and_sample_deviation() {
        assert_eq!(mean_std(&[2.0]), (2.0, None));
        let (m, s) = mean_std(&[1.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((s.unwrap() - 2f64.sqrt()).abs() < 1e-12);
    }
}
