//! Results that cannot be written, charts that cannot be drawn and lock files that are not
//! files: each is an error with one line on stderr, never a panic, a hang or a clobbered file.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::text;

/// Runs `sgr args` with stdout on `/dev/full`.
fn to_dev_full(args: &[&str]) -> Output {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .stdout(Stdio::from(full))
        .output()
        .expect("run sgr")
}

/// A chart with the given points, written to `dir/chart.json`.
fn chart(dir: &std::path::Path, points: &[(f64, f64)]) -> std::path::PathBuf {
    let path = dir.join("chart.json");
    let v = serde_json::json!({
        "title": "t", "x_label": "x", "y_label": "y",
        "series": [{ "label": "s", "points": points }],
    });
    std::fs::write(&path, v.to_string()).unwrap();
    path
}

#[test]
fn a_result_that_cannot_be_written_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let lines = chart(dir.path(), &[(1.0, 2.0), (2.0, 3.0)]);
    let png = dir.path().join("chart.png");
    let cases: Vec<Vec<&str>> = vec![
        vec!["train", "--print-spec"],
        vec!["bench", "--model", "resnet8", "--print-spec"],
        vec![
            "plot",
            "--lines",
            lines.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ],
        vec![
            "inspect",
            "--model",
            "resnet8",
            "--modules",
            "2",
            "--batch-size",
            "2",
            "--input-size",
            "8",
        ],
    ];
    for args in cases {
        let o = to_dev_full(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{args:?} exited 0 having written nothing"
        );
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("cannot write the result to stdout"),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    }
}

#[test]
fn a_closed_pipe_stays_quiet() {
    // `sgr train --print-spec | head -c 0`: the reader is gone before the write.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(["train", "--print-spec"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
}

#[test]
fn a_chart_too_wide_to_draw_is_an_error_not_a_spin() {
    let dir = tempfile::tempdir().unwrap();
    for points in [
        vec![(-1e308, -1e308), (1e308, 1e308)],
        vec![(1.0, 1e300), (2.0, 1e300)],
        vec![(1e300, 1.0), (1e300, 2.0)],
    ] {
        let lines = chart(dir.path(), &points);
        let mut child = Command::new(env!("CARGO_BIN_EXE_sgr"))
            .args(["plot", "--lines", lines.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("sgr plot spins on {points:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success(), "{points:?}");
        assert!(text(&o).contains("too large to draw"), "{}", text(&o));
    }
    // Negative values draw (the y axis is not clamped at 0 then).
    let lines = chart(dir.path(), &[(1.0, -5.0), (2.0, -3.0)]);
    let o = common::sgr(&["plot", "--lines", lines.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[cfg(unix)]
#[test]
fn a_lock_file_that_is_a_link_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::symlink(&victim, run.join(".sgr-lock")).unwrap();
    let o = common::sgr(&[
        "train",
        "--model",
        "resnet8",
        "--max-steps",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("symbolic link"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    // A FIFO there neither blocks nor is taken for a lock.
    let fifo_run = dir.path().join("fifo-run");
    std::fs::create_dir(&fifo_run).unwrap();
    let fifo = fifo_run.join(".sgr-lock");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let o = common::sgr(&[
        "train",
        "--model",
        "resnet8",
        "--max-steps",
        "1",
        "--out",
        fifo_run.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("not a regular file"), "{}", text(&o));
}

#[test]
fn an_out_that_cannot_hold_a_run_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    // A file where a folder is expected.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let o = common::sgr(&["train", "--max-steps", "1", "--out", file.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("a run directory (a folder) is expected"),
        "{}",
        text(&o)
    );
    // A folder whose path leaves no room for the run's file names (Linux: 4096 bytes in all):
    // refused at once, not after an epoch.
    let mut deep = dir.path().to_path_buf();
    let target = 4070;
    while deep.as_os_str().len() < target {
        let room = target - deep.as_os_str().len() - 1;
        deep.push("d".repeat(room.clamp(1, 200)));
    }
    std::fs::create_dir_all(&deep).unwrap();
    let o = common::sgr(&["train", "--max-steps", "1", "--out", deep.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("too long"), "{}", text(&o));
    assert!(!text(&o).contains("epoch"), "before training: {}", text(&o));
}
