//! Module-parallel training across processes (MPI ranks): the pipeline of `super::pipeline`
//! with its channels replaced by messages between ranks, optionally in several data-parallel
//! copies (docs/parallel.md, "Across processes" and "Replicas").
//!
//! Rank j of a pipeline owns the modules of stage j. Rank 0 reads the data, draws each step's
//! input (mixup, lr, λ) once, runs its modules and sends the step (input, carry, record) to
//! rank 1; rank j runs its modules and sends it on; the last rank sends the finished record
//! back to rank 0, which completes the steps in order, keeps at most N + 1 in flight and
//! decides when to stop. Every rank runs [`super::module::module_step`] on exactly the inputs
//! and seeds of the sequential schedule, so the result is bit-identical to it. A rank needs
//! only its own stage's modules: [`Trainer::distribute`] (`super::ownership`) frees the
//! others, [`Trainer::gather`] brings them to rank 0 for saving, [`Trainer::evaluate_on`]
//! (`super::eval_on_ranks`) pipelines the evaluation, and after a stretch of steps
//! [`Trainer::share_state`] gives every rank rank 0's progress.
//!
//! With R replicas ([`Layout`]), rank 0 cuts each step's batch into R shards and sends shard
//! r to the first stage of replica r; the copies of a stage average their gradients
//! (`super::replicas`), and rank 0 combines the R records of a step.
//!
//! Pipeline messages flow forward along each replica's stages and from its last stage back
//! to rank 0 only, group messages between a stage's copies and its first copy, and a
//! [`Transport::send`] never waits for its receiver, so no cycle of ranks can block.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use super::module::{stage_step, Carry, StepInput, StepRecord};
use super::pipeline::Drained;
pub use super::replicas::Layout;
use super::replicas::{combine, is_group_message, replicated_stage_step, Group};
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

/// Why `step` failed, passed on in its place.
fn failed_message(step: usize, why: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(FAILED);
    w.u64(step as u64);
    w.bytes(why.as_bytes());
    w.0
}

fn read_text(r: &mut Reader<'_>) -> Result<String> {
    Ok(String::from_utf8_lossy(r.bytes()?).into_owned())
}

/// A transport's messages sorted by purpose: the pipeline's (steps, records, the end) and a
/// replica group's (gradients). Both kinds can pass between the same two ranks (a stage's
/// copy that is also its replica's last stage talks to rank 0 both ways), so each kind is
/// received on its own, and a message of the other kind waits in a stash meanwhile.
pub(crate) struct Mailbox<'a> {
    t: &'a mut dyn Transport,
    stash: HashMap<(usize, bool), VecDeque<Vec<u8>>>,
}

impl<'a> Mailbox<'a> {
    pub(crate) fn new(t: &'a mut dyn Transport) -> Self {
        Self {
            t,
            stash: HashMap::new(),
        }
    }

    pub(crate) fn send(&mut self, to: usize, bytes: Vec<u8>) -> Result<()> {
        self.t.send(to, bytes)
    }

    /// The next pipeline message from `from`.
    pub(crate) fn recv_pipe(&mut self, from: usize) -> Result<Vec<u8>> {
        self.recv(from, false)
    }

    /// The next group message from `from`.
    pub(crate) fn recv_sync(&mut self, from: usize) -> Result<Vec<u8>> {
        self.recv(from, true)
    }

