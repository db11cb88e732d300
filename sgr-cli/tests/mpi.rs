//! `sgr train --distributed mpi` under `mpirun` (MPICH or Open MPI): the ranks write the
//! one-process run bit for bit, on 2 and 3 ranks and across a stop and a resume; ranks started
//! with different arguments are refused, naming the rank; a rank that dies ends the job
//! instead of leaving the others waiting, and its last checkpoint resumes in one process.
//! Built only with `--features mpi` (CI: `cargo test -p sgr-cli --features mpi --test mpi`).
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{sgr, text};

const SGR: &str = env!("CARGO_BIN_EXE_sgr");

fn run_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        "resnet8",
        "-k",
        "3",
        "--epochs",
        "2",
        "--train-limit",
        "256",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--method",
        "greedy+sgr",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.to_str().unwrap().to_string()])
    .collect()
}

/// `sgr train --resume OUT --workers 0 EXTRA...`.
fn resume_args(out: &Path, extra: &[&str]) -> Vec<String> {
    ["train", "--resume", out.to_str().unwrap(), "--workers", "0"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// `mpirun -np N sgr ARGS --distributed mpi`, ended after `limit`.
fn mpirun(n: usize, args: &[String], limit: u64) -> Output {
    let mut c = Command::new("timeout");
    c.arg(limit.to_string())
        .args(["mpirun", "-np", &n.to_string(), SGR])
        .args(args)
        .args(["--distributed", "mpi"]);
    c.output().expect("mpirun")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn mpi_ranks_write_the_one_process_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("alone");
    let o = sgr(&run_args(&alone)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let model = read(&alone.join("model.safetensors"));
    for n in [2, 3] {
        let out = dir.path().join(format!("np{n}"));
        let o = mpirun(n, &run_args(&out), 300);
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        assert!(t.contains(&format!("distributed: {n} ranks")), "{t}");
        // Rank 0 speaks for all: one summary line.
        assert_eq!(t.matches("done: test accuracy").count(), 1, "{t}");
        assert!(read(&out.join("model.safetensors")) == model, "{n} ranks");
    }
    // Stopped mid-epoch, resumed on the ranks.
    let out = dir.path().join("resumed");
    let mut first = run_args(&out);
    first.extend(["--max-steps".into(), "5".into()]);
    let o = mpirun(2, &first, 300);
    assert!(o.status.success(), "{}", text(&o));
    let o = mpirun(2, &resume_args(&out, &[]), 300);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        read(&out.join("model.safetensors")) == model,
        "stopped and resumed"
    );
}

/// Data-parallel replicas: 2 copies on 2 ranks, and 2 copies of a 2-stage pipeline on 4
/// ranks, write the same model bit for bit (a pipeline inside each copy changes no
/// arithmetic), and a replicated run stopped mid-epoch resumes to it.
#[test]
fn mpi_replicas_agree_across_layouts_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let with = |out: &Path, extra: &[&str]| {
        let mut a = run_args(out);
        a.extend(
            ["--replicas", "2"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        a
    };
    let two = dir.path().join("np2");
    let o = mpirun(2, &with(&two, &[]), 300);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("distributed: 2 ranks: 2 replicas x 1 stage:"),
        "{t}"
    );
    let model = read(&two.join("model.safetensors"));
    let four = dir.path().join("np4");
    let o = mpirun(4, &with(&four, &[]), 300);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("4 ranks: 2 replicas x 2 stages"), "{t}");
    // Each rank's peak, in rank order.
    let peaks = t.split("peak memory per rank ").nth(1).unwrap_or_default();
    let peaks = peaks.split(" MiB").next().unwrap_or_default();
    assert_eq!(
        peaks
            .split(", ")
            .filter(|p| p.parse::<u64>().is_ok_and(|m| m > 0))
            .count(),
        4,
        "{t}"
    );
    assert!(
        read(&four.join("model.safetensors")) == model,
        "2 x 2 against 2 x 1"
    );
    let out = dir.path().join("resumed");
    let o = mpirun(2, &with(&out, &["--max-steps", "5"]), 300);
    assert!(o.status.success(), "{}", text(&o));
    let o = mpirun(2, &resume_args(&out, &["--replicas", "2"]), 300);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        read(&out.join("model.safetensors")) == model,
        "stopped and resumed"
    );
    // A count that does not divide the ranks.
    let o = mpirun(3, &with(&dir.path().join("np3"), &[]), 120);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("--replicas 2 does not divide the 3 ranks"),
        "{t}"
    );
}

#[test]
fn ranks_started_with_different_arguments_are_refused_naming_the_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut a = run_args(&out);
    a.extend(["--distributed".into(), "mpi".into()]);
    let mut b = a.clone();
    b.extend(["--lr".into(), "0.3".into()]);
    let o = Command::new("timeout")
        .args(["120", "mpirun", "-np", "1", SGR])
        .args(&a)
        .args([":", "-np", "1", SGR])
        .args(&b)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("rank 1 has") && t.contains("same binary and arguments"),
        "{t}"
    );
    assert!(!out.join("config.json").exists(), "{t}");
}

#[test]
fn a_rank_that_dies_ends_the_job_and_its_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = run_args(&out);
    args[6] = "400".into(); // --epochs: longer than the test waits
    let mut job = Command::new("mpirun")
        .args(["-np", "2", SGR])
        .args(&args)
        .args(["--distributed", "mpi"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint, then kill one rank.
    let start = Instant::now();
    while !out.join("checkpoint.safetensors").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ranks: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            exe.is_some_and(|e| e.ends_with("sgr"))
                && String::from_utf8_lossy(&cmd).contains(out.to_str().unwrap())
        })
        .collect();
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let killed = Command::new("kill")
        .args(["-9", &ranks[1].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The job ends by itself.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = job.kill();
            panic!("the job did not end within 60 s of a rank's death");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    // The last checkpoint continues in one process.
    let o = sgr(&[
        "train",
        "--resume",
        out.to_str().unwrap(),
        "--epochs",
        "3",
        "--workers",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}
