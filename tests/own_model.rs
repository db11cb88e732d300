//! A user's own candle-nn model under sgr's trainer: the three hazards of foreign layers
//! (decisions out of the context's sight, running statistics updated by the SGR passes, graphs
//! cut by no-backward ops) are errors or handled, and the trainer's configuration footguns are
//! refused.

use candle_core::{DType, Device, Tensor};
use candle_nn::{batch_norm, linear, Activation, Linear, Module, ModuleT, VarBuilder, VarMap};
use sgr_core::foreign::ForeignStage;
use sgr_core::method::{Method, Objective};
use sgr_core::network::{Decisions, LocalNetwork, SplitPlan, Stage};
use sgr_core::nn::{Ctx, ParamKind};
use sgr_core::objective::{Batch, CrossEntropy, LocalObjective};
use sgr_core::optim::Schedule;
use sgr_core::sgr::{SgrConfig, SgrGrad};
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_core::Error;

const IN: usize = 6;
const WIDTH: usize = 8;
const CLASSES: usize = 3;

fn vb(vars: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu)
}

/// Linear → BatchNorm → ReLU through the context, as stage `prefix`.
fn replayable_block(vars: &VarMap, prefix: &str, cin: usize) -> Box<dyn Stage> {
    let fc = linear(cin, WIDTH, vb(vars).pp(prefix).pp("fc")).unwrap();
    let bn = batch_norm(WIDTH, 1e-5, vb(vars).pp(prefix).pp("bn")).unwrap();
    let stage = ForeignStage::from_fn(prefix, vars, prefix, move |x: &Tensor, ctx: &mut Ctx| {
        let h = bn.forward_t(&fc.forward(x)?, ctx.is_train())?;
        ctx.relu(&h)
    })
    .unwrap();
    Box::new(stage)
}

fn head(vars: &VarMap, prefix: &str) -> Box<dyn Stage> {
    let fc = linear(WIDTH, CLASSES, vb(vars).pp(prefix)).unwrap();
    Box::new(
        ForeignStage::module(prefix, fc, vars, prefix)
            .unwrap()
            .with_decisions(Decisions::Replayable),
    )
}

/// Two modules: `first`, then `second` and the classifier; one aux head for module 0.
fn network(vars: &VarMap, first: Box<dyn Stage>, second: Box<dyn Stage>) -> LocalNetwork {
    let objectives: Vec<Box<dyn LocalObjective>> = vec![
        Box::new(CrossEntropy::on_head(head(vars, "aux1"))),
        Box::new(CrossEntropy::on_logits()),
    ];
    LocalNetwork::new(
        "foreign",
        vec![first, second],
        head(vars, "fc"),
        objectives,
        SplitPlan::uniform(2, 2).unwrap(),
        CLASSES,
    )
    .unwrap()
}

fn config(method: Method) -> TrainerConfig {
    TrainerConfig {
        method,
        steps_per_epoch: 1,
        ..TrainerConfig::default()
    }
}

fn sgr(grad: SgrGrad) -> Method {
    Method::sgr(SgrConfig {
        grad,
        ..SgrConfig::default()
    })
}

fn batch() -> Batch {
    let d = Device::Cpu;
    let x: Vec<f32> = (0..16 * IN)
        .map(|i| ((i * 37 % 23) as f32 / 11.0) - 1.0)
        .collect();
    let y: Vec<u32> = (0..16).map(|i| (i % CLASSES) as u32).collect();
    Batch::labelled(
        Tensor::from_vec(x, (16, IN), &d).unwrap(),
        Tensor::from_vec(y, 16, &d).unwrap(),
    )
}

/// A user's candle-nn module with candle-nn's ReLU inside: its masks are out of sgr's sight.
/// (candle-nn's `Sequential` holds `Box<dyn Module>`, which is not `Send`: a stage can't own
/// one, so users write such structs, or use `ForeignStage::from_fn`.)
#[derive(Debug)]
struct LinearRelu(Linear);

impl Module for LinearRelu {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Activation::Relu.forward(&self.0.forward(x)?)
    }
}

fn opaque_block(vars: &VarMap, prefix: &str, cin: usize) -> ForeignStage {
    let fc = linear(cin, WIDTH, vb(vars).pp(prefix)).unwrap();
    ForeignStage::module(prefix, LinearRelu(fc), vars, prefix).unwrap()
}

