//! One step of greedy+sgr on a zoo model and on a user's candle-nn model, built against
//! crates.io's candle-core (no `[patch]`), and the exact SGR way refused with what to do.

use candle_core::{DType, Device, Tensor};
use candle_nn::{linear, Module, VarBuilder, VarMap};
use sgr_core::foreign::ForeignStage;
use sgr_core::method::Method;
use sgr_core::network::{LocalNetwork, SplitPlan, Stage};
use sgr_core::nn::{global_avg_pool, Ctx};
use sgr_core::objective::{Batch, CrossEntropy, LocalObjective};
use sgr_core::sgr::{SgrConfig, SgrGrad};
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_models::{CifarResNet, ModelOptions, ResNetConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn config(method: Method) -> TrainerConfig {
    TrainerConfig {
        method,
        steps_per_epoch: 1,
        ..TrainerConfig::default()
    }
}

/// The first 32 embedded 8×8 digits as a batch.
fn digits() -> Res<Batch> {
    let data = sgr_data::digits(true)?;
    let n = 32;
    let mut x = Vec::with_capacity(n * 64);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        x.extend(sgr_data::Source::image(&data, i)?.data);
        y.push(sgr_data::Source::label(&data, i));
    }
    let d = Device::Cpu;
    Ok(Batch::labelled(
        Tensor::from_vec(x, (n, 1, 8, 8), &d)?,
        Tensor::from_vec(y, n, &d)?,
    ))
}

fn step(name: &str, net: LocalNetwork, batch: &Batch) -> Res<()> {
    let mut t = Trainer::new(net, config(Method::sgr(SgrConfig::default())))?;
    let m = t.train_step(batch)?;
    let losses = m.module_losses.to_vec1::<f64>()?;
    if losses.iter().any(|l| !l.is_finite()) {
        return Err(format!("{name}: non-finite losses {losses:?}").into());
    }
    println!("{name}: one greedy+sgr step, module losses {losses:.4?}");
    Ok(())
}

fn main() -> Res<()> {
    let batch = digits()?;
    // A zoo model: ResNet-8 cut into two modules.
    let zoo = || {
        CifarResNet {
            config: ResNetConfig::preset("resnet8", 1, 10)?,
            options: ModelOptions {
                modules: 2,
                ..ModelOptions::default()
            },
        }
        .build(&Device::Cpu, DType::F32)
    };
    step("resnet8 K=2", zoo()?, &batch)?;

    // A user's candle-nn model: two linear blocks (ReLU through the context) and a head each.
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let block = |name: &str, cin: usize| -> Res<Box<dyn Stage>> {
        let fc = linear(cin, 32, vb.pp(name))?;
        let f = move |x: &Tensor, ctx: &mut Ctx| ctx.relu(&fc.forward(&x.flatten_from(1)?)?);
        Ok(Box::new(ForeignStage::from_fn(name, &vars, name, f)?))
    };
    let head = |name: &str| -> Res<Box<dyn Stage>> {
        let fc = linear(32, 10, vb.pp(name))?;
        let f = move |x: &Tensor, _: &mut Ctx| {
            Ok(fc.forward(&global_avg_pool(&x.unsqueeze(2)?.unsqueeze(3)?)?)?)
        };
        Ok(Box::new(ForeignStage::from_fn(name, &vars, name, f)?))
    };
    let objectives: Vec<Box<dyn LocalObjective>> = vec![
        Box::new(CrossEntropy::on_head(head("aux1")?)),
        Box::new(CrossEntropy::on_logits()),
    ];
    let net = LocalNetwork::new(
        "own-mlp",
        vec![block("block1", 64)?, block("block2", 32)?],
        head("fc")?,
        objectives,
        SplitPlan::uniform(2, 2)?,
        10,
    )?;
    step("own candle-nn MLP K=2", net, &batch)?;

    // Without the patched candle-core the exact way is refused up front, saying what works.
    let exact = Method::sgr(SgrConfig {
        grad: SgrGrad::Exact,
        ..SgrConfig::default()
    });
    match Trainer::new(zoo()?, config(exact)) {
        Err(e @ sgr_core::Error::SecondOrderUnavailable { .. }) => {
            println!("exact SGR refused as expected: {e}")
        }
        other => return Err(format!("exact SGR without second order: {other:?}").into()),
    }
    // sgr-run builds too: the default job's specification and its hash.
    let spec = sgr_run::RunSpec::default();
    spec.validate()?;
    println!("sgr-run: default job spec hash {}", spec.hash()?);
    Ok(())
}
