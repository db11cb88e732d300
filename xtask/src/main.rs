//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! * `cargo xtask sweep [--epochs N] [--seeds 0,1] [--out DIR] [-- <sgr train flags>]`:
//!   the SGR configuration sweep behind the documented defaults (λ, distance, direction), with
//!   greedy and bp as references, on the embedded digits unless flags say otherwise.
//! * `cargo xtask reproduce table2 --data-dir DIR [--epochs N] [--model resnet32]
//!   [--ks 2,4,8,16] [--out DIR]`: the headline comparison (bp, greedy, sgr per K on CIFAR-10),
//!   next to the published InfoPro-repository numbers.
//!
//! xtask depends on no workspace crate: it builds and runs the `sgr` binary and reads the
//! `summary.json` each run writes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sweep") => sweep(&args[1..]),
        Some("reproduce") => match args.get(1).map(String::as_str) {
            Some("table2") => table2(&args[2..]),
            other => bail!("unknown reproduction {other:?}; available: table2"),
        },
        _ => {
            eprintln!("usage:\n  cargo xtask sweep [--epochs N] [--seeds 0,1] [--out DIR] [-- <sgr train flags>]\n  cargo xtask reproduce table2 --data-dir DIR [--epochs N] [--model M] [--ks 2,4,8,16] [--out DIR]");
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

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

/// Flag parser: `--name value` pairs before an optional `--`, the rest passed through.
struct Flags {
    named: Vec<(String, String)>,
    rest: Vec<String>,
}

impl Flags {
    fn parse(args: &[String], known: &[&str]) -> Result<Self> {
        let mut named = Vec::new();
        let mut rest = Vec::new();
        let mut i = 0;
        while i < args.len() {
            if args[i] == "--" {
                rest.extend(args[i + 1..].iter().cloned());
                break;
            }
            let name = args[i].trim_start_matches("--");
            if !args[i].starts_with("--") || !known.contains(&name) {
                bail!(
                    "unknown argument `{}`; known: --{}",
                    args[i],
                    known.join(", --")
                );
            }
            let value = args
                .get(i + 1)
                .with_context(|| format!("{} needs a value", args[i]))?;
            named.push((name.to_string(), value.clone()));
            i += 2;
        }
        Ok(Self { named, rest })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.named
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn list(&self, name: &str, default: &str) -> Result<Vec<u64>> {
        self.get(name)
            .unwrap_or(default)
            .split(',')
            .map(|s| s.trim().parse().with_context(|| format!("--{name}: `{s}`")))
            .collect()
    }
}

struct RunResult {
    accuracy: f64,
    seconds: f64,
    mean_cos: f64,
    peak_mib: f64,
}

fn run(sgr: &Path, out: &Path, args: &[String]) -> Result<RunResult> {
    let summary = out.join("summary.json");
    if !summary.exists() {
        eprintln!(
            "xtask: sgr train {} --out {}",
            args.join(" "),
            out.display()
        );
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let log_path = out.join("train.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let status = Command::new(sgr)
            .arg("train")
            .args(args)
            .arg("--out")
            .arg(out)
            .stdout(log)
            .status()
            .context("running sgr")?;
        if !status.success() {
            bail!(
                "sgr train {} failed; see {}",
                args.join(" "),
                log_path.display()
            );
        }
    }
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&summary).with_context(|| format!("{}", summary.display()))?,
    )?;
    let cos: Vec<f64> = s["final_boundary_cos"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    Ok(RunResult {
        accuracy: s["test_accuracy"].as_f64().unwrap_or(f64::NAN),
        seconds: s["train_seconds"].as_f64().unwrap_or(f64::NAN),
        mean_cos: if cos.is_empty() {
            f64::NAN
        } else {
            cos.iter().sum::<f64>() / cos.len() as f64
        },
        peak_mib: s["peak_memory_bytes"].as_f64().unwrap_or(f64::NAN) / (1024.0 * 1024.0),
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

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
            let dir = out.join(format!("{}-s{seed}", label.replace([' ', '='], "_")));
            let mut a: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            a.extend([
                "--epochs".into(),
                epochs.clone(),
                "--seed".into(),
                seed.to_string(),
            ]);
            a.extend(f.rest.iter().cloned());
            let r = run(&sgr, &dir, &a)?;
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
    // InfoPro-repository test errors (%), CIFAR-10, 160 epochs (method.md).
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
    let bp = run(&sgr, &out.join("bp-k1"), &common("bp", 1))?;
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
            let r = run(
                &sgr,
                &out.join(format!("{method}-k{k}")),
                &common(method, k),
            )?;
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

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_parse_named_values_and_pass_the_rest_through() {
        let f = Flags::parse(
            &args(&[
                "--epochs", "3", "--seeds", "0,1,2", "--", "--model", "resnet8",
            ]),
            &["epochs", "seeds", "out"],
        )
        .unwrap();
        assert_eq!(f.get("epochs"), Some("3"));
        assert_eq!(f.list("seeds", "0").unwrap(), vec![0, 1, 2]);
        assert_eq!(f.list("missing", "4,5").unwrap(), vec![4, 5]);
        assert_eq!(f.rest, args(&["--model", "resnet8"]));
    }

    #[test]
    fn flags_reject_unknown_or_incomplete_arguments() {
        let e = Flags::parse(&args(&["--epoch", "3"]), &["epochs"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("unknown argument `--epoch`"), "{e}");
        let e = Flags::parse(&args(&["--epochs"]), &["epochs"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs a value"), "{e}");
        let f = Flags::parse(&args(&["--seeds", "1,x"]), &["seeds"]).unwrap();
        assert!(f.list("seeds", "0").is_err());
    }

    #[test]
    fn mean_of_values() {
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(mean(&[]), 0.0);
    }
}
