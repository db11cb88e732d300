//! Runs as the user sees them: same bits as before the engine's seams were opened, resuming a
//! finished run, extending a run, and starting from trained weights.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

mod common;
use common::{sgr, sgr_one_thread, text};

use sha2::{Digest, Sha256};

/// SHA-256 over a safetensors file's tensors (names, dtypes, shapes and bytes, in name order),
/// not its header metadata.
fn tensor_hash(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut h = Sha256::new();
    for n in names {
        let t = st.tensor(&n).unwrap();
        h.update(n.as_bytes());
        h.update([0]);
        h.update(format!("{:?}", t.dtype()).as_bytes());
        h.update([0]);
        for d in t.shape() {
            h.update((*d as u64).to_le_bytes());
        }
        h.update(t.data());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The default job, `--method greedy` and `--method bp` write the same weights, bit for bit, as
/// before. The CPU kernels pick their path at run time (the direct convolutions and gemm's
/// AVX-512 kernels where the CPU has AVX-512F), and the two paths round differently, so each
/// path has its own values: without AVX-512F those of the commit before the seams (00ca3aa);
/// with it those of commit bc441e6, recorded on an AVX-512 machine.
///
/// One test per job, each on one compute thread (the bits do not depend on the thread count):
/// these small steps gain little from a second thread, so the harness runs two jobs side by side.
mod default_jobs_train_the_same_bits_as_before {
    use super::{avx512f, sgr_one_thread, tensor_hash, text};

    /// Trains the default job with `flags` and compares its weights with `plain` (without
    /// AVX-512F) or `avx512` (with it).
    fn same_bits(flags: &[&str], plain: &str, avx512: &str) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut args = vec!["train", "--out", out.to_str().unwrap()];
        args.extend_from_slice(flags);
        let o = sgr_one_thread(&args);
        assert!(o.status.success(), "{flags:?}: {}", text(&o));
        let avx512f = avx512f();
        let want = if avx512f { avx512 } else { plain };
        assert_eq!(
            tensor_hash(&out.join("model.safetensors")),
            want,
            "{flags:?} (AVX-512F: {avx512f})"
        );
    }

    #[test]
    fn default() {
        same_bits(
            &[],
            "112aff4555bb188c2277d02c76951875639e7f856c55491f5a04750093c4eda0",
            "ca2be4deb196dbd732ad4cfe43c389deca87700bd87a0d22050701ad842fdb3e",
        );
    }

    #[test]
    fn greedy() {
        same_bits(
            &["--method", "greedy"],
            "111c9660231e08abd79bdda6c851ee165950d70e41b93925ca5c348603f4a2f0",
            "0ed9e19aaf506e154789e0d26843208de90b4409fb40dabc93789f0e5e7a11f1",
        );
    }

    #[test]
    fn bp() {
        same_bits(
            &["--method", "bp"],
            "9cf8918ce284fe9a51260a349edbbcbe81de06e5e16829c324564fb690060ca2",
            "736f53dc0c1093ed6a049a55af110a0349e360c1069e6a759d99c8391a6a768c",
        );
    }
}

/// Whether the CPU has AVX-512F, the test the kernels choose their path by.
fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn small(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model",
        "resnet8",
        "--train-limit",
        "96",
        "--batch-size",
        "16",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sgr(&args)
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn resuming_a_finished_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = small(&run, &["--epochs", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let before = files(&run);
    let o = sgr(&["train", "--resume", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("has finished its 2 epochs") && t.contains("nothing to do"),
        "{t}"
    );
    assert!(
        !t.contains("stopped after") && !t.contains("resuming"),
        "{t}"
    );
    assert_eq!(files(&run), before, "every file byte-identical");
}

#[test]
fn extending_a_run_is_bit_identical_to_training_longer() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let o = small(&straight, &["--epochs", "2", "--schedule", "constant"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("run");
    let o = small(&run, &["--epochs", "1", "--schedule", "constant"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sgr(&["train", "--resume", run.to_str().unwrap(), "--epochs", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resuming"), "{}", text(&o));
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap()
    );
    let metrics = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["seconds", "elapsed_seconds"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    assert_eq!(metrics(&run), metrics(&straight));
    // Fewer epochs than are done is an error that changes nothing.
    let before = files(&run);
    let o = sgr(&["train", "--resume", run.to_str().unwrap(), "--epochs", "1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already"), "{}", text(&o));
    assert_eq!(files(&run), before);
}

#[test]
fn init_from_starts_from_trained_weights() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let o = small(&a, &["--epochs", "1", "--method", "greedy"]);
    assert!(o.status.success(), "{}", text(&o));
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    let b = dir.path().join("b");
    let o = small(
        &b,
        &[
            "--epochs",
            "1",
            "--method",
            "greedy",
            "--seed",
            "5",
            "--init-from",
            a.to_str().unwrap(),
            "--max-steps",
            "0",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("initial weights: test acc"),
        "{}",
        text(&o)
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["initial_test_accuracy"], recorded["test_accuracy"]);
    assert_eq!(s["test_accuracy"], recorded["test_accuracy"]);
    assert_eq!(
        tensor_hash(&b.join("model.safetensors")),
        tensor_hash(&a.join("model.safetensors"))
    );
    // Weights of another model are a clear error naming the file.
    let c = dir.path().join("c");
    let o = sgr(&[
        "train",
        "--model",
        "resnet14",
        "--train-limit",
        "96",
        "--out",
        c.to_str().unwrap(),
        "--init-from",
        a.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("model.safetensors"), "{}", text(&o));
}

#[test]
fn print_spec_prints_the_resolved_spec_and_its_hash() {
    let o = sgr(&["train", "--print-spec", "--method", "bp"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spec"]["modules"], 1);
    assert_eq!(v["spec"]["trainer"]["method"], "bp");
    assert_eq!(v["spec_hash"].as_str().unwrap().len(), 64);
    let o2 = sgr(&["train", "--print-spec", "--method", "bp", "--lr", "0.1"]);
    let v2: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_ne!(v["spec_hash"], v2["spec_hash"]);
}
