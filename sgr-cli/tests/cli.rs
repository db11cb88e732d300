//! End-to-end tests of the `sgr` binary.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{idx, image_folder, sgr, text};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn train_writes_a_complete_run_directory_for_every_method() {
    for method in ["bp", "greedy", "sgr"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let o = sgr(&[
            "train",
            "--method",
            method,
            "--model",
            "resnet8",
            "--epochs",
            "2",
            "--max-steps",
            "5",
            "--train-limit",
            "64",
            "--batch-size",
            "16",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{method}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains("epoch   1/2") && t.contains("test acc"), "{t}");
        let s = json(&out.join("summary.json"));
        for key in [
            "method",
            "model",
            "dataset",
            "modules",
            "epochs",
            "test_accuracy",
            "test_error",
            "train_seconds",
            "peak_memory_bytes",
        ] {
            assert!(!s[key].is_null(), "{method}: summary lacks {key}: {s}");
        }
        assert_eq!(s["method"], method);
        assert_eq!(s["dataset"], "digits");
        assert_eq!(s["modules"], if method == "bp" { 1 } else { 4 });
        assert_eq!(s["steps"], 5);
        assert!(s["peak_memory_bytes"].as_u64().unwrap() > 1_000_000);
        let acc = s["test_accuracy"].as_f64().unwrap();
        assert!((s["test_error"].as_f64().unwrap() - (1.0 - acc)).abs() < 1e-12);
        let cfg = json(&out.join("config.json"));
        assert_eq!(cfg["trainer"]["method"], method);
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        // 64 samples / 16 = 4 steps per epoch, capped at 5 steps: one whole epoch.
        assert_eq!(lines.lines().count(), 1);
        let m: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        assert!(m["test_accuracy"].is_number() && m["boundaries"].is_array());
        if method != "bp" {
            assert_eq!(m["boundaries"].as_array().unwrap().len(), 3);
        }
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        assert!(bytes.len() > 100_000);
        assert!(out.join("checkpoint.safetensors").is_file());
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(card.starts_with("---\nlibrary_name: sgr") && card.contains("test accuracy"));
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let cases: [(&[&str], &str); 9] = [
        (&["train", "--device", "cuda"], "built without GPU support"),
        (
            &["train", "--model", "resnet33"],
            "unknown model `resnet33`",
        ),
        (
            &["train", "--method", "bp", "--modules", "4"],
            "--modules must be 1",
        ),
        (
            &[
                "train",
                "--model",
                "resnet32",
                "--split",
                "infopro",
                "--modules",
                "5",
            ],
            "K in {1, 2, 3, 4, 8, 16",
        ),
        (
            &["train", "--model", "resnet8", "--modules", "9"],
            "K from 1 to 4",
        ),
        (
            &[
                "train",
                "--dataset",
                "cifar10",
                "--data-dir",
                "/nonexistent/cifar",
            ],
            "cifar-10-batches-bin",
        ),
        (
            &["train", "--dataset", "svhn", "--data-dir", "/nonexistent"],
            "train_32x32.mat",
        ),
        (&["train", "--dataset", "stl10"], "needs --data-dir"),
        (
            &["train", "--randaugment", "2,40"],
            "--randaugment takes N,M",
        ),
    ];
    for (args, want) in cases {
        let o = sgr(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let t = text(&o);
        assert!(t.contains(want), "{args:?}: `{want}` not in: {t}");
        assert!(!t.contains("panicked"), "{t}");
    }
}

/// MNIST-style IDX data feeds the CIFAR ResNets (padded to 32x32, grey repeated to RGB).
#[test]
fn train_on_idx_files() {
    let dir = tempfile::tempdir().unwrap();
    for (stem, n) in [("train", 48u32), ("t10k", 16)] {
        let pixels: Vec<u8> = (0..n * 784).map(|i| ((i * 7) % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        std::fs::write(
            dir.path().join(format!("{stem}-images-idx3-ubyte")),
            idx(0x803, &[n, 28, 28], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("{stem}-labels-idx1-ubyte")),
            idx(0x801, &[n], &labels),
        )
        .unwrap();
    }
    let out = dir.path().join("run");
    let o = sgr(&[
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--model",
        "resnet8",
        "--modules",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["train_samples"], 48);
    assert_eq!(s["test_samples"], 16);
    assert_eq!(s["dataset"], "mnist");
}

/// Writes MNIST-layout IDX files (48 training and 16 test images) whose pixels depend on
/// `shade`.
fn write_idx_set(dir: &Path, shade: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for (stem, n) in [("train", 48u32), ("t10k", 16)] {
        let pixels: Vec<u8> = (0..n * 784)
            .map(|i| ((i * 7 + shade) % 256) as u8)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        std::fs::write(
            dir.join(format!("{stem}-images-idx3-ubyte")),
            idx(0x803, &[n, 28, 28], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{stem}-labels-idx1-ubyte")),
            idx(0x801, &[n], &labels),
        )
        .unwrap();
    }
}

/// A resume checks that it continues the same run: a relative --data-dir is recorded absolute
/// (so resuming from another folder reads the same data), other data is refused unless
/// --allow-data-change, and an edited config.json is refused, each saying what to do.
#[test]
fn resume_checks_the_configuration_and_the_data() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(&dir.path().join("digits"), 0);
    let run = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .current_dir(dir.path())
        .args([
            "train",
            "--dataset",
            "mnist",
            "--data-dir",
            "digits",
            "--model",
            "resnet8",
            "-k",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--max-steps",
            "2",
            "--out",
            "run",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let cfg = json(&run.join("config.json"));
    let recorded = cfg["data_dir"].as_str().unwrap();
    assert!(Path::new(recorded).is_absolute(), "{recorded}");
    // From another folder, the same data: it continues.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let resume = |extra: &[&str]| {
        let mut args = vec!["train", "--resume", run.to_str().unwrap()];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_sgr"))
            .current_dir(&elsewhere)
            .args(args)
            .output()
            .unwrap()
    };
    let o = resume(&["--max-steps", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    // The data changed under the run: refused, then accepted on request.
    write_idx_set(&dir.path().join("digits"), 3);
    let before = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let o = resume(&["--max-steps", "4"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("differs from the data it was trained on") && t.contains("--allow-data-change"),
        "{t}"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        before
    );
    let o = resume(&["--max-steps", "4", "--allow-data-change"]);
    assert!(o.status.success(), "{}", text(&o));
    // An edited config.json: refused, naming the file and the way out.
    let path = run.join("config.json");
    let edited = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("\"lr\": 0.05", "\"lr\": 0.3", 1);
    assert!(edited.contains("0.3"), "lr not found in config.json");
    std::fs::write(&path, edited).unwrap();
    let o = resume(&["--max-steps", "5"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("config.json differs") && t.contains("--out NEW_DIR"),
        "{t}"
    );
}

/// An ImageNet-style folder of real photos (the CC0 fixtures of sgr-data), with the DeiT extras.
#[test]
fn train_on_an_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sgr-data/tests/fixtures/photos");
    for split in ["train", "val"] {
        for (class, file) in [
            ("cat", "chelsea.png"),
            ("rocket", "rocket.jpg"),
            ("camera", "camera.png"),
        ] {
            let d = dir.path().join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(photos.join(file), d.join(file)).unwrap();
        }
    }
    let out = dir.path().join("run");
    let o = sgr(&[
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--image-size",
        "32",
        "--model",
        "resnet8",
        "--modules",
        "2",
        "--epochs",
        "1",
        "--randaugment",
        "2,9",
        "--random-erasing",
        "0.25",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["train_samples"], 3);
    assert_eq!(s["dataset"], "imagefolder");
    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["randaugment"], serde_json::json!([2, 9]));
}

fn small_run(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model",
        "resnet8",
        "--train-limit",
        "96",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sgr(&args)
}

/// 2 epochs straight and the same run stopped (at an epoch boundary, or mid-epoch) then resumed
/// give bit-identical weights, optimizer state and metrics.
#[test]
fn resume_continues_identically() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let o = small_run(&straight, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let want = std::fs::read(straight.join("model.safetensors")).unwrap();
    let want_metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    for stop_at in ["6", "8"] {
        let run = dir.path().join(format!("stopped{stop_at}"));
        let o = small_run(&run, &["--max-steps", stop_at]);
        assert!(o.status.success(), "{}", text(&o));
        assert_ne!(std::fs::read(run.join("model.safetensors")).unwrap(), want);
        let o = sgr(&["train", "--resume", run.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("resuming"), "{}", text(&o));
        assert_eq!(
            std::fs::read(run.join("model.safetensors")).unwrap(),
            want,
            "stopped at {stop_at}"
        );
        let got_metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let strip = |t: &str| -> Vec<serde_json::Value> {
            t.lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    for k in ["seconds", "elapsed_seconds"] {
                        v.as_object_mut().unwrap().remove(k);
                    }
                    v
                })
                .collect()
        };
        assert_eq!(
            strip(&got_metrics),
            strip(&want_metrics),
            "stopped at {stop_at}"
        );
    }
}

/// `--pipeline N` trains the modules on N worker threads with the sequential run's bits; a
/// stopped pipelined run resumes on another N (or none), and a signal stops it with a
/// checkpoint; more workers than modules is refused naming what works.
#[test]
fn pipelined_runs_are_bit_identical_and_resume_on_any_layout() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let o = small_run(&straight, &["-k", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let want = std::fs::read(straight.join("model.safetensors")).unwrap();
    let piped = dir.path().join("piped");
    let o = small_run(
        &piped,
        &["-k", "3", "--pipeline", "3", "--pipeline-threads", "1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("pipeline: 3 workers x 1 thread"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(piped.join("model.safetensors")).unwrap(),
        want
    );
    let stopped = dir.path().join("stopped");
    let o = small_run(
        &stopped,
        &["-k", "3", "--pipeline", "2", "--max-steps", "7"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = sgr(&[
        "train",
        "--resume",
        stopped.to_str().unwrap(),
        "--pipeline",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(stopped.join("model.safetensors")).unwrap(),
        want
    );
    let o = small_run(&dir.path().join("wide"), &["-k", "3", "--pipeline", "4"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--pipeline 2..=3"), "{}", text(&o));
}

/// The epoch history a resume continues must be whole: a missing or reordered line of
/// metrics.jsonl is an error naming the file and what to do, not a silently shorter history.
#[test]
fn resume_refuses_a_damaged_history() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 96 images in batches of 16: 6 steps per epoch; 8 steps end inside epoch 2.
    let o = small_run(&run, &["--max-steps", "8"]);
    assert!(o.status.success(), "{}", text(&o));
    let metrics = run.join("metrics.jsonl");
    let line = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(line.lines().count(), 1);
    std::fs::write(&metrics, "").unwrap();
    let o = sgr(&["train", "--resume", run.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("metrics.jsonl") && t.contains("lines are missing"),
        "{t}"
    );
    std::fs::write(&metrics, line.replace("\"epoch\":0", "\"epoch\":1")).unwrap();
    let o = sgr(&["train", "--resume", run.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("records epoch 2, expected 1"),
        "{}",
        text(&o)
    );
}

#[test]
fn resume_refuses_other_flags_and_bad_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = small_run(&run, &["--max-steps", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sgr(&["train", "--resume", run.to_str().unwrap(), "--lr", "0.3"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot be used with"), "{}", text(&o));
    let ckpt = run.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 3]).unwrap();
    let before = std::fs::read(run.join("model.safetensors")).unwrap();
    let o = sgr(&["train", "--resume", run.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("checkpoint.safetensors") && !t.contains("panicked"),
        "{t}"
    );
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        before,
        "nothing overwritten"
    );
    let o = sgr(&[
        "train",
        "--resume",
        dir.path().join("nothing").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("config.json"), "{}", text(&o));
}

/// Ctrl-C (SIGINT), SIGTERM (how docker, systemd, Slurm and Kubernetes stop a job) and SIGHUP
/// save a checkpoint and exit cleanly; resuming then finishes the run with the same weights as
/// an uninterrupted one.
#[test]
fn stop_signals_save_and_resume_finishes_identically() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            "resnet8",
            "--train-limit",
            "512",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let o = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args(&straight))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for signal in ["INT", "TERM", "HUP"] {
        let run = dir.path().join(format!("run-{signal}"));
        interrupt_and_resume(&run, &args(&run), signal, &straight);
    }
    // A pipelined run completes the steps in flight, then saves.
    let run = dir.path().join("run-pipeline");
    let mut piped = args(&run);
    piped.extend(["--pipeline".to_string(), "2".to_string()]);
    interrupt_and_resume(&run, &piped, "TERM", &straight);
}

fn interrupt_and_resume(run: &Path, args: &[String], signal: &str, straight: &Path) {
    let child = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training has started (config.json written), then a moment more.
    let t0 = std::time::Instant::now();
    while !run.join("config.json").exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        // The run finished before the signal arrived: nothing to resume, still identical.
        assert!(t.contains("done:"), "SIG{signal}: {t}");
    } else {
        assert_eq!(out.status.code(), Some(130), "SIG{signal}: {t}");
        assert!(t.contains("interrupted") && t.contains("--resume"), "{t}");
        assert!(run.join("checkpoint.safetensors").is_file());
        let o = sgr(&["train", "--resume", run.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap()
    );
}

/// `sgr eval` rebuilds the model from the run directory and reproduces the run's test accuracy.
#[test]
fn eval_reproduces_the_recorded_test_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = small_run(&run, &["--method", "greedy"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json(&run.join("summary.json"));
    let o = sgr(&["eval", "--checkpoint", run.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["top1"], s["test_accuracy"]);
    assert_eq!(v["samples"], 359);
    assert!(v["top5"].as_f64().unwrap() >= v["top1"].as_f64().unwrap());
    // The training checkpoint given where a model is expected says which is which.
    let ckpt = run.join("checkpoint.safetensors");
    let o = sgr(&["eval", "--checkpoint", ckpt.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is a training checkpoint"),
        "{}",
        text(&o)
    );
    // A checkpoint of another model is a clear error naming the file and the tensor.
    let cfg = std::fs::read_to_string(run.join("config.json")).unwrap();
    std::fs::write(
        run.join("config.json"),
        cfg.replace("\"resnet8\"", "\"resnet14\""),
    )
    .unwrap();
    let o = sgr(&[
        "eval",
        "--checkpoint",
        run.join("model.safetensors").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("model.safetensors") && t.contains("tensor `"),
        "{t}"
    );
}

/// `sgr inspect` prints the split plan with per-module parameters and measured activation
/// memory, and the end-to-end comparison.
#[test]
fn inspect_shows_the_split_and_memory() {
    let o = sgr(&[
        "inspect",
        "--model",
        "resnet32",
        "--modules",
        "4",
        "--batch-size",
        "8",
        "--input-size",
        "16",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("464154 backbone parameters"), "{t}");
    // InfoPro's ResNet-32 K=4 table: [1,2], [2,1], [3,0].
    assert!(
        t.contains("stem..layer1.2")
            && t.contains("layer1.3..layer2.1")
            && t.contains("layer2.2..layer3.0"),
        "{t}"
    );
    let line = t.lines().find(|l| l.starts_with("end-to-end")).unwrap();
    let pct: f64 = line
        .rsplit('(')
        .next()
        .unwrap()
        .split('%')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pct > 0.0 && pct < 100.0, "{line}");
}

/// `--config` (TOML or JSON, the schema of `config.json`, any subset of its fields) with
/// command-line flags winning; unknown fields and bad values are errors naming the file.
#[test]
fn config_files_with_flag_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("run.toml");
    std::fs::write(
        &toml_path,
        "model = \"resnet8\"\ntrain_limit = 32\naugment = false\n[trainer]\nmethod = \"sgr\"\nepochs = 1\nlr = 0.3\n[trainer.sgr]\nlambda = 2.5\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let o = sgr(&[
        "train",
        "--config",
        toml_path.to_str().unwrap(),
        "--lr",
        "0.07",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let c = json(&out.join("config.json"));
    assert_eq!(c["model"], "resnet8");
    assert_eq!(c["trainer"]["method"], "sgr");
    assert_eq!(c["trainer"]["lr"], 0.07, "the flag wins over the file");
    assert_eq!(c["trainer"]["sgr"]["lambda"], 2.5);
    assert_eq!(c["augment"], false);
    assert_eq!(c["train_limit"], 32);
    // A run's own config.json is a valid --config file, and reproduces the run's spec.
    let out3 = dir.path().join("run3");
    let o = sgr(&[
        "train",
        "--config",
        out.join("config.json").to_str().unwrap(),
        "--out",
        out3.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&out3.join("config.json")), c);
    let json_path = dir.path().join("run.json");
    std::fs::write(
        &json_path,
        r#"{"model": "resnet8", "train_limit": 16, "trainer": {"epochs": 1, "sgr": {"lambda": 0.5}}}"#,
    )
    .unwrap();
    let out2 = dir.path().join("run2");
    let o = sgr(&[
        "train",
        "--config",
        json_path.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        json(&out2.join("config.json"))["trainer"]["sgr"]["lambda"],
        0.5
    );
    std::fs::write(&toml_path, "modle = \"resnet8\"\n").unwrap();
    let o = sgr(&["train", "--config", toml_path.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("unknown field `modle`") && t.contains("run.toml"),
        "{t}"
    );
    std::fs::write(&json_path, r#"{"trainer": {"epochs": "two"}}"#).unwrap();
    let o = sgr(&["train", "--config", json_path.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("\"two\"") && t.contains("run.json"), "{t}");
}

fn sgr_env(args: &[&str], env: &[(&str, &Path)], offline: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sgr"));
    c.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HUGGINGFACE_HUB_CACHE");
    for (k, v) in env {
        c.env(k, v);
    }
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    }
    c.output().expect("run sgr")
}

/// hf:// references against a Hub cache laid out on disk as hf-hub lays it out (blobs, refs,
/// snapshots with symlinks), never the network.
#[test]
fn hub_references_resolve_from_the_standard_cache() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = small_run(&run, &["--method", "greedy"]);
    assert!(o.status.success(), "{}", text(&o));
    let cache = dir.path().join("hub");
    let repo = cache.join("models--sgr-rs--tiny-digits");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (i, f) in ["config.json", "model.safetensors", "README.md"]
        .iter()
        .enumerate()
    {
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::copy(run.join(f), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(f)).unwrap();
    }
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let env = [("HF_HUB_CACHE", cache.as_path())];

    let o = sgr_env(&["download", "hf://sgr-rs/tiny-digits"], &env, true);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(t.lines().count(), 3, "{t}");
    assert!(t.lines().all(|l| l.contains(commit)), "{t}");

    let want = json(&run.join("summary.json"))["test_accuracy"].clone();
    for reference in [
        "hf://sgr-rs/tiny-digits",
        &format!("hf://sgr-rs/tiny-digits@{commit}/model.safetensors"),
    ] {
        for offline in [true, false] {
            let o = sgr_env(
                &["eval", "--checkpoint", reference, "--json"],
                &env,
                offline,
            );
            assert!(o.status.success(), "{reference}: {}", text(&o));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["top1"], want, "{reference}");
        }
    }
    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::rename(&cache, home.join("hub")).unwrap();
    let o = sgr_env(
        &["download", "hf://sgr-rs/tiny-digits"],
        &[("HF_HOME", home.as_path())],
        true,
    );
    assert!(o.status.success(), "{}", text(&o));

    // Offline and not cached: a clear error naming the cache, at once.
    let t0 = std::time::Instant::now();
    let o = sgr_env(
        &["download", "hf://sgr-rs/missing"],
        &[("HF_HOME", home.as_path())],
        true,
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("HF_HUB_OFFLINE") && t.contains("config.json") && t.contains("hub"),
        "{t}"
    );
    assert!(t0.elapsed().as_secs() < 5);
    let o = sgr_env(
        &["download", "hf://sgr-rs/tiny-digits@v2"],
        &[("HF_HOME", home.as_path())],
        true,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("@v2"), "{}", text(&o));
    let o = sgr(&["download", "hf://not a repo"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is not hf://owner/repo"), "{}", text(&o));
}

/// `sgr plot` draws the curves and the reconciliation heat map as real PNGs.
#[test]
fn plot_writes_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = small_run(&run, &["--method", "greedy"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sgr(&["plot", "--run", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    for (f, w) in [("curves.png", 1200), ("reconciliation.png", 700)] {
        let img = image::open(run.join(f)).unwrap().to_rgb8();
        assert_eq!(img.width(), w, "{f}");
        // Drawn content: dark text/axes and coloured series or cells, not a blank canvas.
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        let coloured = img
            .pixels()
            .filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60)
            .count();
        assert!(
            dark > 500 && coloured > 500,
            "{f}: {dark} dark, {coloured} coloured pixels"
        );
    }
    // bp has no boundary: curves only.
    let bp = dir.path().join("bp");
    let o = small_run(&bp, &["--method", "bp", "--epochs", "1"]);
    assert!(!o.status.success(), "--epochs given twice must be refused");
    let o = sgr(&[
        "train",
        "--model",
        "resnet8",
        "--method",
        "bp",
        "--train-limit",
        "32",
        "--epochs",
        "1",
        "--out",
        bp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sgr(&["plot", "--run", bp.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(bp.join("curves.png").is_file() && !bp.join("reconciliation.png").exists());
    let o = sgr(&["plot", "--run", dir.path().join("none").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("metrics.jsonl"), "{}", text(&o));
}

/// `sgr bench --json` reports the median step time, throughput and peak memory.
#[test]
fn bench_reports_json() {
    for method in ["bp", "greedy", "sgr"] {
        let base = [
            "bench",
            "--model",
            "resnet8",
            "--method",
            method,
            "--input-size",
            "8",
            "--in-channels",
            "1",
            "--batch-size",
            "8",
            "--steps",
            "3",
        ];
        let with =
            |last: &'static str| -> Vec<&str> { base.iter().copied().chain([last]).collect() };
        let o = sgr(&with("--json"));
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["method"], method);
        assert_eq!(v["step_seconds"].as_array().unwrap().len(), 3);
        let median = v["median_step_seconds"].as_f64().unwrap();
        assert!(median > 0.0);
        assert!((v["images_per_s"].as_f64().unwrap() - 8.0 / median).abs() < 1e-6);
        assert!(v["peak_memory_bytes"].as_u64().unwrap() > 1_000_000);
        let report: sgr_schema::BenchReport = serde_json::from_value(v).unwrap();
        assert!(report.peak_heap_bytes > 100_000, "{report:?}");
        // --print-spec hashes what the measurement depends on, the same hash the report has.
        let args = with("--print-spec");
        let o = sgr(&args);
        assert!(o.status.success(), "{}", text(&o));
        let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(p["spec_hash"], report.spec_hash.as_str());
        assert_eq!(p["spec"]["batch_size"], 8);
        let mut wider = args;
        wider[10] = "16";
        let o = sgr(&wider);
        let q: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_ne!(q["spec_hash"], p["spec_hash"]);
    }
}

/// `sgr plot --lines` draws a chart given as data, and names a file that is not one.
#[test]
fn plot_draws_a_line_chart_from_data() {
    let dir = tempfile::tempdir().unwrap();
    let chart = sgr_schema::LineChart {
        title: "error against K".into(),
        x_label: "K".into(),
        y_label: "error %".into(),
        x_log2: true,
        series: vec![
            sgr_schema::Series {
                label: "greedy".into(),
                points: vec![(2.0, 10.0), (4.0, 16.0), (8.0, 21.0)],
                dashed: false,
            },
            sgr_schema::Series {
                label: "bp".into(),
                points: vec![(2.0, 7.0), (8.0, 7.0)],
                dashed: true,
            },
        ],
    };
    let file = dir.path().join("chart.json");
    std::fs::write(&file, serde_json::to_string(&chart).unwrap()).unwrap();
    let o = sgr(&["plot", "--lines", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let img = image::open(dir.path().join("chart.png")).unwrap().to_rgb8();
    assert_eq!(img.width(), 1000);
    let coloured = img
        .pixels()
        .filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60)
        .count();
    assert!(coloured > 500, "{coloured} coloured pixels");
    std::fs::write(&file, "{\"title\": 1}").unwrap();
    let o = sgr(&["plot", "--lines", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is not a line chart"), "{}", text(&o));
    let o = sgr(&["plot", "--lines", file.to_str().unwrap(), "--run", "x"]);
    assert!(!o.status.success());
}

/// A trained model stores its preprocessing (normalisation, shape, class names) in its
/// metadata, so `sgr eval` needs only the test split: with the training files gone it gives
/// exactly the numbers it gave with them, for in-memory data sets and image folders; a test
/// class the model never saw is refused, naming the folder.
#[test]
fn eval_needs_only_the_test_split() {
    let dir = tempfile::tempdir().unwrap();
    let eval = |run: &Path| {
        let o = sgr(&["eval", "--checkpoint", run.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_object_mut().unwrap().remove("seconds");
        v
    };
    let train = |args: &[&str], run: &Path| {
        let mut a = vec![
            "train",
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
        ];
        a.push(run.to_str().unwrap());
        a.extend_from_slice(args);
        let o = sgr(&a);
        assert!(o.status.success(), "{}", text(&o));
    };
    // IDX files: the normalisation comes from the training images.
    let data = dir.path().join("mnist");
    write_idx_set(&data, 5);
    let run = dir.path().join("run-idx");
    train(
        &["--dataset", "mnist", "--data-dir", data.to_str().unwrap()],
        &run,
    );
    let with_train = eval(&run);
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        std::fs::remove_file(data.join(f)).unwrap();
    }
    assert_eq!(eval(&run), with_train);

    // An image folder: the classes come from the training folders.
    let root = dir.path().join("folder");
    image_folder(&root, &["train", "val"], &["ant", "bee", "cat"], 6);
    let run = dir.path().join("run-folder");
    train(
        &[
            "--dataset",
            "imagefolder",
            "--data-dir",
            root.to_str().unwrap(),
            "--image-size",
            "8",
        ],
        &run,
    );
    let with_train = eval(&run);
    std::fs::remove_dir_all(root.join("train")).unwrap();
    assert_eq!(eval(&run), with_train);
    // Labels keep their meaning when a class has no test folder.
    std::fs::remove_dir_all(root.join("val/ant")).unwrap();
    let without = eval(&run);
    assert_eq!(without["samples"], 12);
    std::fs::create_dir_all(root.join("val/dog")).unwrap();
    image::RgbImage::new(8, 8)
        .save(root.join("val/dog/0.png"))
        .unwrap();
    let o = sgr(&["eval", "--checkpoint", run.to_str().unwrap()]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("dog") && t.contains("the model's classes"),
        "{t}"
    );
    assert_eq!(with_train["samples"], 18);
}
