//! Every enum value has one spelling, the same on the command line, in config files and in
//! `config.json`: this pins every serialized name, so that a rename is a decision, not an
//! accident (AdamW was written `adam-w` by serde while the command line said `adamw`).

use serde::{de::DeserializeOwned, Serialize};
use sgr_core::method::{Estimator, Objective};
use sgr_core::names::Named;
use sgr_core::optim::{DecayScope, OptimizerConfig, Schedule};
use sgr_core::sgr::{Direction, Distance, SgrGrad};
use sgr_models::{HeadKind, SplitStrategy};
use sgr_run::{Dataset, DeviceKind, OptimizerKind, ScheduleKind};

/// The names of `T` are exactly `want`, and serde writes and reads each value as its name.
fn pinned<T>(want: &[&str])
where
    T: Named + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + std::str::FromStr,
    T::Err: std::fmt::Debug,
{
    assert_eq!(T::names(), want, "{}", T::WHAT);
    for (name, value) in T::table() {
        assert_eq!(serde_json::to_value(value).unwrap(), *name);
        let back: T = serde_json::from_value(serde_json::json!(name)).unwrap();
        assert_eq!(back, *value);
        assert_eq!(
            name.parse::<T>().unwrap(),
            *value,
            "the command line's spelling"
        );
    }
}

#[test]
fn every_named_enum_writes_its_one_name() {
    pinned::<Objective>(&["bp", "greedy", "dgl", "infopro", "infopro-contrast"]);
    pinned::<Estimator>(&["backprop", "forward-weight", "forward-activity"]);
    pinned::<Distance>(&["squared-l2", "cosine", "cosine-per-sample"]);
    pinned::<Direction>(&["forward", "backward"]);
    pinned::<SgrGrad>(&["finite-difference", "forward-difference", "exact"]);
    pinned::<DecayScope>(&["all", "weights"]);
    pinned::<HeadKind>(&[
        "auto",
        "0c1f",
        "1c2f",
        "infopro",
        "dgl",
        "token",
        "mean",
        "block-token",
        "block-mean",
    ]);
    pinned::<SplitStrategy>(&[
        "auto",
        "infopro",
        "infopro-balanced",
        "uniform",
        "block",
        "balanced",
    ]);
    pinned::<Dataset>(&[
        "digits",
        "cifar10",
        "cifar100",
        "mnist",
        "fashion-mnist",
        "svhn",
        "stl10",
        "imagefolder",
    ]);
    pinned::<DeviceKind>(&["cpu", "cuda"]);
    pinned::<OptimizerKind>(&["sgd", "adamw"]);
    pinned::<ScheduleKind>(&["cosine", "constant"]);
}

#[test]
fn aliases_read_but_are_never_written() {
    // `finite-difference` is a central difference; both spellings read.
    let central: SgrGrad = serde_json::from_value(serde_json::json!("central-difference")).unwrap();
    assert_eq!(central, SgrGrad::FiniteDifference);
    assert_eq!("central-difference".parse::<SgrGrad>().unwrap(), central);
    assert_eq!(serde_json::to_value(central).unwrap(), "finite-difference");
}

#[test]
fn tagged_configs_use_the_command_lines_names() {
    // The optimizer's `kind` in config.json is the name `--optimizer` takes.
    for (name, kind) in OptimizerKind::NAMES {
        let v = serde_json::to_value(kind.config(5e-4)).unwrap();
        assert_eq!(v["kind"], *name);
        let back: OptimizerConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, kind.config(5e-4));
    }
    // Files written before the rename still read.
    let old = serde_json::json!({
        "kind": "adam-w", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05
    });
    let c: OptimizerConfig = serde_json::from_value(old).unwrap();
    assert!(matches!(c, OptimizerConfig::AdamW { .. }));
    // The schedule's `kind` is the name `--schedule` takes.
    for (name, v) in [
        ("constant", Schedule::Constant),
        ("cosine", Schedule::Cosine { warmup_epochs: 0.0 }),
    ] {
        assert!(ScheduleKind::NAMES.iter().any(|(n, _)| n == &name));
        assert_eq!(serde_json::to_value(&v).unwrap()["kind"], name);
    }
    let step = Schedule::Step {
        milestones: vec![1],
        gamma: 0.1,
    };
    assert_eq!(serde_json::to_value(&step).unwrap()["kind"], "step");
}
