//! Module-parallel training (docs/parallel.md): a pipeline of worker threads gives the weights,
//! optimizer states and epoch metrics of the sequential schedule bit for bit, for every local
//! method and SGR way; a step's result does not depend on the number of compute threads;
//! stopping, a failing data source and layouts that cannot work behave as documented. The same
//! holds across ranks (`Trainer::train_batches_on`, here over in-process ranks).

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use sgr_core::events::{EpochMetrics, NoObserver};
use sgr_core::method::{Estimator, Method, Objective};
use sgr_core::mix::MixConfig;
use sgr_core::network::LocalNetwork;
use sgr_core::nn::Param;
use sgr_core::objective::Batch;
use sgr_core::sgr::{Direction, SgrConfig, SgrGrad};
use sgr_core::trainer::distributed::{check_same, local_ranks, Layout, Transport};
use sgr_core::trainer::pipeline::Pipeline;
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_integration_tests::{labels, randn, resnet_for, trainer_config};
use sgr_models::localmixer::LocalMixerConfig;
use sgr_models::vit::{VisionTransformer, VitConfig};
use sgr_models::{ModelOptions, SplitStrategy};

const STEPS: usize = 4;

/// A network builder.
type Build = fn() -> LocalNetwork;

/// A two-block LocalMixer on 1×8×8 images, cut into [block 0 | block 1 | read-out].
fn mixer() -> LocalNetwork {
    let cfg = LocalMixerConfig {
        name: "localmixer-test".into(),
        image_size: 8,
        in_channels: 1,
        num_classes: 10,
        blocks: 2,
        patches: 2,
        channels: 8,
        groups: 2,
    };
    let opts = ModelOptions {
        modules: 3,
        seed: 3,
        ..ModelOptions::default()
    };
    sgr_models::family::build(&cfg, &opts, &Device::Cpu, DType::F32).expect("build mixer")
}

/// A one-block-per-module ViT on 3×8×8 images (patch 4, width 16, 2 heads).
fn vit() -> LocalNetwork {
    VisionTransformer {
        config: VitConfig {
            name: "vit-test".into(),
            image_size: 8,
            patch_size: 4,
            in_channels: 3,
            num_classes: 10,
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            mlp_ratio: 2.0,
        },
        options: ModelOptions {
            modules: 2,
            split: SplitStrategy::Uniform,
            seed: 4,
            ..ModelOptions::default()
        },
    }
    .build(&Device::Cpu, DType::F32)
    .expect("build vit")
}

fn batches(channels: usize, n: usize, count: usize) -> Vec<Batch> {
    (0..count as u64)
        .map(|i| {
            Batch::labelled(
                randn(&[n, channels, 8, 8], 1.0, 40 + i, DType::F32),
                labels(n, 60 + i),
            )
        })
        .collect()
}

fn config(method: &str, grad: SgrGrad, estimator: Estimator) -> TrainerConfig {
    let mut method: Method = method.parse().expect("method");
    method.sgr = method.sgr.map(|_| SgrConfig {
        grad,
        lambda: 0.5,
        ..SgrConfig::default()
    });
    method.estimator = estimator;
    trainer_config(method)
}

