//! Nothing lost, nobody in: divergence is an error and is never saved, a run directory has one
//! owner, a folder holding a run is not silently replaced, numbers are checked, and a closed
//! stdout does not stop a training.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{sgr, text};

/// Every float tensor of a safetensors file is finite.
fn all_finite(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().iter().all(|(_, t)| match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        safetensors::Dtype::F64 => t.data().chunks_exact(8).all(|c| {
            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite()
        }),
        _ => true,
    })
}

#[test]
fn divergence_is_an_error_and_is_never_saved() {
    for epochs in ["1", "3"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let o = sgr(&[
            "train",
            "--model",
            "resnet8",
            "--train-limit",
            "256",
            "--epochs",
            epochs,
            "--sgr-lambda",
            "1e4",
            "--out",
            out.to_str().unwrap(),
        ]);
        let t = text(&o);
        assert!(
            !o.status.success(),
            "a diverged run exits with an error: {t}"
        );
        assert!(t.contains("diverged") && t.contains("not finite"), "{t}");
        for f in ["model.safetensors", "checkpoint.safetensors"] {
            let p = out.join(f);
            assert!(!p.exists() || all_finite(&p), "{f} holds non-finite values");
        }
        assert!(!out.join("summary.json").exists());
    }
}

fn long_run(out: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(["train", "--model", "resnet8", "--epochs", "200", "--out"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_run_directory_has_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut first = long_run(&out);
    let t0 = Instant::now();
    while !out.join("config.json").exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = std::fs::read(out.join("config.json")).unwrap();
    for args in [
        vec![
            "train",
            "--model",
            "resnet8",
            "--overwrite",
            "--out",
            out.to_str().unwrap(),
        ],
        vec!["train", "--resume", out.to_str().unwrap()],
    ] {
        let t1 = Instant::now();
        let o = sgr(&args);
        let t = text(&o);
        assert!(!o.status.success(), "{args:?}: {t}");
        assert!(
            t.contains("in use by another training")
                && t.contains(&format!("process {}", first.id())),
            "{args:?}: {t}"
        );
        assert!(t1.elapsed() < Duration::from_secs(30), "it fails at once");
    }
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), config);
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn a_folder_holding_a_run_is_kept_unless_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let small = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--model",
            "resnet8",
            "--train-limit",
            "32",
            "--epochs",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        sgr(&a)
    };
    let o = small(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let snapshot = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&out);
    let o = small(&["--lr", "0.2"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("already holds a run") && t.contains("--overwrite"),
        "{t}"
    );
    assert!(snapshot(&out) == before, "the old run is untouched");
    // --overwrite replaces it whole: one epoch of the new run, none of the old two.
    let o = small(&["--lr", "0.2", "--max-steps", "1", "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["trainer"]["lr"], 0.2);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1, "no epoch of the old run is left");
}

#[test]
fn numbers_are_checked_with_errors_naming_the_flag() {
    let cases: [(&[&str], &str); 15] = [
        (
            &["bench", "--batch-size", "18446744073709551615"],
            "--batch-size must be in 1..=",
        ),
        (
            &["inspect", "--input-size", "100000"],
            "--input-size must be in 1..=",
        ),
        (
            &["eval", "--checkpoint", "/", "--batch-size", "0"],
            "--batch-size must be in 1..=",
        ),
        (
            &["train", "--workers", "18446744073709551615"],
            "--workers must be at most",
        ),
        (
            &[
                "train",
                "--dataset",
                "imagefolder",
                "--data-dir",
                "/x",
                "--image-size",
                "0",
            ],
            "--image-size must be at least",
        ),
        (
            &["train", "--image-size", "100000"],
            "--image-size must be at most",
        ),
        (
            &["train", "--warmup-epochs", "inf"],
            "--warmup-epochs must be finite",
        ),
        (
            &["train", "--weight-decay=-1"],
            "weight decay (--weight-decay) must be finite and >= 0",
        ),
        (&["train", "--lr", "nan"], "--lr must be finite and > 0"),
        (&["train", "--sgr-lambda", "inf"], "lambda must be finite"),
        (
            &["train", "--batch-size", "18446744073709551615"],
            "--batch-size must be at most",
        ),
        // Settings that would silently do nothing.
        (
            &["train", "--epochs", "3", "--warmup-epochs", "3"],
            "--warmup-epochs 3 is not shorter than the run",
        ),
        (
            &["train", "--epochs", "2", "--sgr-warmup", "5"],
            "--sgr-warmup 5 is not shorter than the run",
        ),
        (
            &["train", "--sgr-fd-epsilon", "1e-30"],
            "--sgr-fd-epsilon must be in [0.00001, 1], got 0.000000000000000000000000000001",
        ),
        (
            &["train", "--sgr-fd-epsilon", "1e-30", "--print-spec"],
            "--sgr-fd-epsilon must be in",
        ),
    ];
    for (args, want) in cases {
        let o = sgr(args);
        let t = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(t.contains(want), "{args:?}: `{want}` not in: {t}");
        assert!(!t.contains("panicked"), "{t}");
    }
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, "[trainer]\nlr = -0.5\n").unwrap();
    let o = sgr(&["train", "--config", toml.to_str().unwrap()]);
    let t = text(&o);
    assert!(
        !o.status.success()
            && t.contains("run.toml")
            && t.contains("--lr must be finite and > 0, got -0.5"),
        "{t}"
    );
    for (body, want) in [
        (
            "[trainer]\nsteps_per_epoch = 7\n",
            "trainer.steps_per_epoch = 7 is computed by the run",
        ),
        (
            "seed = 1\n[trainer]\nseed = 9\n",
            "trainer.seed = 9 differs from seed = 1",
        ),
    ] {
        std::fs::write(&toml, body).unwrap();
        let o = sgr(&["train", "--config", toml.to_str().unwrap()]);
        let t = text(&o);
        assert!(
            !o.status.success() && t.contains("run.toml") && t.contains(want),
            "{t}"
        );
    }
    let json = dir.path().join("run.json");
    std::fs::write(&json, r#"{"batch_size": 8, "batch_size": 16}"#).unwrap();
    let o = sgr(&["train", "--config", json.to_str().unwrap()]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("run.json") && t.contains("duplicate field"),
        "{t}"
    );
}

#[test]
fn a_closed_stdout_stops_the_printing_not_the_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cmd = format!(
        "'{}' train --model resnet8 --train-limit 64 --epochs 3 --out '{}' | head -1",
        env!("CARGO_BIN_EXE_sgr"),
        out.display()
    );
    let o = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("sgr train:"));
    // head exits after the first line; the training still finishes and saves everything.
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("summary.json").is_file());
}