#[test]
fn a_foreign_relu_is_refused_for_the_finite_differences_and_named() {
    for grad in [SgrGrad::FiniteDifference, SgrGrad::ForwardDifference] {
        let vars = VarMap::new();
        let net = network(
            &vars,
            replayable_block(&vars, "block1", IN),
            Box::new(opaque_block(&vars, "block2", WIDTH)),
        );
        let err = Trainer::new(net, config(sgr(grad))).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::UnreplayableLayer { .. }), "{msg}");
        assert!(msg.contains("`block2`"), "names the layer: {msg}");
        assert!(msg.contains(grad.name()), "names the way: {msg}");
        assert!(
            msg.contains("`exact`") && msg.contains("`greedy` without +sgr"),
            "{msg}"
        );
    }
    // The exact way recomputes the same point, so it trains; so does greedy without SGR.
    for method in [sgr(SgrGrad::Exact), Method::greedy()] {
        let vars = VarMap::new();
        let net = network(
            &vars,
            replayable_block(&vars, "block1", IN),
            Box::new(opaque_block(&vars, "block2", WIDTH)),
        );
        let mut t = Trainer::new(net, config(method)).unwrap();
        t.train_step(&batch()).unwrap();
    }
    // A foreign dropout's draws cannot be reproduced by any SGR way.
    let vars = VarMap::new();
    let random = opaque_block(&vars, "block2", WIDTH).with_decisions(Decisions::Random);
    let net = network(
        &vars,
        replayable_block(&vars, "block1", IN),
        Box::new(random),
    );
    let msg = Trainer::new(net, config(sgr(SgrGrad::Exact)))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`block2`") && msg.contains("random"), "{msg}");
    // Module 0 is never re-run by the forward direction: an opaque first block is fine.
    let vars = VarMap::new();
    let first = opaque_block(&vars, "block1", IN);
    let net = network(
        &vars,
        Box::new(first),
        replayable_block(&vars, "block2", WIDTH),
    );
    Trainer::new(net, config(sgr(SgrGrad::FiniteDifference))).unwrap();
}

