//! Module-parallel training across processes (MPI ranks): the pipeline of `super::pipeline`
//! with its channels replaced by messages between ranks (docs/parallel.md, "Across
//! processes").
//!
//! Rank j owns the modules of stage j. Rank 0 reads the data, draws each step's input (mixup,
//! lr, λ) once, runs its modules and sends the step (input, carry, record) to rank 1; rank j
//! runs its modules and sends it on; the last rank sends the finished record back to rank 0,
//! which completes the steps in order, keeps at most N + 1 in flight and decides when to stop.
//! Every rank runs [`super::module::module_step`] on exactly the inputs and seeds of the
//! sequential schedule, so the result is bit-identical to it. After a stretch of steps,
//! [`Trainer::share_state`] gives every rank the whole model, optimizer state and progress,
//! so that any rank could evaluate or save a checkpoint.
//!
//! Messages flow forward along 0 → 1 → … → N−1 and from N−1 back to rank 0 only, and a
//! [`Transport::send`] never waits for its receiver, so no cycle of ranks can block.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use super::module::{stage_step, Carry, StepInput, StepRecord};
use super::pipeline::{Drained, Pipeline};
use super::wire::{read_record, read_step, write_record, write_step, Reader, Writer};
use super::{step_input, Trainer};
use crate::events::StepMetrics;
use crate::objective::Batch;
use crate::{Error, Result};

/// Messages between the ranks of one run.
pub trait Transport {
    /// This rank (0 reads the data and completes the steps).
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Sends `bytes` to rank `to` without waiting for it to receive them. Messages from one
    /// rank to another arrive in the order they were sent.
    fn send(&mut self, to: usize, bytes: Vec<u8>) -> Result<()>;
    /// The next message from rank `from` (waits for it).
    fn recv(&mut self, from: usize) -> Result<Vec<u8>>;
    /// `root`'s `bytes` on every rank (every rank calls it, in the same order).
    fn broadcast(&mut self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>>;
}

/// N ranks in one process, one per thread: the transport of the tests, and of anyone who
/// wants the distributed schedule without MPI.
pub struct LocalRank {
    rank: usize,
    to: Vec<Sender<Vec<u8>>>,
    from: Vec<Receiver<Vec<u8>>>,
}

/// `n` connected [`LocalRank`]s, to be moved to one thread each.
pub fn local_ranks(n: usize) -> Vec<LocalRank> {
    let mut to: Vec<Vec<Option<Sender<Vec<u8>>>>> = (0..n).map(|_| vec![None; n]).collect();
    let mut from: Vec<Vec<Option<Receiver<Vec<u8>>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for (a, row) in to.iter_mut().enumerate() {
        for (b, slot) in row.iter_mut().enumerate() {
            let (tx, rx) = channel();
            *slot = Some(tx);
            from[b][a] = Some(rx);
        }
    }
    to.into_iter()
        .zip(from)
        .enumerate()
        .map(|(rank, (to, from))| LocalRank {
            rank,
            to: to.into_iter().map(|s| s.expect("filled")).collect(),
            from: from.into_iter().map(|r| r.expect("filled")).collect(),
        })
        .collect()
}

impl Transport for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn send(&mut self, to: usize, bytes: Vec<u8>) -> Result<()> {
        self.to[to]
            .send(bytes)
            .map_err(|_| Error::Internal(format!("rank {to} has stopped")))
    }

    fn recv(&mut self, from: usize) -> Result<Vec<u8>> {
        self.from[from]
            .recv()
            .map_err(|_| Error::Internal(format!("rank {from} has stopped")))
    }

    fn broadcast(&mut self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        if self.rank == root {
            for r in (0..self.size()).filter(|&r| r != root) {
                self.send(r, bytes.clone())?;
            }
            Ok(bytes)
        } else {
            self.recv(root)
        }
    }
}

const STEP: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;
const END: u8 = 3;

/// How a distributed stretch of steps ended, as rank 0 tells every rank.
const OK: u8 = 0;
const DATA_ERROR: u8 = 1;
const OTHER_ERROR: u8 = 2;

