//! Sizes the flags accept but the machine cannot hold are refused before the first step, with
//! the estimate, the memory available and the flag to change: never an allocator abort, and
//! never a half-made run directory. `SGR_MEMORY_LIMIT` makes the budget the same on every
//! machine.

use std::process::{Command, Output};

mod common;
use common::{idx, image_folder, text};

fn sgr_limited(limit: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .env("SGR_MEMORY_LIMIT", limit)
        .output()
        .expect("run sgr")
}

/// Refused with exit status 1 (an abort is a signal), naming the estimate and what to do.
fn refused(o: &Output, flag: &str) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("needs about") && t.contains("is available") && t.contains(flag),
        "{t}"
    );
    assert_eq!(t.lines().count(), 1, "{t}");
    t
}

#[test]
fn batch_and_image_sizes_that_cannot_fit_are_refused_before_any_step() {
    for cmd in ["bench", "inspect"] {
        let o = sgr_limited(
            "4G",
            &[
                cmd,
                "--model",
                "resnet8",
                "-k",
                "2",
                "--batch-size",
                "65536",
            ],
        );
        let t = refused(&o, "--batch-size to at most");
        assert!(t.contains("batch 65536"), "{t}");
        let o = sgr_limited(
            "4G",
            &[
                cmd,
                "--model",
                "resnet8",
                "--input-size",
                "4096",
                "--batch-size",
                "4",
            ],
        );
        let t = refused(&o, "--input-size");
        assert!(t.contains("4096x4096") && t.contains("scaled"), "{t}");
    }
    // Within the budget the same commands run.
    let o = sgr_limited(
        "4G",
        &[
            "bench",
            "--model",
            "resnet8",
            "--batch-size",
            "8",
            "--steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_training_run_too_large_for_memory_leaves_no_run_behind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    image_folder(&root, &["train", "val"], &["a", "b"], 4);
    let run = dir.path().join("run");
    let o = sgr_limited(
        "4G",
        &[
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            root.to_str().unwrap(),
            "--model",
            "resnet8",
            "--image-size",
            "4096",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--out",
            run.to_str().unwrap(),
        ],
    );
    refused(&o, "--image-size");
    assert!(
        !run.join("config.json").exists(),
        "a half-made run was left"
    );
}

#[test]
fn a_memory_limit_that_is_not_a_size_is_named() {
    let o = sgr_limited("lots", &["bench", "--model", "resnet8", "--steps", "1"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("SGR_MEMORY_LIMIT") && t.contains("8G"), "{t}");
}

/// `sgr eval` reads its whole batch at once: one too large for memory is refused with the
/// largest that fits, and a smaller one evaluates.
#[test]
fn an_evaluation_batch_that_cannot_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mnist");
    std::fs::create_dir_all(&data).unwrap();
    for (stem, n) in [("train", 48u32), ("t10k", 400)] {
        let pixels: Vec<u8> = (0..n * 784).map(|i| (i * 7 % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let images = idx(0x803, &[n, 28, 28], &pixels);
        std::fs::write(data.join(format!("{stem}-images-idx3-ubyte")), images).unwrap();
        let labels = idx(0x801, &[n], &labels);
        std::fs::write(data.join(format!("{stem}-labels-idx1-ubyte")), labels).unwrap();
    }
    let run = dir.path().join("run");
    let o = sgr_limited(
        "4G",
        &[
            "train",
            "--dataset",
            "mnist",
            "--data-dir",
            data.to_str().unwrap(),
            "--model",
            "resnet8",
            "-k",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--workers",
            "0",
            "--out",
            run.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let eval = |batch: &str| {
        let args = [
            "eval",
            "--checkpoint",
            run.to_str().unwrap(),
            "--batch-size",
            batch,
        ];
        sgr_limited("64M", &[&args[..], &["--workers", "0"]].concat())
    };
    let t = refused(&eval("400"), "--batch-size to at most");
    assert!(t.contains("an evaluation at batch 400"), "{t}");
    let o = eval("16");
    assert!(o.status.success(), "{}", text(&o));
}
