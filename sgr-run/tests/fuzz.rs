//! Property tests: a run specification file of any content is read or refused with an error
//! naming the file, never a panic, and what is accepted round-trips through config.json.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use sgr_run::RunSpec;

/// A valid specification to mutate: a run's own config.json, as JSON and as TOML.
fn seeds() -> Vec<(String, &'static str)> {
    let spec = RunSpec::default().resolved().unwrap();
    vec![
        (serde_json::to_string_pretty(&spec).unwrap(), "json"),
        (toml::to_string(&spec).unwrap(), "toml"),
        (
            "[trainer]\nlr = 0.1\nepochs = 2\n[trainer.sgr]\nlambda = 0.5\n".into(),
            "toml",
        ),
    ]
}

/// A fixed-seed runner, so that CI sees the same cases every run.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    )
}

fn check(text: &[u8], ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("spec.{ext}"));
    std::fs::write(&path, text).unwrap();
    match RunSpec::from_file(&path) {
        // What is accepted is a whole spec: it writes as config.json and reads back the same.
        Ok(spec) => {
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<RunSpec>(&json).unwrap(), spec);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("spec."), "the error names the file: {msg}");
        }
    }
}

/// Values that break ranges and parsers, spliced in place of a value.
const HOSTILE: &[&str] = &[
    "-0.5",
    "-0",
    "0",
    "1e400",
    "-1e400",
    "nan",
    "inf",
    "18446744073709551616",
    "18446744073709551615",
    "\"\"",
    "[]",
    "{}",
    "true",
    "null",
    "\"cosine\"",
    "-1",
];

#[test]
fn mutated_spec_files_are_read_or_refused_without_panic() {
    for (seed, ext) in seeds() {
        let mut r = runner(96);
        let len = seed.len();
        let strategy = (0..len, 0..HOSTILE.len(), 0..3usize, any::<u8>());
        r.run(&strategy, |(at, h, kind, byte)| {
            let mut t = seed.clone().into_bytes();
            match kind {
                // Replace the value after a `=`/`:` with a hostile one.
                0 => {
                    if let Some(p) = t[at..].iter().position(|&c| c == b'=' || c == b':') {
                        let start = at + p + 1;
                        let end = t[start..]
                            .iter()
                            .position(|&c| c == b'\n' || c == b',')
                            .map_or(t.len(), |q| start + q);
                        t.splice(start..end, format!(" {}", HOSTILE[h]).into_bytes());
                    }
                }
                1 => t[at] = byte,
                _ => t.truncate(at),
            }
            check(&t, ext);
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn random_bytes_are_refused_without_panic() {
    let mut r = runner(64);
    r.run(&proptest::collection::vec(any::<u8>(), 0..256), |bytes| {
        check(&bytes, "json");
        check(&bytes, "toml");
        Ok(())
    })
    .unwrap();
}