fn message(tag: u8, body: impl FnOnce(&mut Writer) -> Result<()>) -> Result<Vec<u8>> {
    let mut w = Writer::default();
    w.u8(tag);
    body(&mut w)?;
    Ok(w.0)
}

fn text_message(tag: u8, text: &str) -> Result<Vec<u8>> {
    message(tag, |w| {
        w.bytes(text.as_bytes());
        Ok(())
    })
}

fn read_text(r: &mut Reader<'_>) -> Result<String> {
    Ok(String::from_utf8_lossy(r.bytes()?).into_owned())
}

/// Checks that the ranks agree on what they run: every rank sends its `value` (a
/// configuration hash, a version) to rank 0, which names the ranks that differ; every rank
/// then returns the same verdict.
pub fn check_same(t: &mut dyn Transport, what: &str, value: &str) -> Result<()> {
    let verdict = if t.rank() == 0 {
        let mut differ = Vec::new();
        for r in 1..t.size() {
            let theirs = t.recv(r)?;
            if theirs != value.as_bytes() {
                differ.push(format!("rank {r} has {}", String::from_utf8_lossy(&theirs)));
            }
        }
        let verdict = if differ.is_empty() {
            String::new()
        } else {
            format!(
                "the ranks do not run the same {what}: rank 0 has {value}, {}; start every \
                 rank with the same binary and arguments",
                differ.join(", ")
            )
        };
        t.broadcast(0, verdict.into_bytes())?
    } else {
        t.send(0, value.as_bytes().to_vec())?;
        t.broadcast(0, Vec::new())?
    };
    if verdict.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidConfig(
            String::from_utf8_lossy(&verdict).into_owned(),
        ))
    }
}

impl Trainer {
    /// Trains on `batches` with the modules of `stages` spread over the ranks of `t` (stage j
    /// on rank j), bit-identical to [`Trainer::train_batches`]. Every rank calls it with the
    /// same trainer configuration and stages; only rank 0 reads `batches` and calls `on_step`
    /// (for each completed step, in order; a break stops the feed). Every rank returns the
    /// same outcome: the steps completed and whether they were stopped, or an error
    /// ([`Error::Data`] when the source failed). Afterwards each rank holds only its own
    /// modules' updates: call [`Trainer::share_state`] before evaluating or saving.
    pub fn train_batches_on(
        &mut self,
        t: &mut dyn Transport,
        stages: &Pipeline,
        batches: &mut dyn Iterator<Item = Result<Batch>>,
        on_step: &mut dyn FnMut(&StepMetrics) -> ControlFlow<()>,
    ) -> Result<Drained> {
        self.check_stages(t, stages)?;
        if t.size() == 1 {
            return self.train_batches(batches, on_step);
        }
        let local = if t.rank() == 0 {
            self.lead(t, stages, batches, on_step)
        } else {
            self.follow(t, stages).map(|()| Drained {
                steps: 0,
                stopped: false,
            })
        };
        // Rank 0 tells everyone how the stretch ended.
        let outcome = if t.rank() == 0 {
            let bytes = message(0, |w| {
                match &local {
                    Ok(d) => {
                        w.u8(OK);
                        w.u64(d.steps as u64);
                        w.u8(u8::from(d.stopped));
                    }
                    Err(e) => {
                        w.u8(if matches!(e, Error::Data(_)) {
                            DATA_ERROR
                        } else {
                            OTHER_ERROR
                        });
                        w.bytes(e.to_string().as_bytes());
                    }
                }
                Ok(())
            })?;
            t.broadcast(0, bytes)?
        } else {
            t.broadcast(0, Vec::new())?
        };
        if t.rank() == 0 {
            return local;
        }
        local?;
        let mut r = Reader::new(&outcome);
        r.u8()?;
        match r.u8()? {
            OK => Ok(Drained {
                steps: r.usize()?,
                stopped: r.u8()? != 0,
            }),
            DATA_ERROR => Err(Error::Data(read_text(&mut r)?.into())),
            _ => Err(Error::Internal(format!(
                "rank 0 stopped: {}",
                read_text(&mut r)?
            ))),
        }
    }

