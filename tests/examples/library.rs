//! Using sgr as a library: SGR on the embedded digits, with boundary diagnostics.
//! Run with `cargo run --release -p sgr-integration-tests --example library`.

use candle_core::{DType, Device};
use sgr_core::events::Event;
use sgr_core::method::Method;
use sgr_core::optim::{OptimizerConfig, Schedule};
use sgr_core::sgr::SgrConfig;
use sgr_core::trainer::{Trainer, TrainerConfig};
use std::sync::Arc;

use sgr_data::{Loader, LoaderConfig, Normalize, Pipeline};
use sgr_models::{CifarResNet, HeadKind, ModelOptions, ResNetConfig, SplitStrategy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep freed memory for the next step instead of page-faulting it in again (glibc).
    sgr_core::memory::tune_allocator();
    let device = Device::Cpu;
    let train = sgr_data::digits(true)?;
    let test = sgr_data::digits(false)?;
    // Normalise with the training split's statistics; decoding/augmentation run on workers.
    let norm = Pipeline::new(vec![Normalize::from_dataset(&train).transform()]);
    let train_loader = Loader::new(
        Arc::new(train),
        LoaderConfig::train(64, 0),
        norm.clone(),
        &device,
    )?;
    let test_loader = Loader::new(Arc::new(test), LoaderConfig::eval(256), norm, &device)?;

    // ResNet-20 cut into 4 gradient-isolated modules, each with a 1c2f auxiliary head.
    let net = CifarResNet {
        config: ResNetConfig::preset("resnet20", 1, 10)?,
        options: ModelOptions {
            modules: 4,
            split: SplitStrategy::Uniform,
            head: HeadKind::OneConvTwoFc,
            ..ModelOptions::default()
        },
    }
    .build(&device, DType::F32)?;

    let epochs = 2;
    let mut trainer = Trainer::new(
        net,
        TrainerConfig {
            method: Method::sgr(SgrConfig::default()),
            optimizer: OptimizerConfig::default(),
            lr: 0.05,
            schedule: Schedule::Cosine { warmup_epochs: 0.0 },
            epochs,
            steps_per_epoch: train_loader.batches_per_epoch(),
            seed: 0,
            ..Default::default()
        },
    )?;
    for epoch in 0..epochs {
        // The library reports through events; here we print the per-boundary reconciliation.
        let mut observer = |e: &Event<'_>| {
            if let Event::Epoch(m) = e {
                for b in &m.boundaries {
                    println!(
                        "epoch {} boundary {}: cos(a,b) {:.3}, ||a-b||/||a|| {:.3}",
                        m.epoch, b.boundary, b.cos, b.rel_dist
                    );
                }
            }
        };
        let m = trainer.run_epoch(train_loader.epoch(epoch), &mut observer)?;
        let eval = trainer.evaluate(test_loader.epoch(0))?;
        println!(
            "epoch {epoch}: train loss {:.4}, test accuracy {:.4}",
            m.train_loss, eval.accuracy
        );
    }
    Ok(())
}
