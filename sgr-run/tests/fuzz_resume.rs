//! Resume integrity under fuzzing: a stopped run's `config.json` and `metrics.jsonl` are
//! mutated at random (a value changed, replaced by another type or removed; lines deleted,
//! duplicated, swapped, truncated or corrupted), and `Run::resume` must either refuse, with an
//! error and no panic, or continue exactly the run that stopped: the same configuration (up
//! to what `--resume` may change: epochs, device), position and history length. Nothing
//! edited is silently trained on or skipped. (Byte mutations of checkpoints are
//! `tests/fuzz_checkpoints.rs`'s.)

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;
use sgr_core::events::Event;
use sgr_run::{Position, ResumeChanges, Resumed, Run, RunDir, RunOptions, RunSpec};

/// A run of 3 epochs of 2 steps, stopped after 3 steps: one epoch recorded, one mid-way.
fn stopped_run(dir: &Path) {
    let mut spec = RunSpec {
        model: "resnet8".into(),
        modules: Some(2),
        train_limit: Some(64),
        batch_size: 32,
        ..RunSpec::default()
    };
    spec.trainer.epochs = 3;
    let opts = RunOptions {
        max_steps: Some(3),
        workers: Some(0),
        ..RunOptions::default()
    };
    let mut run = Run::create(spec, dir, opts).unwrap();
    run.train(&mut |_: &Event<'_>| {}).unwrap();
}

/// The configuration as resume compares it: without what `--resume` may change.
fn key(spec: &RunSpec) -> Value {
    let mut v = serde_json::to_value(spec).unwrap();
    v["trainer"]["epochs"] = Value::Null;
    v["device"] = Value::Null;
    v
}

fn resume(dir: &Path) -> Result<(Value, Position, usize), String> {
    let opts = RunOptions {
        workers: Some(0),
        ..RunOptions::default()
    };
    // A panic fails the test.
    match Run::resume(dir, ResumeChanges::default(), opts) {
        Err(e) => Err(e.to_string()),
        Ok(Resumed::Finished(_)) => Err("finished".into()),
        Ok(Resumed::Ready(run)) => {
            let pos = run.resumed_at().unwrap();
            let records = RunDir::new(dir)
                .read_records(Some(pos.epoch))
                .unwrap()
                .len();
            Ok((key(run.spec()), pos, records))
        }
    }
}

/// Every leaf of a JSON value, as a path of keys.
fn leaves(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push(k.clone());
                leaves(x, at, out);
                at.pop();
            }
        }
        _ => out.push(at.clone()),
    }
}

/// Changes the leaf at `path`: kind 0..8 picks the new value; 8 removes the key.
fn mutate_json(v: &mut Value, path: &[String], kind: u8, n: f64) {
    let (last, parents) = path.split_last().unwrap();
    let mut obj = v;
    for p in parents {
        obj = &mut obj[p];
    }
    let old = obj[last].clone();
    let new = match kind % 9 {
        0 => old
            .as_f64()
            .map_or(serde_json::json!(n), |x| serde_json::json!(x * 2.0 + 1.0)),
        1 => serde_json::json!(-n),
        2 => serde_json::json!(0),
        3 => serde_json::json!(1e300),
        4 => serde_json::json!("x"),
        5 => Value::Null,
        6 => Value::Bool(true),
        7 => serde_json::json!(n.floor()),
        _ => {
            obj.as_object_mut().unwrap().remove(last);
            return;
        }
    };
    obj[last] = new;
}

fn mutate_lines(text: &str, op: u8, at: usize, byte: u8) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let i = at % lines.len();
    match op % 6 {
        0 => {
            lines.remove(i);
        }
        1 => {
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        2 => {
            let l = &mut lines[i];
            let cut = at % (l.len() + 1);
            l.truncate(cut);
        }
        3 => {
            let l = &mut lines[i];
            if !l.is_empty() {
                let j = at % l.len();
                l.replace_range(j..=j, &char::from(byte.clamp(32, 126)).to_string());
            }
        }
        4 => lines.push("{\"epoch\": 7}".into()),
        _ => lines.push(char::from(byte).to_string()),
    }
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[41; 32]),
    )
}

#[test]
fn a_mutated_run_directory_is_refused_or_resumed_as_it_was() {
    let base = tempfile::tempdir().unwrap();
    let original = base.path().join("run");
    stopped_run(&original);
    let (spec, pos, records) = resume(&original).expect("the untouched run resumes");
    assert_eq!((pos.epoch, pos.step_in_epoch, records), (1, 1, 1));
    let config: Value =
        serde_json::from_slice(&std::fs::read(original.join("config.json")).unwrap()).unwrap();
    let mut paths = Vec::new();
    leaves(&config, &mut Vec::new(), &mut paths);
    let metrics = std::fs::read_to_string(original.join("metrics.jsonl")).unwrap();
    let copy = |to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in ["config.json", "metrics.jsonl", "checkpoint.safetensors"] {
            std::fs::copy(original.join(f), to.join(f)).unwrap();
        }
    };
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let strategy = (any::<bool>(), any::<usize>(), any::<u8>(), 0.0f64..1e6);
    runner(256)
        .run(&strategy, |(in_config, at, kind, n)| {
            let dir = tempfile::tempdir().unwrap();
            let run = dir.path().join("run");
            copy(&run);
            let what = if in_config {
                let path = &paths[at % paths.len()];
                let mut c = config.clone();
                mutate_json(&mut c, path, kind, n);
                std::fs::write(run.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
                format!("config.json {} ({kind})", path.join("."))
            } else {
                let m = mutate_lines(&metrics, kind, at, (n as u64 % 256) as u8);
                std::fs::write(run.join("metrics.jsonl"), &m).unwrap();
                format!("metrics.jsonl ({kind}, {at}): {m}")
            };
            match resume(&run) {
                Ok((s, p, r)) => {
                    accepted.set(accepted.get() + 1);
                    assert_eq!(s, spec, "{what}: resumed another configuration");
                    assert_eq!(p, pos, "{what}");
                    assert_eq!(r, records, "{what}: resumed another history");
                }
                Err(e) => {
                    refused.set(refused.get() + 1);
                    assert!(!e.is_empty(), "{what}");
                }
            }
            Ok(())
        })
        .unwrap();
    // Both outcomes occur: the mutations reach the checks and what does not matter passes.
    let (a, r) = (accepted.get(), refused.get());
    eprintln!("{a} mutated run directories resumed as they were, {r} refused");
    assert!(a > 0 && r > 0, "{a} accepted, {r} refused");
}
