//! Property tests: a checkpoint or model file of any content loads or fails with an error that
//! names the file, never a panic.

use candle_core::DType;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use sgr_core::checkpoint::{
    load_params, load_training_checkpoint, save_params, save_training_checkpoint,
};
use sgr_core::method::Method;
use sgr_core::trainer::Trainer;
use sgr_integration_tests::{resnet, trainer_config};
use sgr_models::HeadKind;

fn trainer() -> Trainer {
    let net = resnet(8, 3, 2, HeadKind::ZeroConvOneFc, 3, DType::F32);
    Trainer::new(net, trainer_config(Method::greedy())).unwrap()
}

/// A fixed-seed runner, so that CI sees the same cases every run.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[11; 32]),
    )
}

/// Mutations: overwrite a byte, write a little-endian u64 (header lengths, offsets), truncate.
fn mutate(seed: &[u8], at: usize, kind: u8, value: u64) -> Vec<u8> {
    let mut t = seed.to_vec();
    let at = at % t.len();
    match kind % 3 {
        0 => t[at] = value as u8,
        1 => {
            let end = (at + 8).min(t.len());
            t[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
        }
        _ => t.truncate(at),
    }
    t
}

#[test]
fn mutated_models_and_checkpoints_load_or_fail_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let t = trainer();
    let model = dir.path().join("model.safetensors");
    let ckpt = dir.path().join("checkpoint.safetensors");
    save_params(&model, &t.network().params()).unwrap();
    save_training_checkpoint(&ckpt, &t).unwrap();
    let seeds = [
        std::fs::read(&model).unwrap(),
        std::fs::read(&ckpt).unwrap(),
    ];
    let probe = dir.path().join("probe.safetensors");
    // Header lengths and offsets at the edges: 0, 1, the real length, huge.
    let values = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(1 << 40),
        any::<u64>()
    ];
    for (i, seed) in seeds.iter().enumerate() {
        let mut r = runner(48);
        r.run(
            &(any::<usize>(), any::<u8>(), values.clone()),
            |(at, kind, value)| {
                std::fs::write(&probe, mutate(seed, at, kind, value)).unwrap();
                let mut target = trainer();
                let result = if i == 0 {
                    load_params(&probe, &target.network().params()).map(|_| ())
                } else {
                    load_training_checkpoint(&probe, &mut target).map(|_| ())
                };
                if let Err(e) = result {
                    prop_assert!(e.to_string().contains("probe.safetensors"), "{e}");
                }
                Ok(())
            },
        )
        .unwrap();
    }
}

#[test]
fn random_bytes_are_not_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.safetensors");
    let mut r = runner(48);
    r.run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
        std::fs::write(&probe, &bytes).unwrap();
        let mut t = trainer();
        prop_assert!(load_params(&probe, &t.network().params()).is_err());
        prop_assert!(load_training_checkpoint(&probe, &mut t).is_err());
        Ok(())
    })
    .unwrap();
}
