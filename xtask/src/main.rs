//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! * `cargo xtask sweep [--epochs N] [--seeds 0,1] [--out DIR] [-- <sgr train flags>]`:
//!   the SGR configuration sweep behind the documented defaults (λ, distance, direction), with
//!   greedy and bp as references, on the embedded digits unless flags say otherwise.
//! * `cargo xtask reproduce table2 --data-dir DIR [--epochs N] [--model resnet32]
//!   [--ks 2,4,8,16] [--seed S] [--out DIR]`: the headline comparison (bp, greedy, sgr per K on
//!   CIFAR-10), next to the published InfoPro-repository numbers.
//!
//! xtask depends on no crate that compiles a tensor library: it builds and runs the `sgr`
//! binary, once per cell of a grid, and reads the `summary.json` each run writes as
//! [`sgr_schema::Summary`]. A cell runs in `OUT/<label>-<first 12 hex digits of its spec hash>`,
//! the hash that `sgr train <flags> --print-spec` prints; a finished run is reused only when its
//! `summary.json` has that same hash, so changed flags or changed defaults of the binary rerun
//! the cell (module [`run`](mod@run)).

mod flags;
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
        Some("reproduce") => match args.get(1).map(String::as_str) {
            Some("table2") => table2(&args[2..]),
            other => bail!("unknown reproduction {other:?}; available: table2"),
        },
        _ => {
            eprintln!("usage:\n  cargo xtask sweep [--epochs N] [--seeds 0,1] [--out DIR] [-- <sgr train flags>]\n  cargo xtask reproduce table2 --data-dir DIR [--epochs N] [--model M] [--ks 2,4,8,16] [--seed S] [--out DIR]");
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

/// Builds the `sgr` binary (release) and returns its path.
fn build_sgr() -> Result<PathBuf> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["build", "--release", "-p", "sgr-cli"])
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
    let sgr = build_sgr()?;
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
            let r = run(&sgr, &out, &format!("{label} s{seed}"), &a)?;
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

/// `cargo xtask reproduce table2`: prints the markdown table of bp, greedy and sgr per K.
fn table2(args: &[String]) -> Result<()> {
    let f = Flags::parse(args, &["data-dir", "epochs", "model", "ks", "out", "seed"])?;
    let data_dir = f
        .get("data-dir")
        .context("reproduce table2 needs --data-dir with the CIFAR-10 binary files")?;
    let epochs = f.get("epochs").unwrap_or("160").to_string();
    let model = f.get("model").unwrap_or("resnet32").to_string();
    let ks = f.list("ks", "2,4,8,16")?;
    let seed = f.get("seed").unwrap_or("0").to_string();
    let out = PathBuf::from(f.get("out").unwrap_or("runs/table2"));
    // InfoPro-repository test errors (%), CIFAR-10, 160 epochs (docs/method.md, "Published reference numbers").
    let published: &[(&str, &str, [f64; 4], f64)] = &[
        ("resnet32", "greedy", [10.30, 16.07, 21.19, 24.59], 7.37),
        ("resnet110", "greedy", [8.21, 13.16, 15.61, 18.92], 6.50),
    ];
    let sgr = build_sgr()?;
    let common = |method: &str, k: u64| -> Vec<String> {
        let mut a: Vec<String> = [
            "--model",
            &model,
            "--dataset",
            "cifar10",
            "--data-dir",
            data_dir,
            "--method",
            method,
            "--modules",
            &k.to_string(),
            "--epochs",
            &epochs,
            "--seed",
            &seed,
            "--batch-size",
            "128",
            "--lr",
            "0.1",
            "--weight-decay",
            "1e-4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(f.rest.iter().cloned());
        a
    };
    let bp = run(&sgr, &out, "bp-k1", &common("bp", 1))?;
    println!("| {model}, CIFAR-10, {epochs} epochs | K | test error % | published Greedy SL error % | peak memory MiB | memory vs bp |");
    println!("|---|---|---|---|---|---|");
    let pubbp = published.iter().find(|p| p.0 == model).map(|p| p.3);
    println!(
        "| bp | 1 | {:.2} | {} | {:.0} | 1.00 |",
        100.0 * (1.0 - bp.accuracy),
        pubbp
            .map(|e| format!("{e:.2} (E2E)"))
            .unwrap_or_else(|| "–".into()),
        bp.peak_mib
    );
    for &k in &ks {
        for method in ["greedy", "sgr"] {
            let r = run(&sgr, &out, &format!("{method}-k{k}"), &common(method, k))?;
            let col = [2, 4, 8, 16].iter().position(|&x| x == k);
            let pubv = published
                .iter()
                .find(|p| p.0 == model && p.1 == "greedy")
                .and_then(|p| col.map(|c| p.2[c]));
            println!(
                "| {method} | {k} | {:.2} | {} | {:.0} | {:.2} |",
                100.0 * (1.0 - r.accuracy),
                match (method, pubv) {
                    ("greedy", Some(v)) => format!("{v:.2}"),
                    _ => "–".into(),
                },
                r.peak_mib,
                r.peak_mib / bp.peak_mib
            );
        }
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