    fn check_stages(&self, t: &dyn Transport, stages: &Pipeline) -> Result<()> {
        if stages.workers() != t.size() {
            return Err(Error::InvalidConfig(format!(
                "{} ranks run {} stages: give one stage per rank",
                t.size(),
                stages.workers()
            )));
        }
        if stages.stages().last().map(|r| r.end) != Some(self.net.num_modules()) {
            return Err(Error::InvalidConfig(format!(
                "the stages do not cover the network's K={} modules",
                self.net.num_modules()
            )));
        }
        if self.cfg.method.objective.is_end_to_end() && t.size() > 1 {
            return Err(Error::InvalidConfig(format!(
                "method {} trains end to end and cannot be split over ranks",
                self.cfg.method
            )));
        }
        // The same refusal as the thread pipeline's (a message backward).
        self.check_pipeline_direction(stages.workers())
    }

    /// Rank 0: feeds, runs stage 0, completes the steps.
    fn lead(
        &mut self,
        t: &mut dyn Transport,
        stages: &Pipeline,
        batches: &mut dyn Iterator<Item = Result<Batch>>,
        on_step: &mut dyn FnMut(&StepMetrics) -> ControlFlow<()>,
    ) -> Result<Drained> {
        let n = t.size();
        let depth = n + 1;
        let device = self.net.device()?;
        let mut in_flight: VecDeque<StepInput> = VecDeque::new();
        let mut drained = Drained {
            steps: 0,
            stopped: false,
        };
        let mut feeding = true;
        let mut error: Option<Error> = None;
        let mut last = Instant::now();
        loop {
            if feeding && in_flight.len() < depth {
                match batches.next() {
                    Some(Ok(batch)) => {
                        let sent = (|| {
                            let step = self.progress.step + in_flight.len();
                            let input = step_input(&self.net, &self.cfg, &batch, step)?;
                            let mut record = StepRecord::default();
                            let opts = &mut self.optimizers[stages.stages()[0].clone()];
                            let start = Carry::start(&input.batch);
                            let carry = stage_step(
                                &self.net,
                                &self.cfg,
                                opts,
                                0,
                                &input,
                                start,
                                &mut record,
                            )?;
                            let bytes = message(STEP, |w| write_step(w, &input, &carry, &record))?;
                            t.send(1, bytes)?;
                            Ok::<_, Error>(input)
                        })();
                        match sent {
                            Ok(input) => in_flight.push_back(input),
                            Err(e) => {
                                error.get_or_insert(e);
                                feeding = false;
                            }
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        error.get_or_insert(e);
                        feeding = false;
                    }
                    None => feeding = false,
                }
            }
            let Some(input) = in_flight.pop_front() else {
                break;
            };
            let bytes = t.recv(n - 1)?;
            let mut r = Reader::new(&bytes);
            match r.u8()? {
                DONE => {
                    let record = read_record(&mut r, &device)?;
                    let now = Instant::now();
                    let seconds = now.duration_since(last).as_secs_f64();
                    last = now;
                    if error.is_some() {
                        continue;
                    }
                    match self.progress.complete(&input, record, seconds) {
                        Ok(m) => {
                            drained.steps += 1;
                            if on_step(&m).is_break() && !drained.stopped {
                                drained.stopped = true;
                                feeding = false;
                            }
                        }
                        Err(e) => {
                            error = Some(e);
                            feeding = false;
                        }
                    }
                }
                FAILED => {
                    let text = read_text(&mut r)?;
                    error.get_or_insert(Error::Internal(text));
                    feeding = false;
                }
                tag => {
                    return Err(Error::Internal(format!(
                        "rank 0 got message {tag} from rank {}",
                        n - 1
                    )))
                }
            }
        }
        t.send(1, message(END, |_| Ok(()))?)?;
        match error {
            Some(e) => Err(e),
            None => Ok(drained),
        }
    }

    /// Ranks 1..N: run their stage on every step that arrives and pass it on, until the end.
    fn follow(&mut self, t: &mut dyn Transport, stages: &Pipeline) -> Result<()> {
        let (j, n) = (t.rank(), t.size());
        let next = if j + 1 == n { 0 } else { j + 1 };
        let device = self.net.device()?;
        let mut failed: Option<String> = None;
        loop {
            let bytes = t.recv(j - 1)?;
            let mut r = Reader::new(&bytes);
            match r.u8()? {
                STEP => {
                    if let Some(text) = &failed {
                        t.send(next, text_message(FAILED, text)?)?;
                        continue;
                    }
                    let step = (|| {
                        let (input, carry, mut record) = read_step(&mut r, &device)?;
                        r.end()?;
                        let range = stages.stages()[j].clone();
                        let first = range.start;
                        let opts = &mut self.optimizers[range];
                        let carry = stage_step(
                            &self.net,
                            &self.cfg,
                            opts,
                            first,
                            &input,
                            carry,
                            &mut record,
                        )?;
                        if j + 1 == n {
                            message(DONE, |w| write_record(w, &record))
                        } else {
                            message(STEP, |w| write_step(w, &input, &carry, &record))
                        }
                    })();
                    match step {
                        Ok(bytes) => t.send(next, bytes)?,
                        Err(e) => {
                            let text = format!("rank {j}: {e}");
                            t.send(next, text_message(FAILED, &text)?)?;
                            failed = Some(text);
                        }
                    }
                }
                FAILED => {
                    let text = read_text(&mut r)?;
                    t.send(next, text_message(FAILED, &text)?)?;
                }
                END => {
                    if j + 1 < n {
                        t.send(j + 1, bytes)?;
                    }
                    return Ok(());
                }
                tag => {
                    return Err(Error::Internal(format!(
                        "rank {j} got message {tag} from rank {}",
                        j - 1
                    )))
                }
            }
        }
    }

    /// Gives every rank the whole model: the owner of each module (the rank of its stage)
    /// sends its weights, buffers and optimizer state to all, and rank 0 its position and
    /// epoch sums. With one stage for everything, rank 0's state goes to every rank (after a
    /// resume that only rank 0 loaded).
    pub fn share_state(&mut self, t: &mut dyn Transport, stages: &Pipeline) -> Result<()> {
        let device = self.net.device()?;
        for (owner, range) in stages.stages().iter().enumerate() {
            for k in range.clone() {
                let params = self.net.module_params(k);
                let mine = if t.rank() == owner {
                    let mut w = Writer::default();
                    for p in &params {
                        w.tensor(p.var.as_tensor())?;
                    }
                    let state: BTreeMap<String, candle_core::Tensor> =
                        self.optimizers[k].state()?.into_iter().collect();
                    w.u64(state.len() as u64);
                    for (key, v) in &state {
                        w.bytes(key.as_bytes());
                        w.tensor(v)?;
                    }
                    w.0
                } else {
                    Vec::new()
                };
                let bytes = t.broadcast(owner, mine)?;
                if t.rank() == owner {
                    continue;
                }
                let mut r = Reader::new(&bytes);
                for p in &params {
                    let v = r.tensor(&device)?;
                    p.var.set(&v.reshape(p.var.dims())?)?;
                }
                let mut state = HashMap::new();
                for _ in 0..r.usize()? {
                    let key = read_text(&mut r)?;
                    state.insert(key, r.tensor(&device)?);
                }
                r.end()?;
                self.optimizers[k].load_state(&state)?;
            }
        }
        let state = if t.rank() == 0 {
            serde_json::to_vec(&self.state()?)
                .map_err(|e| Error::Internal(format!("the trainer state: {e}")))?
        } else {
            Vec::new()
        };
        let bytes = t.broadcast(0, state)?;
        if t.rank() != 0 {
            let state = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Internal(format!("rank 0's trainer state: {e}")))?;
            self.load_state(state)?;
        }
        Ok(())
    }
}
