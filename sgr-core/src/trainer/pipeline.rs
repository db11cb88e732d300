//! Module-parallel training: the modules of a step run on worker threads as a synchronous
//! pipeline (docs/parallel.md).
//!
//! Worker j owns a contiguous range of modules and their optimizers; at tick t it runs them on
//! the step t − j. Nothing flows backward: module k needs from module k−1 only a [`Carry`]
//! (the detached output and a_{k−1}), which travels forward with the step's batch, lr, λ and
//! [`StepRecord`]. The thread that feeds the pipeline also completes the steps, in order, so
//! the epoch sums are added exactly as the sequential schedule adds them. Each worker runs its
//! modules' step with the code of the sequential schedule ([`super::module::module_step`]) on
//! the same inputs and seeds, and the kernels do not depend on the thread count, so the
//! weights, optimizer states and metrics are bit-identical to the sequential run's.

use std::ops::{ControlFlow, Range};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::time::Instant;

use super::module::{stage_step, Carry, StepInput, StepRecord};
use super::{step_input, Progress, TrainerConfig};
use crate::events::StepMetrics;
use crate::network::LocalNetwork;
use crate::objective::Batch;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// Which modules each pipeline worker owns (contiguous, in order, covering all K) and how
/// many compute threads each worker gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    stages: Vec<Range<usize>>,
    threads: usize,
}

impl Pipeline {
    /// A pipeline whose worker j owns `stages[j]`, each with `threads` compute threads.
    pub fn new(stages: Vec<Range<usize>>, threads: usize, modules: usize) -> Result<Self> {
        let mut next = 0;
        for (j, r) in stages.iter().enumerate() {
            if r.start != next || r.end <= r.start {
                return Err(Error::InvalidConfig(format!(
                    "pipeline worker {j} owns modules {r:?}: each worker needs a non-empty \
                     range that starts where the previous one ends ({next})"
                )));
            }
            next = r.end;
        }
        if next != modules || stages.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "the pipeline's workers own modules 0..{next}, the network has K={modules}"
            )));
        }
        if threads == 0 {
            return Err(Error::InvalidConfig(
                "a pipeline worker needs at least one compute thread".into(),
            ));
        }
        Ok(Self { stages, threads })
    }

    /// `workers` workers over K modules, each owning as many modules as possible evenly.
    pub fn even(modules: usize, workers: usize, threads: usize) -> Result<Self> {
        check_workers(modules, workers)?;
        let stages = (0..workers)
            .map(|j| j * modules / workers..(j + 1) * modules / workers)
            .collect();
        Self::new(stages, threads, modules)
    }

    /// `workers` workers placed by per-module step times: the contiguous assignment whose
    /// slowest worker is fastest (the pipeline's throughput is one step per slowest worker's
    /// time), found exactly.
    pub fn balanced(seconds: &[f64], workers: usize, threads: usize) -> Result<Self> {
        let k = seconds.len();
        check_workers(k, workers)?;
        if let Some(bad) = seconds.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(Error::InvalidConfig(format!(
                "a module step time is {bad}: times must be finite and ≥ 0"
            )));
        }
        let ends = minimax_ends(seconds, workers);
        let mut start = 0;
        let stages = ends
            .into_iter()
            .map(|e| {
                let r = start..e;
                start = e;
                r
            })
            .collect();
        Self::new(stages, threads, k)
    }

    /// The modules of each worker.
    pub fn stages(&self) -> &[Range<usize>] {
        &self.stages
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.stages.len()
    }

    /// Compute threads per worker.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn check_workers(modules: usize, workers: usize) -> Result<()> {
    if workers == 0 || workers > modules {
        return Err(Error::InvalidConfig(format!(
            "a pipeline of {workers} workers over K={modules} modules: each worker owns at least \
             one module, so use 1..={modules} workers (or cut the network into more modules)"
        )));
    }
    Ok(())
}

