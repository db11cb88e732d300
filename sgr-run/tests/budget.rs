//! The memory estimate of `sgr_run::budget` against the steps it predicts, measured by this
//! binary's counting allocator: steps at batch 2 and 4 predict a step at a larger batch, and
//! steps at a halved image side predict a step at the full side. The tests of this binary run
//! one at a time, so that the allocator counts one test's steps alone.

use std::sync::Arc;

use candle_core::Device;
use sgr_core::method::Method;
use sgr_models::Input;
use sgr_run::budget::{check_fits, estimate_step, Plan};
use sgr_run::counting::CountingMeter;
use sgr_run::memory::{measure_step, random_batch, warm_trainer, MemoryMeter};
use sgr_run::RunSpec;

#[global_allocator]
static ALLOC: sgr_run::counting::Counting = sgr_run::counting::Counting;

/// Held by each test: the allocator counts the whole process.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spec(model: &str, method: Method, k: usize) -> RunSpec {
    let mut s = RunSpec {
        model: model.into(),
        modules: Some(k),
        ..RunSpec::default()
    };
    s.trainer.method = method;
    s
}

/// The heap a real step at `batch` images of `input` takes above what was held before the
/// trainer was built.
fn measured(spec: &RunSpec, input: Input, batch: usize) -> u64 {
    let meter: Arc<dyn MemoryMeter> = Arc::new(CountingMeter);
    let base = meter.live();
    let mut t = warm_trainer(spec, input, &Device::Cpu).unwrap();
    let b = random_batch(input, batch, &Device::Cpu).unwrap();
    measure_step(&mut t, &b, meter).unwrap().peak - base
}

fn within(estimate: u64, real: u64, tolerance: f64, what: &str) {
    let r = estimate as f64 / real as f64;
    assert!(
        (1.0 - tolerance..=1.0 + tolerance).contains(&r),
        "{what}: estimated {} KiB, measured {} KiB ({r:.3}x)",
        estimate >> 10,
        real >> 10
    );
}

#[test]
fn steps_at_batch_2_and_4_predict_larger_batches_and_halved_sides_predict_full_ones() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let meter: Arc<dyn MemoryMeter> = Arc::new(CountingMeter);
    let sgr: Method = "greedy+sgr".parse().unwrap();
    // Batches: a ResNet and a ViT, local with SGR and end to end.
    for (model, method, k) in [
        ("resnet8", sgr.clone(), 2),
        ("resnet8", Method::bp(), 1),
        ("vit-cifar", sgr.clone(), 2),
    ] {
        let s = spec(model, method, k);
        let input = Input {
            channels: 3,
            classes: 10,
            size: 32,
        };
        let e = estimate_step(&s, input, Arc::clone(&meter), &Device::Cpu).unwrap();
        assert_eq!(e.measured_size, 32);
        let real = measured(&s, input, 24);
        // Within 10 % on the workspace's candle-core; crates.io's keeps more per image at
        // larger batches (16 % more for ResNet-8 at 24), which scripts/upstream_check.sh runs.
        let what = format!("{model} K={k} at batch 24");
        within(e.train_bytes(24), real, 0.2, &what);
    }
    // Sides above 256 are measured at halved sides and scaled.
    let s = spec("resnet8", sgr, 2);
    let input = Input {
        channels: 1,
        classes: 10,
        size: 512,
    };
    let e = estimate_step(&s, input, Arc::clone(&meter), &Device::Cpu).unwrap();
    assert_eq!(e.measured_size, 256);
    let real = measured(&s, input, 2);
    within(e.train_bytes(2), real, 0.2, "resnet8 K=2 at 512x512");
}

#[test]
fn a_step_that_cannot_fit_is_refused_with_the_estimate_and_the_largest_batch_that_fits() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let meter: Arc<dyn MemoryMeter> = Arc::new(CountingMeter);
    let s = spec("resnet8", Method::bp(), 1);
    let input = Input {
        channels: 3,
        classes: 10,
        size: 32,
    };
    let plan = |batch| Plan {
        limit: Some(2 << 30),
        ..Plan::steps(batch, "--input-size")
    };
    check_fits(&s, input, plan(8), Arc::clone(&meter), &Device::Cpu).unwrap();
    let e = check_fits(&s, input, plan(1 << 16), meter, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("batch 65536")
            && e.contains("--batch-size to at most")
            && e.contains("available"),
        "{e}"
    );
}
