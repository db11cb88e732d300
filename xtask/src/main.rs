//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! * `cargo xtask sweep [--epochs N] [--seeds 0,1] [--out DIR] [-- <sgr train flags>]`:
//!   the SGR configuration sweep behind the documented defaults (λ, distance, direction), with
//!   greedy and bp as references, on the embedded digits unless flags say otherwise.
//! * `cargo xtask reproduce table1|table2 [--profile full|memory|fashion|smoke] ...`: the
//!   paper's comparisons, each table a file in `xtask/tables/` (module [`reproduce`],
//!   docs/reproduce.md).
//!
//! xtask depends on no crate that compiles a tensor library: it builds and runs the `sgr`
//! binary, once per cell of a grid, and reads the `summary.json` each run writes as
//! [`sgr_schema::Summary`]. A cell runs in `OUT/<label>-<first 12 hex digits of its spec hash>`,
//! the hash that `sgr train <flags> --print-spec` prints; a finished run is reused only when its
//! `summary.json` has that same hash, so changed flags or changed defaults of the binary rerun
//! the cell (module [`run`](mod@run)).

mod flags;
mod reproduce;
mod run;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use flags::Flags;
use run::run;

/// Dispatches `cargo xtask <command>`.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sweep") => sweep(&args[1..]),
        Some("reproduce") => reproduce::reproduce(&args[1..]),
        _ => {
            eprintln!(
                "usage:\n  cargo xtask sweep [--epochs N] [--seeds 0,1] [--out DIR] [-- <sgr train flags>]\n  {}",
                reproduce::USAGE
            );
            std::process::exit(2);
        }
    }
}

/// The workspace root (the parent of this crate's directory).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the `sgr` binary (release, with CUDA when `cuda`) and returns its path; `SGR=path`
/// uses that binary instead.
fn build_sgr(cuda: bool) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SGR") {
        return Ok(PathBuf::from(path));
    }
    let mut args = vec!["build", "--release", "-p", "sgr-cli"];
    if cuda {
        args.extend(["--features", "sgr-cli/cuda"]);
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(&args)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the sgr binary failed");
    }
    Ok(root().join("target/release/sgr"))
}

/// The mean of `v`, 0 when empty.
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// `cargo xtask sweep`: prints a markdown table of the grid, one row per configuration.
fn sweep(args: &[String]) -> Result<()> {
    let f = Flags::parse(args, &["epochs", "seeds", "out"])?;
    let epochs = f.get("epochs").unwrap_or("6").to_string();
    let seeds = f.list("seeds", "0,1")?;
    let out = PathBuf::from(f.get("out").unwrap_or("runs/sweep"));
    let sgr = build_sgr(false)?;
    // (label, flags): the grid behind the defaults, references first.
    let grid: Vec<(String, Vec<&str>)> = {
        let mut g: Vec<(String, Vec<&str>)> = vec![
            ("bp".into(), vec!["--method", "bp"]),
            ("greedy".into(), vec!["--method", "greedy"]),
        ];
        for l in ["0.3", "1", "3", "10", "30"] {
            g.push((
                format!("sgr squared-l2 λ={l}"),
                vec![
                    "--method",
                    "sgr",
                    "--sgr-distance",
                    "squared-l2",
                    "--sgr-lambda",
                    l,
                ],
            ));
        }
        for l in ["0.03", "0.1", "0.3", "1"] {
            g.push((
                format!("sgr cosine λ={l}"),
                vec![
                    "--method",
                    "sgr",
                    "--sgr-distance",
                    "cosine",
                    "--sgr-lambda",
                    l,
                ],
            ));
        }
        for l in ["1", "10"] {
            g.push((
                format!("sgr squared-l2 backward λ={l}"),
                vec![
                    "--method",
                    "sgr",
                    "--sgr-direction",
                    "backward",
                    "--sgr-lambda",
                    l,
                ],
            ));
        }
        g
    };
    println!("| configuration | test accuracy (mean over seeds {seeds:?}) | per seed | mean boundary cos | train s |");
    println!("|---|---|---|---|---|");
    for (label, flags) in &grid {
        let mut accs = Vec::new();
        let mut coss = Vec::new();
        let mut secs = Vec::new();
        for &seed in &seeds {
            let mut a: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            a.extend([
                "--epochs".into(),
                epochs.clone(),
                "--seed".into(),
                seed.to_string(),
            ]);
            a.extend(f.rest.iter().cloned());
            let r = run(&sgr, &out, &format!("{label} s{seed}"), &a, &[])?;
            accs.push(r.accuracy);
            coss.push(r.mean_cos);
            secs.push(r.seconds);
        }
        println!(
            "| {label} | {:.4} | {} | {} | {:.0} |",
            mean(&accs),
            accs.iter()
                .map(|a| format!("{a:.4}"))
                .collect::<Vec<_>>()
                .join(" "),
            if coss[0].is_nan() {
                "–".to_string()
            } else {
                format!("{:.3}", mean(&coss))
            },
            mean(&secs)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_values() {
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(mean(&[]), 0.0);
    }
}