/// The ends of the contiguous partition of `cost` into `parts` non-empty groups whose largest
/// sum is smallest (dynamic programming over prefix sums, O(parts · K²)).
fn minimax_ends(cost: &[f64], parts: usize) -> Vec<usize> {
    let k = cost.len();
    let mut prefix = vec![0.0; k + 1];
    for (i, c) in cost.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    // best[p][e]: the smallest largest sum of the first e modules in p groups; cut[p][e]: where
    // its last group starts.
    let mut best = vec![vec![f64::INFINITY; k + 1]; parts + 1];
    let mut cut = vec![vec![0usize; k + 1]; parts + 1];
    best[0][0] = 0.0;
    for p in 1..=parts {
        for e in p..=k {
            for s in (p - 1)..e {
                let v = best[p - 1][s].max(prefix[e] - prefix[s]);
                if v < best[p][e] {
                    best[p][e] = v;
                    cut[p][e] = s;
                }
            }
        }
    }
    let mut ends = vec![k];
    let mut e = k;
    for p in (2..=parts).rev() {
        e = cut[p][e];
        ends.push(e);
    }
    ends.reverse();
    ends
}

/// One step in flight: everything its next module needs, and what completes it.
struct Message {
    input: StepInput,
    carry: Carry,
    record: StepRecord,
}

/// How a pipelined run over a batch source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Steps completed.
    pub steps: usize,
    /// Whether `on_step` asked to stop (the steps in flight then were completed).
    pub stopped: bool,
}

