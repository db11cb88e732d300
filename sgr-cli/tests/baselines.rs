//! `sgr train --method` for the baselines and their SGR compositions, InfoPro's flags, and
//! `--validation`.

mod common;

use std::path::Path;

use common::{sgr, text};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn run(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--model",
        "resnet8",
        "--modules",
        "3",
        "--train-limit",
        "64",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sgr(&args)
}

#[test]
fn every_baseline_trains_with_and_without_sgr() {
    let dir = tempfile::tempdir().unwrap();
    for method in [
        "dgl",
        "dgl+sgr",
        "infopro",
        "infopro+sgr",
        "infopro-contrast",
        "infopro-contrast+sgr",
    ] {
        let out = dir.path().join(method);
        let o = run(&out, &["--method", method]);
        assert!(o.status.success(), "{method}: {}", text(&o));
        let s = json(&out.join("summary.json"));
        assert_eq!(s["method"], method);
        assert!(s["test_accuracy"].as_f64().unwrap() >= 0.0);
        assert_eq!(s["final_boundary_cos"].as_array().unwrap().len(), 2);
        let cfg = json(&out.join("config.json"));
        assert_eq!(cfg["trainer"]["method"], method);
        // The default InfoPro settings are left out of config.json.
        assert!(cfg.get("infopro").is_none(), "{cfg}");
        let names: Vec<String> = sgr_core_names(&out.join("model.safetensors"));
        let decoders = names.iter().any(|n| n.contains(".decoder."));
        assert_eq!(
            decoders,
            method.starts_with("infopro"),
            "{method}: {names:?}"
        );
        if method.starts_with("dgl") {
            assert!(
                names.iter().any(|n| n == "aux.0.classifier.9.weight"),
                "{names:?}"
            );
        }
    }
}

/// The tensor names of a safetensors file.
fn sgr_core_names(path: &Path) -> Vec<String> {
    sgr_core::checkpoint::load_tensors(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_keys()
        .collect()
}

#[test]
fn infopro_flags_reach_config_json_and_bad_combinations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = run(
        &out,
        &[
            "--method",
            "infopro-contrast",
            "--infopro-recon",
            "2,0.5",
            "--infopro-task",
            "1",
            "--contrast-temperature",
            "0.1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let c = &json(&out.join("config.json"))["infopro"];
    assert_eq!(c["recon_first"], 2.0);
    assert_eq!(c["recon_last"], 0.5);
    assert_eq!(c["task_first"], 1.0);
    assert_eq!(c["task_last"], 1.0);
    assert_eq!(c["temperature"], 0.1);
    let cases: [(&[&str], &[&str]); 9] = [
        (
            &["train", "--method", "bp+sgr"],
            &["end to end", "dgl+sgr", "infopro-contrast+sgr"],
        ),
        (
            &["train", "--method", "infopro-contrastive"],
            &["unknown method `infopro-contrastive`", "infopro-contrast"],
        ),
        (
            &["train", "--method", "greedy", "--infopro-recon", "1,1"],
            &["--infopro-recon needs an InfoPro method"],
        ),
        (
            &[
                "train",
                "--method",
                "infopro",
                "--contrast-temperature",
                "0.1",
            ],
            &["--contrast-temperature needs --method infopro-contrast"],
        ),
        (
            &["train", "--method", "infopro", "--infopro-task", "1,x"],
            &["FIRST,LAST"],
        ),
        (
            &["train", "--method", "infopro", "--infopro-recon=-1"],
            &["recon_first must be finite and ≥ 0"],
        ),
        (
            &[
                "train",
                "--method",
                "infopro",
                "--infopro-recon",
                "0",
                "--infopro-task",
                "0,1",
            ],
            &["both 0", "first local module"],
        ),
        (
            &["train", "--method", "infopro-contrast", "--mixup", "0.8"],
            &["hard labels", "--mixup"],
        ),
        (
            &["train", "--method", "dgl", "--aux-head", "1c2f"],
            &["DGL's own aux head", "greedy --aux-head 1c2f"],
        ),
    ];
    for (args, wants) in cases {
        let o = sgr(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let t = text(&o);
        for want in wants {
            assert!(t.contains(want), "{args:?}: `{want}` not in: {t}");
        }
        assert!(!t.contains("panicked"), "{t}");
    }
    // A Transformer has no feature map for InfoPro's decoder.
    let o = sgr(&[
        "train",
        "--model",
        "vit-cifar",
        "--method",
        "infopro",
        "--modules",
        "2",
        "--max-steps",
        "1",
        "--out",
        dir.path().join("vit").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("feature map"), "{}", text(&o));
}

#[test]
fn validation_holds_out_training_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // The digits have 1438 training images: 100 held out, the first 64 of the rest trained on.
    let o = run(&out, &["--method", "greedy", "--validation", "100"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("(64 train / 100 validation, held out"), "{t}");
    assert!(t.contains("done: validation accuracy"), "{t}");
    let s = json(&out.join("summary.json"));
    assert_eq!(s["validation"], true);
    assert_eq!(s["test_samples"], 100);
    assert_eq!(json(&out.join("config.json"))["validation"], 100);
    // `sgr eval` reports the test split (359 images).
    let o = sgr(&["eval", "--checkpoint", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("test (359 samples)"), "{}", text(&o));
    let o = run(&dir.path().join("big"), &["--validation", "1438"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--validation 1438: the training set has only 1438 images"),
        "{}",
        text(&o)
    );
}