fn running_stats(vars: &VarMap) -> Vec<Vec<f32>> {
    let data = vars.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().filter(|n| n.contains(".bn.running_")).collect();
    names.sort();
    names
        .iter()
        .map(|n| data[*n].as_tensor().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn candle_nn_batchnorm_statistics_are_untouched_by_the_sgr_passes() {
    let build = || {
        let vars = VarMap::new();
        let net = network(
            &vars,
            replayable_block(&vars, "block1", IN),
            replayable_block(&vars, "block2", WIDTH),
        );
        (vars, net)
    };
    // Every run starts from the same weights (candle-nn's initialisation is not seeded).
    let (init, _) = build();
    let one_step = |method: Method| {
        let (vars, net) = build();
        let from = init.data().lock().unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            var.set(from[name].as_tensor()).unwrap();
        }
        drop(from);
        assert!(
            net.module_params(1)
                .iter()
                .any(|p| p.name == "block2.bn.running_mean" && p.kind == ParamKind::Buffer),
            "candle-nn's running statistics are buffers"
        );
        let mut t = Trainer::new(net, config(method)).unwrap();
        t.train_step(&batch()).unwrap();
        running_stats(&vars)
    };
    // The statistics move in the base passes, which greedy and greedy+sgr share; the SGR term's
    // extra passes must leave them as the base pass did.
    let greedy = one_step(Method::greedy());
    assert_ne!(greedy, running_stats(&init), "the base pass updates them");
    for grad in [
        SgrGrad::FiniteDifference,
        SgrGrad::ForwardDifference,
        SgrGrad::Exact,
    ] {
        assert_eq!(one_step(sgr(grad)), greedy, "{grad}");
    }
}

/// Linear → candle-nn's fused softmax, which has no backward: it cuts the graph, so the
/// linear layer's tensors get no gradient (and their optimizer zeros, silently, before).
fn cut_block(vars: &VarMap, prefix: &str) -> Box<dyn Stage> {
    let fc = linear(IN, WIDTH, vb(vars).pp(prefix)).unwrap();
    let stage = ForeignStage::from_fn(prefix, vars, prefix, move |x: &Tensor, _: &mut Ctx| {
        Ok(candle_nn::ops::softmax_last_dim(&fc.forward(x)?)?)
    })
    .unwrap();
    Box::new(stage)
}

#[test]
fn a_trainable_tensor_without_gradient_is_an_error_naming_it() {
    for method in [Method::greedy(), sgr(SgrGrad::FiniteDifference)] {
        let vars = VarMap::new();
        let net = network(
            &vars,
            cut_block(&vars, "block1"),
            replayable_block(&vars, "block2", WIDTH),
        );
        let err = Trainer::new(net, config(method))
            .unwrap()
            .train_step(&batch())
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::MissingGradient { .. }), "{msg}");
        assert!(
            msg.contains("`block1.bias`") || msg.contains("`block1.weight`"),
            "{msg}"
        );
    }
    // End to end (bp) too.
    let vars = VarMap::new();
    let objectives: Vec<Box<dyn LocalObjective>> = vec![Box::new(CrossEntropy::on_logits())];
    let net = LocalNetwork::new(
        "cut",
        vec![cut_block(&vars, "block1")],
        head(&vars, "fc"),
        objectives,
        SplitPlan::single(1).unwrap(),
        CLASSES,
    )
    .unwrap();
    let msg = Trainer::new(net, config(Method::bp()))
        .unwrap()
        .train_step(&batch())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`block1."), "{msg}");
}

#[test]
fn steps_per_epoch_zero_is_refused_where_the_schedule_needs_it() {
    let vars = VarMap::new();
    let build = || {
        network(
            &vars,
            replayable_block(&vars, "block1", IN),
            replayable_block(&vars, "block2", WIDTH),
        )
    };
    // The default schedule is cosine: lr would be 0 from the first step.
    let msg = Trainer::new(build(), TrainerConfig::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("steps_per_epoch"), "{msg}");
    let warm = Method::sgr(SgrConfig {
        warmup_epochs: 1.0,
        ..SgrConfig::default()
    });
    let constant = |method| TrainerConfig {
        method,
        schedule: Schedule::Constant,
        ..TrainerConfig::default()
    };
    assert!(Trainer::new(build(), constant(warm)).is_err(), "λ warm-up");
    Trainer::new(build(), constant(Method::greedy())).unwrap();
}

#[test]
fn the_heads_objective_and_the_methods_are_checked_against_each_other() {
    use sgr_models::{CifarResNet, ModelOptions, ResNetConfig};
    let build = |objective| {
        CifarResNet {
            config: ResNetConfig::preset("resnet8", 1, 10).unwrap(),
            options: ModelOptions {
                modules: 2,
                objective,
                ..ModelOptions::default()
            },
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap()
    };
    let msg = Trainer::new(
        build(Objective::Dgl),
        config(Method::plain(Objective::Infopro)),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("`dgl`") && msg.contains("infopro"), "{msg}");
    // bp and greedy build the same heads; a hand-built network is not checked.
    Trainer::new(build(Objective::Bp), config(Method::greedy())).unwrap();
    Trainer::new(
        build(Objective::Greedy),
        config(Method::sgr(SgrConfig::default())),
    )
    .unwrap();
    Trainer::new(build(Objective::Dgl), config(Method::plain(Objective::Dgl))).unwrap();
}

/// A layer that panics inside a pipeline worker ends the run with an error naming the worker
/// and the panic, without a hang: the other workers stop when their channels close.
#[test]
fn a_panicking_layer_in_a_pipeline_worker_is_an_error_naming_it() {
    let vars = VarMap::new();
    let fc = linear(WIDTH, WIDTH, vb(&vars).pp("block2")).unwrap();
    let step = std::sync::atomic::AtomicUsize::new(0);
    let panicking = ForeignStage::from_fn(
        "block2",
        &vars,
        "block2",
        move |x: &Tensor, ctx: &mut Ctx| {
            if ctx.is_train() && step.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
                panic!("block2 refuses its third batch");
            }
            ctx.relu(&fc.forward(x)?)
        },
    )
    .unwrap();
    let net = network(
        &vars,
        replayable_block(&vars, "block1", IN),
        Box::new(panicking),
    );
    let mut t = Trainer::new(net, config(Method::greedy())).unwrap();
    t.set_pipeline(Some(
        sgr_core::trainer::pipeline::Pipeline::even(2, 2, 1).unwrap(),
    ))
    .unwrap();
    let mut source = std::iter::repeat_with(|| Ok(batch())).take(6);
    let e = t
        .train_batches(&mut source, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pipeline worker 1 panicked") && e.contains("refuses its third batch"),
        "{e}"
    );
}