    fn recv(&mut self, from: usize, group: bool) -> Result<Vec<u8>> {
        if let Some(m) = self
            .stash
            .get_mut(&(from, group))
            .and_then(VecDeque::pop_front)
        {
            return Ok(m);
        }
        loop {
            let m = self.t.recv(from)?;
            let kind = is_group_message(&m);
            if kind == group {
                return Ok(m);
            }
            self.stash.entry((from, kind)).or_default().push_back(m);
        }
    }
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
    /// Trains on `batches` with the modules spread over the ranks of `t` as `layout` says,
    /// stage j of replica r on rank `layout.rank(r, j)`. With one replica this is
    /// bit-identical to [`Trainer::train_batches`]; with R, to it at the same batch size up to
    /// the order of the sums that average the R shards' gradients (and to batch-norm
    /// statistics, which each copy takes over its own shard). Every rank calls it with the
    /// same trainer configuration and layout; only rank 0 reads `batches` and calls `on_step`
    /// (for each completed step, in order; a break stops the feed). Every rank returns the
    /// same outcome: the steps completed and whether they were stopped, or an error
    /// ([`Error::Data`] when the source failed). Afterwards each rank holds only its own
    /// modules' updates, and only rank 0 the progress: call [`Trainer::share_state`], then
    /// [`Trainer::evaluate_on`] or [`Trainer::gather`] to evaluate or save. A rank needs only
    /// its own modules ([`Trainer::distribute`]).
    pub fn train_batches_on(
        &mut self,
        t: &mut dyn Transport,
        layout: &Layout,
        batches: &mut dyn Iterator<Item = Result<Batch>>,
        on_step: &mut dyn FnMut(&StepMetrics) -> ControlFlow<()>,
    ) -> Result<Drained> {
        self.check_layout(t, layout)?;
        if t.size() == 1 {
            return self.train_batches(batches, on_step);
        }
        let rank = t.rank();
        let local = {
            let mut mail = Mailbox::new(t);
            if rank == 0 {
                self.lead(&mut mail, layout, batches, on_step)
            } else {
                self.follow(&mut mail, layout, rank).map(|()| Drained {
                    steps: 0,
                    stopped: false,
                })
            }
        };
        // Rank 0 tells everyone how the stretch ended.
        let outcome = if rank == 0 {
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
        if rank == 0 {
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

    pub(super) fn check_layout(&self, t: &dyn Transport, layout: &Layout) -> Result<()> {
        let stages = layout.stages();
        if layout.size() != t.size() {
            return Err(Error::InvalidConfig(format!(
                "{} ranks run {} stages in {} replicas ({} ranks): give one rank to each \
                 stage of each replica",
                t.size(),
                stages.workers(),
                layout.replicas(),
                layout.size()
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
        // The same refusal as the thread pipeline's (a message backward); replicas run the
        // forward schedule too.
        self.check_pipeline_direction(t.size())
    }

    /// This rank's modules of `step`, on its shard: plain when the stage has one copy,
    /// averaged with the other copies otherwise. `work` is the step's input and carry, or
    /// why it failed upstream (the copies still take part in its exchanges). `Err` inside:
    /// why the step failed.
    #[allow(clippy::too_many_arguments)]
    fn run_stage(
        &mut self,
        mail: &mut Mailbox<'_>,
        layout: &Layout,
        rank: usize,
        step: usize,
        work: std::result::Result<(&StepInput, Carry), String>,
        record: &mut StepRecord,
    ) -> Result<std::result::Result<Carry, String>> {
        let (replica, stage) = layout.place(rank);
        let range = layout.stages().stages()[stage].clone();
        let first = range.start;
        let opts = &mut self.optimizers[range];
        if layout.replicas() == 1 {
            return Ok(match work {
                Ok((input, c)) => stage_step(&self.net, &self.cfg, opts, first, input, c, record)
                    .map_err(|e| format!("rank {rank}: {e}")),
                Err(why) => Err(why),
            });
        }
        let group = Group {
            ranks: layout.group(stage),
            me: replica,
        };
        replicated_stage_step(
            &self.net, &self.cfg, opts, first, step, work, record, mail, &group,
        )
    }

    /// Rank 0: feeds every replica's first stage, runs its own stage, completes the steps.
    fn lead(
        &mut self,
        mail: &mut Mailbox<'_>,
        layout: &Layout,
        batches: &mut dyn Iterator<Item = Result<Batch>>,
        on_step: &mut dyn FnMut(&StepMetrics) -> ControlFlow<()>,
    ) -> Result<Drained> {
        let (p, replicas) = (layout.stages().workers(), layout.replicas());
        let depth = layout.size() + 1;
        let device = self.net.device()?;
        // Each step in flight: its input, its shard sizes, and replica 0's record when rank 0
        // is also its last stage (or why it failed).
        type Local = Option<std::result::Result<StepRecord, String>>;
        let mut in_flight: VecDeque<(StepInput, Vec<usize>, Local)> = VecDeque::new();
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
                        let step = self.progress.step + in_flight.len();
                        let fed = (|| {
                            let input = step_input(&self.net, &self.cfg, &batch, step)?;
                            let shards = if replicas == 1 {
                                vec![input.clone()]
                            } else {
                                input
                                    .batch
                                    .shards(replicas)?
                                    .into_iter()
                                    .enumerate()
                                    .map(|(r, batch)| StepInput {
                                        batch,
                                        replica: r,
                                        ..input.clone()
                                    })
                                    .collect()
                            };
                            let sizes = shards
                                .iter()
                                .map(|s| s.batch.len())
                                .collect::<Result<Vec<_>>>()?;
                            Ok::<_, Error>((input, shards, sizes))
                        })();
                        let (input, shards, sizes) = match fed {
                            Ok(f) => f,
                            Err(e) => {
                                error.get_or_insert(e);
                                feeding = false;
                                continue;
                            }
                        };
                        // The other replicas first, so that they work while rank 0 does.
                        for (r, shard) in shards.iter().enumerate().skip(1) {
                            let start = Carry::start(&shard.batch);
                            let bytes = message(STEP, |w| {
                                write_step(w, shard, &start, &StepRecord::default())
                            })?;
                            mail.send(layout.rank(r, 0), bytes)?;
                        }
                        let mine = &shards[0];
                        let mut record = StepRecord::default();
                        let start = Ok((mine, Carry::start(&mine.batch)));
                        let out = self.run_stage(mail, layout, 0, step, start, &mut record)?;
                        if let Err(why) = &out {
                            // The other copies of stage 0 failed with it: feed no more.
                            error.get_or_insert(Error::Internal(why.clone()));
                            feeding = false;
                        }
                        let local = if p == 1 {
                            Some(out.map(|_| record))
                        } else {
                            let bytes = match &out {
                                Ok(carry) => {
                                    message(STEP, |w| write_step(w, mine, carry, &record))?
                                }
                                Err(why) => failed_message(step, why),
                            };
                            mail.send(1, bytes)?;
                            None
                        };
                        in_flight.push_back((input, sizes, local));
                        continue;
                    }
                    Some(Err(e)) => {
                        error.get_or_insert(e);
                        feeding = false;
                    }
                    None => feeding = false,
                }
            }
            let Some((input, sizes, local)) = in_flight.pop_front() else {
                break;
            };
            // Every replica's record of the step, in replica order.
            let mut parts = Vec::with_capacity(replicas);
            let mut failed: Option<String> = None;
            for (r, &n) in sizes.iter().enumerate() {
                let got = match (r, &local) {
                    (0, Some(l)) => l.clone(),
                    _ => {
                        let from = layout.rank(r, p - 1);
                        let bytes = mail.recv_pipe(from)?;
                        let mut rd = Reader::new(&bytes);
                        match rd.u8()? {
                            DONE => Ok(read_record(&mut rd, &device)?),
                            FAILED => {
                                rd.u64()?;
                                Err(read_text(&mut rd)?)
                            }
                            tag => {
                                return Err(Error::Internal(format!(
                                    "rank 0 got message {tag} from rank {from}"
                                )))
                            }
                        }
                    }
                };
                match got {
                    Ok(rec) => parts.push((n, rec)),
                    Err(why) => {
                        failed.get_or_insert(why);
                    }
                }
            }
            let now = Instant::now();
            let seconds = now.duration_since(last).as_secs_f64();
            last = now;
            if let Some(why) = failed {
                error.get_or_insert(Error::Internal(why));
                feeding = false;
                continue;
            }
            if error.is_some() {
                continue;
            }
            let record = if replicas == 1 {
                parts.pop().map(|(_, r)| r).unwrap_or_default()
            } else {
                combine(parts)?
            };
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
        let end = message(END, |_| Ok(()))?;
        if p > 1 {
            mail.send(1, end.clone())?;
        }
        for r in 1..replicas {
            mail.send(layout.rank(r, 0), end.clone())?;
        }
        match error {
            Some(e) => Err(e),
            None => Ok(drained),
        }
    }

    /// Every rank but 0: runs its stage on every step that arrives and passes it on, until
    /// the end.
    fn follow(&mut self, mail: &mut Mailbox<'_>, layout: &Layout, rank: usize) -> Result<()> {
        let (replica, j) = layout.place(rank);
        let p = layout.stages().workers();
        let from = if j == 0 {
            0
        } else {
            layout.rank(replica, j - 1)
        };
        let next = if j + 1 == p {
            0
        } else {
            layout.rank(replica, j + 1)
        };
        let device = self.net.device()?;
        // Set when a step failed on this rank: later steps are passed on as failed without
        // running (copies of a stage still take part in their exchanges).
        let mut failed: Option<String> = None;
        loop {
            let bytes = mail.recv_pipe(from)?;
            let mut r = Reader::new(&bytes);
            let tag = r.u8()?;
            if tag == END {
                if j + 1 < p {
                    mail.send(next, bytes)?;
                }
                return Ok(());
            }
            if tag != STEP && tag != FAILED {
                return Err(Error::Internal(format!(
                    "rank {rank} got message {tag} from rank {from}"
                )));
            }
            // Both kinds begin with the step.
            let step = Reader::new(&bytes[1..]).usize()?;
            let mut record = StepRecord::default();
            let input = match (tag, &failed) {
                (STEP, None) => {
                    let (input, carry, rec) = read_step(&mut r, &device)?;
                    r.end()?;
                    record = rec;
                    Ok((input, carry))
                }
                (STEP, Some(why)) => Err(why.clone()),
                _ => {
                    r.u64()?;
                    Err(read_text(&mut r)?)
                }
            };
            let out = match input {
                Ok((input, carry)) => self
                    .run_stage(mail, layout, rank, step, Ok((&input, carry)), &mut record)?
                    .map(|carry| (input, carry)),
                Err(why) if layout.replicas() > 1 => {
                    // The other copies of this stage may have the step: take part in its
                    // exchanges, with the reason.
                    let out =
                        self.run_stage(mail, layout, rank, step, Err(why.clone()), &mut record)?;
                    Err(out.err().unwrap_or(why))
                }
                Err(why) => Err(why),
            };
            let msg = match out {
                Ok(_) if j + 1 == p => message(DONE, |w| write_record(w, &record))?,
                Ok((input, carry)) => message(STEP, |w| write_step(w, &input, &carry, &record))?,
                Err(why) => {
                    failed.get_or_insert(why.clone());
                    failed_message(step, &why)
                }
            };
            mail.send(next, msg)?;
        }
    }

    /// Gives every rank rank 0's progress (position and epoch sums), which only rank 0 keeps
    /// while the steps run, so that every rank knows where the run stands. Weights, buffers
    /// and optimizer state stay with the modules' owners: a rank holds only its own
    /// ([`Trainer::distribute`]), and [`Trainer::gather`] copies them to rank 0 for saving.
    pub fn share_state(&mut self, t: &mut dyn Transport, layout: &Layout) -> Result<()> {
        self.check_layout(t, layout)?;
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