#[test]
fn a_missing_file_is_reported_once() {
    let o = sgr(&[
        "train",
        "--init-from",
        "/nonexistent.safetensors",
        "--out",
        "/tmp/unused",
    ]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("/nonexistent.safetensors"), "{t}");
    assert_eq!(t.matches("os error 2").count(), 1, "{t}");
}

#[test]
fn eval_of_a_missing_checkpoint_names_it() {
    let o = sgr(&["eval", "--checkpoint", "/nonexistent"]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("/nonexistent: no such file or directory"), "{t}");
    assert!(!t.contains("/config.json"), "{t}");
}

/// A run that stopped before its first checkpoint (a crash, a kill) leaves its configuration
/// and an empty metrics file. Rerunning the command replaces it, and `--resume` says what to
/// do instead of failing on the missing checkpoint.
#[test]
fn a_run_stopped_before_its_first_checkpoint_can_be_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let args = [
        "train",
        "--model",
        "resnet8",
        "--train-limit",
        "64",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--out",
        out_s,
    ];
    let crash_before_first_checkpoint = || {
        for f in [
            "checkpoint.safetensors",
            "model.safetensors",
            "summary.json",
            "README.md",
        ] {
            let _ = std::fs::remove_file(out.join(f));
        }
        std::fs::write(out.join("metrics.jsonl"), "").unwrap();
    };
    let o = sgr(&args);
    assert!(o.status.success(), "{}", text(&o));
    crash_before_first_checkpoint();
    // The same command again: nothing trained is lost, so no --overwrite is needed.
    let o = sgr(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("model.safetensors").is_file());
    crash_before_first_checkpoint();
    let o = sgr(&["train", "--resume", out_s]);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("before its first checkpoint"), "{t}");
    let config = format!("{out_s}/config.json");
    assert!(
        t.contains(&format!("sgr train --config {config} --out {out_s}")),
        "{t}"
    );
    let o = sgr(&["train", "--config", &config, "--out", out_s]);
    assert!(o.status.success(), "{}", text(&o));
    // A run with a checkpoint is still kept unless overwritten.
    let o = sgr(&args);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already holds a run"), "{}", text(&o));
}