/// Trains on `batches` in order on the pipeline's workers; see [`super::Trainer::train_batches`].
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    optimizers: &mut [Box<dyn Optimizer>],
    progress: &mut Progress,
    pipeline: &Pipeline,
    batches: &mut dyn Iterator<Item = Result<Batch>>,
    on_step: &mut dyn FnMut(&StepMetrics) -> ControlFlow<()>,
) -> Result<Drained> {
    let pools = (0..pipeline.workers())
        .map(|j| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(pipeline.threads)
                .thread_name(move |i| format!("sgr-pipeline-{j}.{i}"))
                .build()
                .map_err(|e| Error::Internal(format!("pipeline worker {j}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    // Each worker's optimizers, split off in stage order.
    let mut owned: Vec<&mut [Box<dyn Optimizer>]> = Vec::with_capacity(pipeline.workers());
    let mut rest = optimizers;
    for r in &pipeline.stages {
        let (mine, others) = rest.split_at_mut(r.len());
        owned.push(mine);
        rest = others;
    }
    let (done_tx, done_rx) = channel::<Result<Message>>();
    std::thread::scope(|scope| {
        let (feed_tx, mut rx) = sync_channel::<Message>(1);
        let mut handles = Vec::with_capacity(pipeline.workers());
        let last = pipeline.workers() - 1;
        for (j, (opts, pool)) in owned.into_iter().zip(&pools).enumerate() {
            let range = pipeline.stages[j].clone();
            let (next_tx, next_rx) = sync_channel::<Message>(1);
            let out = if j == last { None } else { Some(next_tx) };
            let inbox = std::mem::replace(&mut rx, next_rx);
            let done = done_tx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("sgr-pipeline-{j}"))
                    .spawn_scoped(scope, move || {
                        pool.install(|| worker(net, cfg, range, opts, inbox, out, done))
                    })
                    .map_err(|e| Error::Internal(format!("pipeline worker {j}: {e}"))),
            );
        }
        drop(done_tx);
        let result = match handles.iter().find_map(|h| h.as_ref().err()) {
            Some(e) => {
                // The workers that did start end when their feed closes.
                drop(feed_tx);
                Err(Error::Internal(e.to_string()))
            }
            None => feed(
                net,
                cfg,
                progress,
                pipeline.workers() + 1,
                feed_tx,
                &done_rx,
                batches,
                on_step,
            ),
        };
        // The feed's sender is gone: the workers finish what they hold and stop.
        let mut panicked = None;
        for (j, h) in handles.into_iter().enumerate() {
            if let Ok(h) = h {
                if let Err(p) = h.join() {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    panicked.get_or_insert(Error::Internal(format!(
                        "pipeline worker {j} panicked: {what}"
                    )));
                }
            }
        }
        // A panic is the cause of whatever the feed then saw (a closed channel).
        match panicked {
            Some(p) => Err(p),
            None => result,
        }
    })
}

/// A worker: its modules' part of each step that arrives, passed on downstream (or, from the
/// last worker, back to the feeding thread). An error goes straight to the feeding thread, and
/// the worker stops; the others stop when their channels close.
fn worker(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    modules: Range<usize>,
    optimizers: &mut [Box<dyn Optimizer>],
    inbox: Receiver<Message>,
    out: Option<SyncSender<Message>>,
    done: Sender<Result<Message>>,
) {
    let _span = tracing::debug_span!("pipeline_worker", first = modules.start).entered();
    while let Ok(mut msg) = inbox.recv() {
        let carry = msg.carry.clone();
        let step = stage_step(
            net,
            cfg,
            optimizers,
            modules.start,
            &msg.input,
            carry,
            &mut msg.record,
        )
        .map(|c| msg.carry = c);
        if let Err(e) = step {
            let _ = done.send(Err(e));
            return;
        }
        let sent = match &out {
            Some(tx) => tx.send(msg).is_ok(),
            None => done.send(Ok(msg)).is_ok(),
        };
        if !sent {
            return;
        }
    }
}

/// The feeding thread: keeps up to `depth` steps in flight, completes them in order and stops
/// feeding when the source ends, fails, or `on_step` breaks. Returns once nothing is in
/// flight, or at the first error.
#[allow(clippy::too_many_arguments)]
fn feed(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    progress: &mut Progress,
    depth: usize,
    feed_tx: SyncSender<Message>,
    done_rx: &Receiver<Result<Message>>,
    batches: &mut dyn Iterator<Item = Result<Batch>>,
    on_step: &mut dyn FnMut(&StepMetrics) -> ControlFlow<()>,
) -> Result<Drained> {
    let mut feed_tx = Some(feed_tx);
    let mut in_flight = 0usize;
    let mut drained = Drained {
        steps: 0,
        stopped: false,
    };
    let mut source_error = None;
    let mut last = Instant::now();
    loop {
        if in_flight < depth {
            if let Some(tx) = &feed_tx {
                match batches.next() {
                    Some(Ok(batch)) => {
                        let input = step_input(net, cfg, &batch, progress.step + in_flight)?;
                        let carry = Carry::start(&input.batch);
                        let msg = Message {
                            input,
                            carry,
                            record: StepRecord::default(),
                        };
                        if tx.send(msg).is_err() {
                            // The first worker stopped; its error is on the way.
                            feed_tx = None;
                        } else {
                            in_flight += 1;
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        source_error = Some(e);
                        feed_tx = None;
                    }
                    None => feed_tx = None,
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        let msg = match done_rx.recv() {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Internal(
                    "a pipeline worker stopped without a result".into(),
                ))
            }
        };
        in_flight -= 1;
        let now = Instant::now();
        let seconds = now.duration_since(last).as_secs_f64();
        last = now;
        let m = progress.complete(&msg.input, msg.record, seconds)?;
        drained.steps += 1;
        if on_step(&m).is_break() && !drained.stopped {
            drained.stopped = true;
            feed_tx = None;
        }
    }
    match source_error {
        Some(e) => Err(e),
        None => Ok(drained),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(cost: &[f64], parts: usize) -> f64 {
        fn go(c: &[f64], parts: usize) -> f64 {
            if parts == 1 {
                return c.iter().sum();
            }
            (1..=c.len() - (parts - 1))
                .map(|i| c[..i].iter().sum::<f64>().max(go(&c[i..], parts - 1)))
                .fold(f64::INFINITY, f64::min)
        }
        go(cost, parts)
    }

    #[test]
    fn balanced_placement_is_the_exact_minimax() {
        let mut state = 7u64;
        for k in 1..=8 {
            for n in 1..=k {
                let cost: Vec<f64> = (0..k)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((state >> 33) % 100) as f64
                    })
                    .collect();
                let p = Pipeline::balanced(&cost, n, 1).unwrap();
                assert_eq!(p.workers(), n);
                let worst = p
                    .stages()
                    .iter()
                    .map(|r| cost[r.clone()].iter().sum::<f64>())
                    .fold(0.0, f64::max);
                assert_eq!(worst, brute(&cost, n), "{cost:?} in {n}");
            }
        }
    }

    #[test]
    fn layouts_that_cannot_work_are_refused_with_the_range() {
        let e = Pipeline::even(2, 3, 1).unwrap_err().to_string();
        assert!(e.contains("1..=2 workers"), "{e}");
        assert!(Pipeline::new(vec![0..1, 2..3], 1, 3).is_err());
        assert!(Pipeline::new(std::iter::once(0..2).collect(), 1, 3).is_err());
        assert!(Pipeline::new(std::iter::once(0..3).collect(), 0, 3).is_err());
        assert_eq!(Pipeline::even(5, 2, 1).unwrap().stages(), &[0..2, 2..5][..]);
        assert!(Pipeline::balanced(&[1.0, f64::NAN], 2, 1).is_err());
    }
}