/// Every bit a run leaves: weights and buffers, optimizer states, and the epoch's metrics
/// without its wall time.
#[derive(Debug, PartialEq)]
struct Outcome {
    params: Vec<(String, Vec<u32>)>,
    states: Vec<Vec<(String, Vec<u32>)>>,
    metrics: String,
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("tensor")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn outcome(t: &mut Trainer) -> Outcome {
    let params = t.network().params();
    let states = t
        .optimizers()
        .iter()
        .map(|o| o.state().expect("state"))
        .collect();
    outcome_of(params, states, t)
}

/// The outcome of these weights and optimizer states (a trainer's own, or a snapshot gathered
/// from the ranks) with the metrics of `t`'s epoch.
fn outcome_of(
    params: Vec<Param>,
    states: Vec<HashMap<String, Tensor>>,
    t: &mut Trainer,
) -> Outcome {
    let params = params
        .into_iter()
        .map(|p| (p.name.clone(), bits(p.var.as_tensor())))
        .collect();
    let states = states
        .into_iter()
        .map(|o| {
            let mut s: Vec<_> = o.into_iter().map(|(n, v)| (n, bits(&v))).collect();
            s.sort();
            s
        })
        .collect();
    let m: EpochMetrics = t.finish_epoch(&mut NoObserver).expect("epoch");
    let metrics = format!(
        "{:?} {:?} {} {} {:?} {}",
        m.module_losses, m.train_loss, m.train_accuracy, m.steps, m.boundaries, m.lr
    );
    Outcome {
        params,
        states,
        metrics,
    }
}

/// Trains `data` on a fresh network, on `pipeline` (sequentially when `None`).
fn train(net: Build, cfg: &TrainerConfig, pipeline: Option<Pipeline>, data: &[Batch]) -> Outcome {
    let mut t = Trainer::new(net(), cfg.clone()).expect("trainer");
    t.set_pipeline(pipeline).expect("pipeline");
    let mut source = data.iter().cloned().map(Ok);
    let d = t
        .train_batches(&mut source, &mut |_| ControlFlow::Continue(()))
        .expect("train");
    assert_eq!(d.steps, data.len());
    outcome(&mut t)
}

fn assert_pipelines_match(name: &str, net: Build, cfg: TrainerConfig, data: &[Batch]) {
    let sequential = train(net, &cfg, None, data);
    let k = net().num_modules();
    for workers in 2..=k {
        let p = Pipeline::even(k, workers, 1).unwrap();
        let piped = train(net, &cfg, Some(p.clone()), data);
        assert!(
            piped == sequential,
            "{name}: {:?} differs from the sequential run",
            p.stages()
        );
    }
}

/// ResNet-8 cut uniformly into 3 modules with each objective's heads.
fn resnet_greedy() -> LocalNetwork {
    resnet_for(8, 3, Objective::Greedy, DType::F32)
}
fn resnet_dgl() -> LocalNetwork {
    resnet_for(8, 3, Objective::Dgl, DType::F32)
}
fn resnet_infopro() -> LocalNetwork {
    resnet_for(8, 3, Objective::Infopro, DType::F32)
}

/// The central invariant: greedy, greedy+sgr under each SGR way, dgl+sgr and infopro+sgr on
/// 2 and 3 workers give the sequential run's bits.
#[test]
fn pipelines_are_bit_identical_to_the_sequential_run() {
    let data = batches(3, 8, STEPS);
    let bp = Estimator::Backprop;
    let cases: [(&str, Build, SgrGrad); 6] = [
        ("greedy", resnet_greedy, SgrGrad::FiniteDifference),
        ("greedy+sgr", resnet_greedy, SgrGrad::FiniteDifference),
        ("greedy+sgr", resnet_greedy, SgrGrad::ForwardDifference),
        ("greedy+sgr", resnet_greedy, SgrGrad::Exact),
        ("dgl+sgr", resnet_dgl, SgrGrad::ForwardDifference),
        ("infopro+sgr", resnet_infopro, SgrGrad::FiniteDifference),
    ];
    for (method, net, grad) in cases {
        let name = format!("{method} ({grad})");
        assert_pipelines_match(&name, net, config(method, grad, bp), &data);
    }
}

/// Mixup/cutmix and label smoothing are drawn once at the source and travel with the batch;
/// the BP-free estimator's noise is seeded per (step, module) wherever the module runs.
#[test]
fn recipes_and_forward_gradients_pipeline_bit_identically() {
    let mut cfg = config(
        "greedy+sgr",
        SgrGrad::ForwardDifference,
        Estimator::Backprop,
    );
    cfg.mix = Some(MixConfig::default());
    cfg.label_smoothing = 0.1;
    assert_pipelines_match("mixup", resnet_greedy, cfg, &batches(3, 8, STEPS));
    let fga = config(
        "greedy+sgr",
        SgrGrad::FiniteDifference,
        Estimator::ForwardActivity,
    );
    assert_pipelines_match("forward-activity", mixer, fga, &batches(1, 6, STEPS));
    let vit_cfg = config(
        "greedy+sgr",
        SgrGrad::ForwardDifference,
        Estimator::Backprop,
    );
    assert_pipelines_match("vit", vit, vit_cfg, &batches(3, 6, STEPS));
}

/// The kernels chunk their reductions by fixed sizes, not by thread: the same steps in rayon
/// pools of 1, 2 and 3 threads give the same bits (what lets a pipeline worker run with fewer
/// threads than the sequential run, and a run reproduce on another core count).
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let cases: [(&str, Build, usize, Estimator); 3] = [
        ("resnet8", resnet_greedy, 3, Estimator::Backprop),
        ("vit", vit, 3, Estimator::Backprop),
        ("localmixer", mixer, 1, Estimator::ForwardActivity),
    ];
    for (name, net, channels, estimator) in cases {
        // 24 images: three of the conv kernels' 8-image weight-gradient chunks.
        let data = batches(channels, 24, 2);
        let cfg = config("greedy+sgr", SgrGrad::FiniteDifference, estimator);
        let runs: Vec<Outcome> = (1..=3)
            .map(|threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| train(net, &cfg, None, &data))
            })
            .collect();
        assert!(runs[0] == runs[1], "{name}: 1 and 2 threads differ");
        assert!(runs[0] == runs[2], "{name}: 1 and 3 threads differ");
    }
}