/// Runs `sgr` and kills it after `secs`: a read that never ends fails the test instead of
/// hanging it.
fn sgr_within(args: &[&str], secs: u64) -> (bool, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() >= secs {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    (o.status.success(), text(&o))
}

/// Every file sgr reads must be a regular file of bounded size: a device, a FIFO or a link to
/// one, in any place a file is read (a config, a class index, the second file of a data split,
/// a model, a chart), is an error naming the file at once, not a read that blocks forever or
/// fills the memory.
#[test]
fn special_files_are_refused_wherever_a_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let fifo = p("fifo");
    let c = std::ffi::CString::new(fifo.as_str()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A CIFAR-10 folder whose third training batch is a link to /dev/zero.
    let cifar = dir.path().join("cifar");
    std::fs::create_dir(&cifar).unwrap();
    let record: Vec<u8> = (0..3073u32).map(|i| (i % 10) as u8).collect();
    for f in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        std::fs::write(cifar.join(f), record.repeat(2)).unwrap();
    }
    std::os::unix::fs::symlink("/dev/zero", cifar.join("data_batch_3.bin")).unwrap();
    // An image folder with two classes of one picture each.
    let folder = dir.path().join("folder");
    for split in ["train", "val"] {
        for class in ["a", "b"] {
            let d = folder.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            image::RgbImage::from_pixel(4, 4, image::Rgb([9, 99, 199]))
                .save(d.join("x.png"))
                .unwrap();
        }
    }
    let (r1, r2, r3, plots) = (p("r1"), p("r2"), p("r3"), p("plots"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--config", "/dev/zero"], "/dev/zero"),
        (vec!["train", "--config", "/dev/urandom"], "/dev/urandom"),
        (vec!["train", "--config", &fifo], "fifo"),
        (
            vec![
                "train",
                "--dataset",
                "cifar10",
                "--data-dir",
                cifar.to_str().unwrap(),
                "--out",
                &r1,
            ],
            "data_batch_3.bin",
        ),
        (
            vec![
                "train",
                "--dataset",
                "imagefolder",
                "--data-dir",
                folder.to_str().unwrap(),
                "--class-index",
                "/dev/zero",
                "--out",
                &r2,
            ],
            "/dev/zero",
        ),
        (vec!["train", "--init-from", &fifo, "--out", &r3], "fifo"),
        (
            vec!["plot", "--lines", "/dev/urandom", "--out", &plots],
            "/dev/urandom",
        ),
    ];
    for (args, names) in cases {
        let (ok, t) = sgr_within(&args, 30);
        assert!(!ok, "{args:?} succeeded: {t}");
        assert!(
            t.contains(names),
            "{args:?}: the message names no `{names}`: {t}"
        );
        assert!(
            t.contains("not a regular file") || t.contains("No such file"),
            "{args:?}: {t}"
        );
        assert!(!t.contains("panicked"), "{t}");
    }
}

/// A byte-order mark before a JSON or TOML config is skipped; an error that echoes a huge value
/// (a 1 MB model name) is printed with its middle left out, not whole.
#[test]
fn config_files_with_a_bom_read_and_huge_values_are_not_echoed_whole() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("bom.json", "\u{feff}{\"model\": \"resnet8\"}"),
        ("bom.toml", "\u{feff}model = \"resnet8\"\n"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let o = sgr(&["train", "--config", path.to_str().unwrap(), "--print-spec"]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains("\"model\":\"resnet8\""), "{}", text(&o));
    }
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("model = \"{}\"\n", "x".repeat(1_000_000))).unwrap();
    let o = sgr(&["train", "--config", big.to_str().unwrap(), "--print-spec"]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.len() < 3000 && t.contains("characters left out") && t.contains("big.toml"),
        "{}",
        t.len()
    );
}

/// A training image that cannot be read mid-epoch stops the run with one message naming the
/// file, after saving a checkpoint of the steps before it, as Ctrl-C does; once the file is
/// fixed, --resume finishes the run.
#[test]
fn a_bad_training_image_saves_a_checkpoint_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    let good = |p: &std::path::Path, shade: u8| {
        image::RgbImage::from_pixel(8, 8, image::Rgb([shade, 99, 199]))
            .save(p)
            .unwrap();
    };
    for split in ["train", "val"] {
        for class in ["a", "b"] {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..20u8 {
                good(&d.join(format!("{i:02}.png")), i * 12);
            }
        }
    }
    // Sample 24 of 40: not among the 32 images the data fingerprint decodes before training
    // (sgr_run::identity), so it is found mid-epoch.
    let bad = root.join("train/b/04.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let run = dir.path().join("run");
    let args = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root.to_str().unwrap(),
        "--model",
        "resnet8",
        "-k",
        "2",
        "--image-size",
        "8",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--out",
        run.to_str().unwrap(),
    ];
    let o = sgr(&args);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("04.png") && t.contains("--resume"), "{t}");
    assert_eq!(t.matches("04.png").count(), 1, "named once: {t}");
    assert!(run.join("checkpoint.safetensors").is_file(), "{t}");
    good(&bad, 120);
    let o = sgr(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--allow-data-change",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(run.join("summary.json").is_file());
}

/// A bad test image is found before the first step (the test split is first read after a whole
/// epoch), named once, and nothing of the run is written.
#[test]
fn a_bad_test_image_is_found_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    common::image_folder(&root, &["train", "val"], &["a", "b"], 20);
    // Sample 24 of 40: not among the 32 images the data fingerprint decodes
    // (sgr_run::identity). Cut short, its header intact.
    let bad = root.join("val/b/04.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() - 20]).unwrap();
    let run = dir.path().join("run");
    let o = sgr(&[
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root.to_str().unwrap(),
        "--model",
        "resnet8",
        "--image-size",
        "8",
        "--epochs",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert_eq!(t.matches("04.png").count(), 1, "named once: {t}");
    assert!(!run.join("config.json").exists(), "{t}");
}
