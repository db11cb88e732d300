//! `sgr train --model M` for the zoo's ImageNet ResNets and Transformers under every method, on
//! a small CIFAR-10-format data set made of the 20 real images in the sgr-data fixtures.
//!
//! One test per model and method, each run on one compute thread: a run is mostly serial work
//! (initialising the model twice, once for the memory estimate, and writing it), so the harness
//! runs one per core side by side; each run's folder is removed as soon as it is checked
//! (ResNet-101's is 0.5 GB).

mod common;

use common::{sgr, sgr_one_thread, text};

/// A CIFAR-10 folder: the fixture's 20 images as each of the five training batches and as the
/// test batch.
fn cifar_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sgr-data/tests/fixtures/cifar10-foolbox/test_batch.bin");
    for i in 1..=5 {
        std::fs::copy(&src, dir.path().join(format!("data_batch_{i}.bin"))).unwrap();
    }
    std::fs::copy(&src, dir.path().join("test_batch.bin")).unwrap();
    dir
}

/// One step of `model` under `method` (K = 2 but for bp): the run succeeds and its summary names
/// the model and has a finite test accuracy.
fn trains(model: &str, method: &str) {
    let data = cifar_dir();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join(format!("{model}-{method}"));
    let mut args = vec![
        "train",
        "--model",
        model,
        "--method",
        method,
        "--dataset",
        "cifar10",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--out",
        dir.to_str().unwrap(),
    ];
    if method != "bp" {
        args.extend(["--modules", "2"]);
    }
    let o = sgr_one_thread(&args);
    assert!(o.status.success(), "{model} {method}: {}", text(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["model"], model);
    assert!(summary["test_accuracy"].as_f64().unwrap().is_finite());
}

/// Every family trains under every method: a module per model, a test per method in it
/// (`resnet101::sgr`), so that `cargo test resnet101` or `cargo test sgr` picks a part.
macro_rules! every_method {
    ($($module:ident = $model:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            fn bp() {
                super::trains($model, "bp");
            }
            #[test]
            fn greedy() {
                super::trains($model, "greedy");
            }
            #[test]
            fn sgr() {
                super::trains($model, "sgr");
            }
        }
    )*};
}

every_method!(
    resnet18 = "resnet18",
    resnet50 = "resnet50",
    resnet101 = "resnet101",
    deit_ti = "deit-ti",
    deit_s = "deit-s",
    vit_cifar = "vit-cifar",
);

/// A Transformer's image side must be a multiple of its patch: the error says so.
#[test]
fn a_patch_that_does_not_tile_the_image_is_an_error() {
    let o = sgr(&[
        "train",
        "--model",
        "deit-s",
        "--max-steps",
        "1",
        "--out",
        tempfile::tempdir().unwrap().path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("patch") && t.contains("16"), "{t}");
}