/// A stop asked for by `on_step` takes no further batch but completes the steps in flight, so
/// the state is that of whole steps: continuing on the rest equals an uninterrupted run.
#[test]
fn a_stop_completes_the_steps_in_flight_and_training_continues_exactly() {
    let data = batches(3, 8, 6);
    let cfg = config("greedy+sgr", SgrGrad::FiniteDifference, Estimator::Backprop);
    let whole = train(resnet_greedy, &cfg, None, &data);
    let mut t = Trainer::new(resnet_greedy(), cfg.clone()).unwrap();
    t.set_pipeline(Some(Pipeline::even(3, 3, 1).unwrap()))
        .unwrap();
    let mut source = data.iter().cloned().map(Ok);
    let mut seen = Vec::new();
    let first = t
        .train_batches(&mut source, &mut |m| {
            seen.push(m.step);
            ControlFlow::Break(())
        })
        .unwrap();
    assert!(first.stopped && first.steps >= 1, "{first:?}");
    assert_eq!(seen, (0..first.steps).collect::<Vec<_>>(), "steps in order");
    assert_eq!(t.global_step(), first.steps);
    let mut rest = data[first.steps..].iter().cloned().map(Ok);
    let second = t
        .train_batches(&mut rest, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(first.steps + second.steps, data.len());
    assert!(
        outcome(&mut t) == whole,
        "stopped and continued run differs"
    );
}

/// A data error stops the feed; the steps before it complete, and the error is returned.
#[test]
fn a_failing_source_returns_its_error_after_the_steps_before_it() {
    let data = batches(3, 8, 3);
    let cfg = config("greedy", SgrGrad::FiniteDifference, Estimator::Backprop);
    let mut t = Trainer::new(resnet_greedy(), cfg).unwrap();
    t.set_pipeline(Some(Pipeline::even(3, 2, 1).unwrap()))
        .unwrap();
    let mut source = data
        .iter()
        .cloned()
        .map(Ok)
        .take(2)
        .chain(std::iter::once(Err(sgr_core::Error::Data(
            "image 7 of batch 2 is unreadable".into(),
        ))));
    let e = t
        .train_batches(&mut source, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(e.to_string().contains("image 7"), "{e}");
    assert_eq!(t.global_step(), 2);
}

/// Layouts that cannot work are refused with what to do.
#[test]
fn pipelines_that_cannot_work_are_refused() {
    let e = Pipeline::even(3, 4, 1).unwrap_err().to_string();
    assert!(e.contains("1..=3 workers"), "{e}");
    let mut cfg = config("greedy+sgr", SgrGrad::FiniteDifference, Estimator::Backprop);
    if let Some(s) = &mut cfg.method.sgr {
        s.direction = Direction::Backward;
    }
    let mut t = Trainer::new(resnet_greedy(), cfg).unwrap();
    let e = t
        .set_pipeline(Some(Pipeline::even(3, 2, 1).unwrap()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("forward direction") && !e.contains("  "), "{e}");
    let e = t
        .set_pipeline(Some(Pipeline::even(2, 2, 1).unwrap()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("K=3"), "{e}");
}

/// Placement by measured step times leaves the trainer exactly as it was.
#[test]
fn measuring_module_times_changes_nothing() {
    let data = batches(3, 8, STEPS);
    let cfg = config("greedy+sgr", SgrGrad::FiniteDifference, Estimator::Backprop);
    let plain = train(resnet_greedy, &cfg, None, &data);
    let mut t = Trainer::new(resnet_greedy(), cfg).unwrap();
    let profile = t.profile_modules(&data[0], 2).unwrap();
    let secs: Vec<f64> = profile.iter().map(|p| p.seconds).collect();
    assert_eq!(secs.len(), 3);
    // Module 0 sends h and a of ResNet-8's first stage: 2 × 8 images × 16 × 8 × 8 floats.
    assert_eq!(profile[0].message_bytes, 2 * 8 * 16 * 8 * 8 * 4);
    assert_eq!(profile[2].message_bytes, 0);
    assert!(secs.iter().all(|s| s.is_finite() && *s > 0.0), "{secs:?}");
    let p = Pipeline::balanced(&secs, 2, 1).unwrap();
    t.set_pipeline(Some(p)).unwrap();
    let mut source = data.iter().cloned().map(Ok);
    t.train_batches(&mut source, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(outcome(&mut t) == plain, "measuring changed the run");
}

/// The modules rank `rank` of `layout` owns.
fn owned(layout: &Layout, rank: usize) -> std::ops::Range<usize> {
    layout.stages().stages()[layout.place(rank).1].clone()
}

/// Whether rank `rank` of a distributed run holds what it should of `all` (the sequential
/// run's, or rank 0's): on rank 0 everything (gathered from the ranks); elsewhere the metrics
/// and the weights, buffers and optimizer state of its own modules only, none of the others'.
fn holds(o: &Outcome, all: &Outcome, net: Build, layout: &Layout, rank: usize) -> bool {
    if rank == 0 {
        return o == all;
    }
    let net = net();
    let mine = owned(layout, rank);
    let names: HashSet<String> = mine
        .clone()
        .flat_map(|k| net.module_params(k))
        .map(|p| p.name)
        .collect();
    let params: Vec<_> = all
        .params
        .iter()
        .filter(|(n, _)| names.contains(n))
        .cloned()
        .collect();
    let states_ok = o.states.len() == all.states.len()
        && o.states
            .iter()
            .zip(&all.states)
            .enumerate()
            .all(|(k, (s, a))| {
                if mine.contains(&k) {
                    s == a
                } else {
                    s.is_empty()
                }
            });
    o.params == params && o.metrics == all.metrics && states_ok
}

/// What a rank of an in-process distributed run leaves: its outcome after sharing the state,
/// the steps it reports, or its error.
type RankResult = Result<(Outcome, usize, bool), String>;

/// Trains `data` with `layout` over in-process ranks (one thread and one trainer each, holding
/// only its own modules; only rank 0 reads the data), shares the position, gathers the whole
/// state on rank 0, and returns every rank's result: rank 0's outcome is the gathered state's. `stop_at` stops
/// the feed after that many completed steps; a `fail_at` batch is a data error.
fn train_ranks(
    net: Build,
    cfg: &TrainerConfig,
    layout: &Layout,
    data: &[Batch],
    stop_at: Option<usize>,
    fail_at: Option<usize>,
) -> Vec<RankResult> {
    let ranks = local_ranks(layout.size());
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut t| {
                s.spawn(move || -> RankResult {
                    let mut trainer =
                        Trainer::new(net(), cfg.clone()).map_err(|e| e.to_string())?;
                    trainer
                        .distribute(&mut t, layout)
                        .map_err(|e| e.to_string())?;
                    let rank0 = t.rank() == 0;
                    let mut source =
                        data.iter()
                            .enumerate()
                            .filter(|_| rank0)
                            .map(|(i, b)| match fail_at {
                                Some(f) if f == i => Err(sgr_core::Error::Data("image 7".into())),
                                _ => Ok(b.clone()),
                            });
                    let mut seen = 0;
                    let d = trainer.train_batches_on(&mut t, layout, &mut source, &mut |_| {
                        seen += 1;
                        if stop_at == Some(seen) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    });
                    let d = match d {
                        Ok(d) => d,
                        // A data error keeps the steps before it: shared like any other stretch.
                        Err(e @ sgr_core::Error::Data(_)) => {
                            trainer
                                .share_state(&mut t, layout)
                                .map_err(|e| e.to_string())?;
                            return Err(format!("data: {e}"));
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    trainer
                        .share_state(&mut t, layout)
                        .map_err(|e| e.to_string())?;
                    let o = match trainer.gather(&mut t, layout).map_err(|e| e.to_string())? {
                        Some(s) => outcome_of(s.params, s.optimizer_states, &mut trainer),
                        None => outcome(&mut trainer),
                    };
                    Ok((o, d.steps, d.stopped))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    })
}

fn assert_ranks_match(name: &str, net: Build, cfg: TrainerConfig, data: &[Batch]) {
    let sequential = train(net, &cfg, None, data);
    let k = net().num_modules();
    for ranks in 2..=k {
        let p = Pipeline::even(k, ranks, 1).unwrap();
        let layout = Layout::pipeline(p.clone());
        for (r, result) in train_ranks(net, &cfg, &layout, data, None, None)
            .into_iter()
            .enumerate()
        {
            let (o, steps, stopped) = result.unwrap_or_else(|e| panic!("{name}: rank {r}: {e}"));
            assert_eq!((steps, stopped), (data.len(), false), "{name}: rank {r}");
            assert!(
                holds(&o, &sequential, net, &layout, r),
                "{name}: rank {r} of {:?} differs from the sequential run",
                p.stages()
            );
        }
    }
}

/// The central invariant across processes: with the modules spread over 2 and 3 ranks (here
/// threads with a transport of messages), every rank ends with the sequential run's bits.
#[test]
fn ranks_are_bit_identical_to_the_sequential_run() {
    let data = batches(3, 8, STEPS);
    let bp = Estimator::Backprop;
    let cases: [(&str, Build, SgrGrad); 4] = [
        ("greedy", resnet_greedy, SgrGrad::FiniteDifference),
        ("greedy+sgr", resnet_greedy, SgrGrad::ForwardDifference),
        ("dgl+sgr", resnet_dgl, SgrGrad::Exact),
        ("infopro+sgr", resnet_infopro, SgrGrad::FiniteDifference),
    ];
    for (method, net, grad) in cases {
        let name = format!("{method} ({grad})");
        assert_ranks_match(&name, net, config(method, grad, bp), &data);
    }
    let mut cfg = config("greedy+sgr", SgrGrad::FiniteDifference, bp);
    cfg.mix = Some(MixConfig::default());
    cfg.label_smoothing = 0.1;
    assert_ranks_match("mixup", resnet_greedy, cfg, &data);
    let fga = config(
        "greedy+sgr",
        SgrGrad::FiniteDifference,
        Estimator::ForwardActivity,
    );
    assert_ranks_match("forward-activity", mixer, fga, &batches(1, 6, STEPS));
}

/// A stop and a data error reach every rank: all report the same steps, the steps before the
/// error are kept, and a stop completes the steps in flight.
#[test]
fn ranks_stop_and_fail_together() {
    let data = batches(3, 8, STEPS);
    let cfg = config(
        "greedy+sgr",
        SgrGrad::ForwardDifference,
        Estimator::Backprop,
    );
    let p = Layout::pipeline(Pipeline::even(3, 3, 1).unwrap());
    let stopped = train_ranks(resnet_greedy, &cfg, &p, &data, Some(1), None);
    let first = stopped[0].as_ref().unwrap();
    assert!(first.2 && first.1 >= 1, "{:?}", (first.1, first.2));
    for (rank, r) in stopped.iter().enumerate() {
        let r = r.as_ref().unwrap();
        assert_eq!((r.1, r.2), (first.1, true));
        assert!(
            holds(&r.0, &first.0, resnet_greedy, &p, rank),
            "the ranks differ after a stop"
        );
    }
    let failed = train_ranks(resnet_greedy, &cfg, &p, &data, None, Some(2));
    for (r, result) in failed.iter().enumerate() {
        let e = result.as_ref().unwrap_err();
        assert!(
            e.starts_with("data: ") && e.contains("image 7"),
            "rank {r}: {e}"
        );
    }
}

/// Ranks that disagree on what they run are refused on every rank, naming the rank.
#[test]
fn ranks_that_run_different_things_are_named() {
    let ranks = local_ranks(3);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|mut t| {
                s.spawn(move || {
                    let v = if t.rank() == 2 { "b" } else { "a" };
                    check_same(&mut t, "configuration", v)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("rank 2 has b") && !e.contains("rank 1 has"),
            "{e}"
        );
    }
}

/// The numbers in a metrics line, in order.
fn numbers(s: &str) -> Vec<f64> {
    s.split(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E')))
        .filter_map(|w| w.parse::<f64>().ok())
        .collect()
}

/// `a` and `b` agree to `tol` (relative, with an absolute floor of `tol`) in every weight,
/// optimizer state and metric: what a change of summation order can move.
fn assert_close(name: &str, a: &Outcome, b: &Outcome, tol: f64) {
    let close = |x: f64, y: f64| (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs()));
    let floats = |v: &[u32]| {
        v.iter()
            .map(|&u| f32::from_bits(u) as f64)
            .collect::<Vec<_>>()
    };
    let mut worst = 0f64;
    for ((na, va), (nb, vb)) in a.params.iter().zip(&b.params) {
        assert_eq!(na, nb);
        for (x, y) in floats(va).into_iter().zip(floats(vb)) {
            worst = worst.max((x - y).abs());
            assert!(close(x, y), "{name}: {na}: {x} against {y}");
        }
    }
    for (sa, sb) in a.states.iter().zip(&b.states) {
        for ((na, va), (_, vb)) in sa.iter().zip(sb) {
            for (x, y) in floats(va).into_iter().zip(floats(vb)) {
                assert!(close(x, y), "{name}: state {na}: {x} against {y}");
            }
        }
    }
    // The boundaries' cosines and relative distances are batch-level ratios, which the copies
    // average as ratios: compared loosely. Losses, accuracy and SGR distances are means over
    // examples, which combine exactly.
    let split = |m: &str| {
        let (head, bounds) = m.split_once("[Boundary").unwrap_or((m, ""));
        let distances: Vec<f64> = bounds
            .split("sgr_distance: Some(")
            .skip(1)
            .filter_map(|w| w.split(')').next()?.parse().ok())
            .collect();
        (numbers(head), distances, numbers(bounds))
    };
    let (ha, da, ba) = split(&a.metrics);
    let (hb, db, bb) = split(&b.metrics);
    assert_eq!(
        ba.len(),
        bb.len(),
        "{name}: {} against {}",
        a.metrics,
        b.metrics
    );
    for (x, y) in ba.into_iter().zip(bb) {
        assert!(
            (x - y).abs() <= 0.1 * (1.0 + y.abs()),
            "{name}: boundaries {} against {}",
            a.metrics,
            b.metrics
        );
    }
    let (ma, mb) = ([ha, da].concat(), [hb, db].concat());
    assert_eq!(
        ma.len(),
        mb.len(),
        "{name}: {} against {}",
        a.metrics,
        b.metrics
    );
    for (x, y) in ma.into_iter().zip(mb) {
        assert!(
            close(x, y),
            "{name}: metrics {} against {}",
            a.metrics,
            b.metrics
        );
    }
    assert!(worst > 0.0 || a == b, "{name}: no weight was compared");
}

/// The largest difference between two runs' weights and optimizer states.
fn max_diff(a: &Outcome, b: &Outcome) -> f64 {
    let pairs = a
        .params
        .iter()
        .zip(&b.params)
        .chain(a.states.iter().flatten().zip(b.states.iter().flatten()));
    pairs
        .flat_map(|((_, x), (_, y))| x.iter().zip(y))
        .map(|(&x, &y)| (f32::from_bits(x) as f64 - f32::from_bits(y) as f64).abs())
        .fold(0.0, f64::max)
}

/// Eight-image batches and a last one of a single image, so that some replicas get an empty
/// shard (sizes 4+4 and 1+0 for two replicas, 3+3+2 and 1+0+0 for three).
fn batches_with_a_short_last(channels: usize) -> Vec<Batch> {
    let mut data = batches(channels, 8, 3);
    let last = &data[0];
    let short = Batch {
        input: last.input.narrow(0, 0, 1).unwrap(),
        targets: match &last.targets {
            sgr_core::objective::Targets::Labels(t) => {
                sgr_core::objective::Targets::Labels(t.narrow(0, 0, 1).unwrap())
            }
            sgr_core::objective::Targets::Soft(t) => {
                sgr_core::objective::Targets::Soft(t.narrow(0, 0, 1).unwrap())
            }
        },
    };
    data.push(short);
    data
}

/// Runs `layout` and returns rank 0's outcome after checking that every rank completed every
/// step and holds the same bits.
fn replicated(
    name: &str,
    net: Build,
    cfg: &TrainerConfig,
    layout: &Layout,
    data: &[Batch],
) -> Outcome {
    let mut results = train_ranks(net, cfg, layout, data, None, None).into_iter();
    let (first, steps, stopped) = results
        .next()
        .unwrap()
        .unwrap_or_else(|e| panic!("{name}: rank 0: {e}"));
    assert_eq!((steps, stopped), (data.len(), false), "{name}");
    for (r, result) in results.enumerate() {
        let (o, steps, _) = result.unwrap_or_else(|e| panic!("{name}: rank {}: {e}", r + 1));
        assert_eq!(steps, data.len(), "{name}: rank {}", r + 1);
        assert!(
            holds(&o, &first, net, layout, r + 1),
            "{name}: rank {} differs from rank 0",
            r + 1
        );
    }
    first
}

/// Data parallel: R copies of the modules, each on a share of every batch, end where one
/// process at the same batch ends, up to the order of the sums that average the shares (no
/// batch norm here: each copy would take its statistics over its shard). Every rank holds the
/// same bits, also with a pipeline inside each copy and with shards of unequal and zero size.
#[test]
fn replicas_match_one_process_at_the_same_batch() {
    let data = batches_with_a_short_last(1);
    for (method, grad) in [
        ("greedy", SgrGrad::Exact),
        ("greedy+sgr", SgrGrad::Exact),
        ("greedy+sgr", SgrGrad::FiniteDifference),
        ("greedy+sgr", SgrGrad::ForwardDifference),
    ] {
        let cfg = config(method, grad, Estimator::Backprop);
        let sequential = train(mixer, &cfg, None, &data);
        for (replicas, stages) in [(2, 1), (3, 1), (2, 3)] {
            let name = format!("{method} {grad}, {replicas} replicas x {stages} stages");
            let layout = Layout::new(Pipeline::even(3, stages, 1).unwrap(), replicas).unwrap();
            let o = replicated(&name, mixer, &cfg, &layout, &data);
            if stages > 1 {
                // A pipeline inside each copy changes no arithmetic.
                let flat = Layout::new(Pipeline::even(3, 1, 1).unwrap(), replicas).unwrap();
                let f = replicated(&name, mixer, &cfg, &flat, &data);
                assert!(f == o, "{name}: differs from {replicas} replicas x 1 stage");
            }
            if grad == SgrGrad::Exact {
                assert_close(&name, &o, &sequential, 1e-5);
            } else {
                // A finite difference's step is scaled to its batch's RMS, so a shard's term
                // differs from the whole batch's by the difference's truncation error: the
                // copies must be as close to the exact term's run as one process is.
                let exact = train(
                    mixer,
                    &config(method, SgrGrad::Exact, Estimator::Backprop),
                    None,
                    &data,
                );
                let (mine, one) = (max_diff(&o, &exact), max_diff(&sequential, &exact));
                assert!(
                    mine <= 2.0 * one,
                    "{name}: {mine} from the exact run, one process {one}"
                );
            }
        }
    }
    // A transformer, whose LayerNorm is per token.
    let data = batches(3, 8, 2);
    let cfg = config("greedy+sgr", SgrGrad::Exact, Estimator::Backprop);
    let sequential = train(vit, &cfg, None, &data);
    let layout = Layout::new(Pipeline::even(2, 2, 1).unwrap(), 2).unwrap();
    let o = replicated("vit", vit, &cfg, &layout, &data);
    assert_close("vit", &o, &sequential, 1e-5);
}

/// Batch norm and forward gradients under replicas: each copy's statistics and noise are its
/// own, so the run is not one process's, but every rank ends with the same bits (the copies'
/// running statistics averaged) and a rerun repeats them.
#[test]
fn replicas_with_batch_norm_and_noise_agree_across_ranks() {
    let data = batches(3, 8, 2);
    let cfg = config(
        "greedy+sgr",
        SgrGrad::ForwardDifference,
        Estimator::Backprop,
    );
    let layout = Layout::new(Pipeline::even(3, 1, 1).unwrap(), 2).unwrap();
    let a = replicated("resnet", resnet_greedy, &cfg, &layout, &data);
    let b = replicated("resnet again", resnet_greedy, &cfg, &layout, &data);
    assert!(a == b, "a rerun of the replicated run differs");
    let sequential = train(resnet_greedy, &cfg, None, &data);
    let mean = |o: &Outcome| {
        o.params
            .iter()
            .find(|(n, _)| n.ends_with("bn1.running_mean"))
            .map(|(_, v)| v.clone())
            .expect("a running mean")
    };
    assert_ne!(
        mean(&a),
        mean(&sequential),
        "the statistics are the shards' average"
    );
    let fga = config(
        "greedy+sgr",
        SgrGrad::FiniteDifference,
        Estimator::ForwardActivity,
    );
    let layout = Layout::new(Pipeline::even(3, 3, 1).unwrap(), 2).unwrap();
    replicated("forward-activity", mixer, &fga, &layout, &batches(1, 6, 2));
}

/// Under replicas a data error and a stop reach every rank; the backward SGR direction and a
/// layout that does not match the ranks are refused on every rank.
#[test]
fn replicas_stop_fail_and_refuse_together() {
    let data = batches(1, 8, STEPS);
    let cfg = config("greedy+sgr", SgrGrad::FiniteDifference, Estimator::Backprop);
    let layout = Layout::new(Pipeline::even(3, 3, 1).unwrap(), 2).unwrap();
    let failed = train_ranks(mixer, &cfg, &layout, &data, None, Some(2));
    for (r, result) in failed.iter().enumerate() {
        let e = result.as_ref().unwrap_err();
        assert!(
            e.starts_with("data: ") && e.contains("image 7"),
            "rank {r}: {e}"
        );
    }
    let stopped = train_ranks(mixer, &cfg, &layout, &data, Some(1), None);
    let first = &stopped[0].as_ref().unwrap().0;
    for (rank, r) in stopped.iter().enumerate() {
        let r = r.as_ref().unwrap();
        assert!(
            r.2 && holds(&r.0, first, mixer, &layout, rank),
            "the ranks differ after a stop"
        );
    }
    let mut backward = cfg.clone();
    backward.method.sgr.as_mut().unwrap().direction = Direction::Backward;
    let one_stage = Layout::new(Pipeline::even(3, 1, 1).unwrap(), 2).unwrap();
    for r in train_ranks(mixer, &backward, &one_stage, &data, None, None) {
        let e = r.unwrap_err();
        assert!(e.contains("backward direction"), "{e}");
    }
    let mut t = local_ranks(1).remove(0);
    let mut trainer = Trainer::new(mixer(), cfg).unwrap();
    let e = trainer
        .train_batches_on(&mut t, &layout, &mut std::iter::empty(), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 ranks run 3 stages in 2 replicas (6 ranks)"),
        "{e}"
    );
}

/// Bytes a tensor holds.
fn nbytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// What a trainer holds of module `k`: its weights and buffers, and its optimizer state.
fn module_bytes(t: &Trainer, k: usize) -> usize {
    let params: usize = t
        .network()
        .module_params(k)
        .iter()
        .map(|p| nbytes(p.var.as_tensor()))
        .sum();
    let state: usize = t.optimizers()[k]
        .state()
        .expect("state")
        .values()
        .map(nbytes)
        .sum();
    params + state
}

/// What a trainer holds in all: every weight and buffer its network lists, and every
/// optimizer's state.
fn held_bytes(t: &Trainer) -> usize {
    let params: usize = t
        .network()
        .params()
        .iter()
        .map(|p| nbytes(p.var.as_tensor()))
        .sum();
    let states: usize = t
        .optimizers()
        .iter()
        .flat_map(|o| o.state().expect("state").into_values())
        .map(|v| nbytes(&v))
        .sum();
    params + states
}

/// Test batches of uneven sizes, more than the ranks keep in flight.
fn test_batches() -> Vec<(Tensor, Tensor)> {
    [8, 8, 8, 8, 8, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let i = i as u64;
            (
                randn(&[n, 3, 8, 8], 1.0, 90 + i, DType::F32),
                labels(n, 110 + i),
            )
        })
        .collect()
}

/// The evaluation's numbers as bits.
fn eval_bits(m: &sgr_core::events::EvalMetrics) -> (u64, u64, Option<u64>, usize) {
    (
        m.loss.to_bits(),
        m.accuracy.to_bits(),
        m.top5.map(f64::to_bits),
        m.samples,
    )
}

/// What one rank of `ownership_on` leaves: its trainer, its evaluations before and after
/// training, and the first non-finite tensor it was told of after a NaN was planted.
type Owned = (
    Trainer,
    (u64, u64, Option<u64>, usize),
    Option<(u64, u64, Option<u64>, usize)>,
    Option<(String, usize)>,
);

/// On the ranks of `layout`, each holding only its own modules: evaluates `test` (pipelined),
/// trains on `data`, evaluates again, then plants NaN in the first body
/// tensor of module 2 and the first objective tensor of module 0 (where held) and checks
/// finiteness across the ranks.
fn ownership_on(cfg: &TrainerConfig, layout: &Layout, data: &[Batch]) -> Vec<Owned> {
    let test = test_batches();
    let ranks = local_ranks(layout.size());
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut t| {
                let test = &test;
                s.spawn(move || {
                    let mut trainer = Trainer::new(resnet_greedy(), cfg.clone()).unwrap();
                    trainer.distribute(&mut t, layout).unwrap();
                    let rank0 = t.rank() == 0;
                    let mut feed = test.iter().filter(|_| rank0).cloned().map(Ok);
                    let before = trainer.evaluate_on(&mut t, layout, &mut feed).unwrap();
                    let mut source = data.iter().filter(|_| rank0).cloned().map(Ok);
                    trainer
                        .train_batches_on(&mut t, layout, &mut source, &mut |_| {
                            ControlFlow::Continue(())
                        })
                        .unwrap();
                    trainer.share_state(&mut t, layout).unwrap();
                    let mut feed = test.iter().filter(|_| rank0).cloned().map(Ok);
                    let after = trainer.evaluate_on(&mut t, layout, &mut feed).unwrap();
                    // Copies take their batch-norm statistics over their shards: only a
                    // pipeline trains the one-process run's model.
                    let after = (layout.replicas() == 1).then(|| eval_bits(&after));
                    assert_eq!(trainer.first_non_finite_on(&mut t, layout).unwrap(), None);
                    let poisoned = poison(&trainer);
                    let bad = trainer.first_non_finite_on(&mut t, layout).unwrap();
                    // Heal it, so that the trainer's bytes can be compared below.
                    for (p, v) in poisoned {
                        p.var.set(&v).unwrap();
                    }
                    (trainer, eval_bits(&before), after, bad)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Sets the first body tensor of module 2 and the first objective tensor of module 0 to NaN
/// where `t` holds them; returns them with their values.
fn poison(t: &Trainer) -> Vec<(Param, Tensor)> {
    let net = t.network();
    let mut hit = Vec::new();
    let body = net.module_body_params(2).into_iter().next();
    let objective = net.module_objective(0).unwrap().params().into_iter().next();
    for p in body.into_iter().chain(objective) {
        let v = p.var.as_tensor().copy().unwrap();
        p.var.set(&v.affine(0.0, f64::NAN).unwrap()).unwrap();
        hit.push((p, v));
    }
    hit
}

/// After the modules are distributed, each rank holds the weights, buffers and optimizer state
/// of its own stage's modules and nothing of the others' (copies of a stage hold the stage):
/// its bytes are its stage's share of the one-process trainer's, and the ranks of a pipeline
/// add up to it. The pipelined evaluation gives the one-process numbers bit for bit, before and
/// after training, and a NaN is found by every rank where one process finds it.
#[test]
fn ranks_hold_only_their_own_modules() {
    let data = batches(3, 8, STEPS);
    let cfg = config(
        "greedy+sgr",
        SgrGrad::ForwardDifference,
        Estimator::Backprop,
    );
    let test = test_batches();
    let evaluate = |t: &Trainer| {
        eval_bits(
            &t.evaluate(test.iter().cloned().map(Ok::<_, sgr_core::Error>))
                .unwrap(),
        )
    };
    let mut alone = Trainer::new(resnet_greedy(), cfg.clone()).unwrap();
    let initial = evaluate(&alone);
    let mut source = data.iter().cloned().map(Ok);
    alone
        .train_batches(&mut source, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let trained = evaluate(&alone);
    let k = alone.network().num_modules();
    let per_module: Vec<usize> = (0..k).map(|m| module_bytes(&alone, m)).collect();
    let total = held_bytes(&alone);
    assert_eq!(per_module.iter().sum::<usize>(), total);
    let poisoned = poison(&alone);
    let expected_nan = alone.first_non_finite().unwrap();
    let (tensor, module) = expected_nan.clone().expect("a NaN is found");
    assert_eq!(module, 2, "{tensor}: a body comes before every objective");
    for (p, v) in poisoned {
        p.var.set(&v).unwrap();
    }
    for layout in [
        Layout::pipeline(Pipeline::even(k, 2, 1).unwrap()),
        Layout::pipeline(Pipeline::even(k, 3, 1).unwrap()),
        Layout::new(Pipeline::even(k, 2, 1).unwrap(), 2).unwrap(),
    ] {
        let name = format!("{:?} x {}", layout.stages().stages(), layout.replicas());
        let results = ownership_on(&cfg, &layout, &data);
        let mut sum = 0;
        for (rank, (trainer, before, after, bad)) in results.iter().enumerate() {
            let mine = owned(&layout, rank);
            let want: usize = mine.clone().map(|m| per_module[m]).sum();
            let held = held_bytes(trainer);
            assert_eq!(held, want, "{name}: rank {rank} holds {held} bytes");
            sum += held;
            for m in (0..k).filter(|m| !mine.contains(m)) {
                assert!(
                    !trainer.holds_module(m)
                        && trainer.network().module_params(m).is_empty()
                        && trainer.optimizers()[m].params().is_empty(),
                    "{name}: rank {rank} holds module {m}"
                );
            }
            assert_eq!(*before, initial, "{name}: rank {rank}'s first evaluation");
            if let Some(after) = after {
                assert_eq!(*after, trained, "{name}: rank {rank}'s evaluation");
            }
            assert_eq!(*bad, expected_nan, "{name}: rank {rank}'s finiteness check");
        }
        if layout.replicas() == 1 {
            assert_eq!(
                sum, total,
                "{name}: the ranks' bytes add up to one process's"
            );
        }
    }
}
