//! The evaluation of a distributed run, pipelined through the ranks like the training steps'
//! forward passes, so that no rank needs modules it does not own (`super::ownership`).
//!
//! Rank 0 reads the test batches. Batch i goes to replica i mod R: rank 0 runs its stage on it
//! (replica 0) or sends it to the replica's first stage; each stage runs its modules in
//! evaluation mode ([`LocalNetwork::forward_modules`], the units of
//! [`LocalNetwork::forward`]) and sends h, with the labels, to the next; the last stage turns
//! the logits into the batch's sums and sends them to rank 0, which adds them in batch order.
//! The numbers are the one-process evaluation's bit for bit: the same operations on the same
//! bits, summed in the same order. Rank 0 keeps at most N + 1 batches in flight.
//!
//! [`LocalNetwork::forward_modules`]: crate::network::LocalNetwork::forward_modules
//! [`LocalNetwork::forward`]: crate::network::LocalNetwork::forward

use std::collections::VecDeque;

use candle_core::Tensor;

use super::distributed::Transport;
use super::replicas::Layout;
use super::wire::{Reader, Writer};
use super::{batch_eval, BatchEval, Trainer};
use crate::ctx::Ctx;
use crate::events::EvalMetrics;
use crate::{Error, Result};

const EVAL: u8 = 30;
const EVAL_DONE: u8 = 31;
const EVAL_FAILED: u8 = 32;
const EVAL_END: u8 = 33;

/// How an evaluation ended, as rank 0 tells every rank.
const DONE: u8 = 0;
const DATA_ERROR: u8 = 1;
const FAILED: u8 = 2;

/// Rank 0's verdict as bytes: the metrics travel as their bits (a NaN loss included).
fn write_verdict(local: &Result<Vec<BatchEval>>, with_top5: bool) -> Vec<u8> {
    let mut w = Writer::default();
    match local {
        Ok(parts) => {
            let m = BatchEval::metrics(parts, with_top5);
            w.u8(DONE);
            w.f64(m.loss);
            w.f64(m.accuracy);
            w.u8(u8::from(m.top5.is_some()));
            w.f64(m.top5.unwrap_or(0.0));
            w.u64(m.samples as u64);
        }
        Err(e) => {
            w.u8(if matches!(e, Error::Data(_)) {
                DATA_ERROR
            } else {
                FAILED
            });
            w.bytes(e.to_string().as_bytes());
        }
    }
    w.0
}

fn read_verdict(bytes: &[u8]) -> Result<EvalMetrics> {
    let mut r = Reader::new(bytes);
    match r.u8()? {
        DONE => {
            let loss = r.f64()?;
            let accuracy = r.f64()?;
            let has_top5 = r.u8()? != 0;
            let top5 = r.f64()?;
            let samples = r.usize()?;
            r.end()?;
            Ok(EvalMetrics {
                loss,
                accuracy,
                top5: has_top5.then_some(top5),
                samples,
            })
        }
        DATA_ERROR => Err(Error::Data(text(&mut r)?.into())),
        _ => Err(Error::Internal(format!(
            "rank 0 stopped: {}",
            text(&mut r)?
        ))),
    }
}

fn eval_message(i: usize, h: &Tensor, y: &Tensor) -> Result<Vec<u8>> {
    let mut w = Writer::default();
    w.u8(EVAL);
    w.u64(i as u64);
    w.tensor(h)?;
    w.tensor(y)?;
    Ok(w.0)
}

fn failed_message(i: usize, why: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(EVAL_FAILED);
    w.u64(i as u64);
    w.bytes(why.as_bytes());
    w.0
}

fn text(r: &mut Reader<'_>) -> Result<String> {
    Ok(String::from_utf8_lossy(r.bytes()?).into_owned())
}

impl Trainer {
    /// Evaluates the network's classifier (evaluation mode) over `batches`, with the modules
    /// spread over the ranks of `t` as `layout` says: each rank runs only its own stage (see
    /// the module's documentation). Only rank 0 reads `batches`; every rank calls it and gets
    /// the same metrics, [`Trainer::evaluate`]'s bit for bit, or the same error
    /// ([`Error::Data`] when a batch could not be read).
    pub fn evaluate_on(
        &self,
        t: &mut dyn Transport,
        layout: &Layout,
        batches: &mut dyn Iterator<Item = Result<(Tensor, Tensor)>>,
    ) -> Result<EvalMetrics> {
        self.check_layout(t, layout)?;
        let with_top5 = self.net.num_classes() > 5;
        let rank = t.rank();
        let local = if rank == 0 {
            self.lead_eval(t, layout, batches)
        } else {
            self.follow_eval(t, layout, rank).map(|()| Vec::new())
        };
        let verdict = if rank == 0 {
            t.broadcast(0, write_verdict(&local, with_top5))?
        } else {
            t.broadcast(0, Vec::new())?
        };
        if rank == 0 {
            // Rank 0's own numbers (the verdict carries the same).
            return local.map(|parts| BatchEval::metrics(&parts, with_top5));
        }
        local?;
        read_verdict(&verdict)
    }

    /// Rank 0: feeds the batches to every replica, runs its own stage, collects the sums in
    /// batch order.
    fn lead_eval(
        &self,
        t: &mut dyn Transport,
        layout: &Layout,
        batches: &mut dyn Iterator<Item = Result<(Tensor, Tensor)>>,
    ) -> Result<Vec<BatchEval>> {
        let (p, replicas) = (layout.stages().workers(), layout.replicas());
        let mine = layout.stages().stages()[0].clone();
        let depth = layout.size() + 1;
        // Each batch in flight: its replica, and its sums when rank 0 computed them (or why
        // it failed).
        type Local = Option<std::result::Result<BatchEval, String>>;
        let mut in_flight: VecDeque<(usize, Local)> = VecDeque::new();
        let mut parts = Vec::new();
        let mut error: Option<Error> = None;
        let mut feeding = true;
        let mut next = 0usize;
        loop {
            if feeding && in_flight.len() < depth {
                match batches.next() {
                    Some(Ok((x, y))) => {
                        let (i, r) = (next, next % replicas);
                        next += 1;
                        if r != 0 {
                            t.send(layout.rank(r, 0), eval_message(i, &x, &y)?)?;
                            in_flight.push_back((r, None));
                            continue;
                        }
                        let out =
                            self.net
                                .forward_modules(mine.clone(), &x.detach(), &mut Ctx::eval());
                        let local = match out {
                            Err(e) => Some(Err(format!("rank 0: {e}"))),
                            Ok(logits) if p == 1 => Some(
                                batch_eval(&self.net, &logits, &y)
                                    .map_err(|e| format!("rank 0: {e}")),
                            ),
                            Ok(h) => {
                                t.send(1, eval_message(i, &h.detach(), &y)?)?;
                                None
                            }
                        };
                        if matches!(local, Some(Err(_))) {
                            feeding = false;
                        }
                        in_flight.push_back((r, local));
                        continue;
                    }
                    Some(Err(e)) => {
                        error.get_or_insert(e);
                        feeding = false;
                    }
                    None => feeding = false,
                }
            }
            let Some((r, local)) = in_flight.pop_front() else {
                break;
            };
            let got = match local {
                Some(l) => l,
                None => {
                    let from = layout.rank(r, p - 1);
                    let bytes = t.recv(from)?;
                    let mut rd = Reader::new(&bytes);
                    match rd.u8()? {
                        EVAL_DONE => {
                            rd.u64()?;
                            let part = BatchEval {
                                loss_sum: rd.f64()?,
                                correct: rd.usize()?,
                                top5: rd.usize()?,
                                samples: rd.usize()?,
                            };
                            rd.end()?;
                            Ok(part)
                        }
                        EVAL_FAILED => {
                            rd.u64()?;
                            Err(text(&mut rd)?)
                        }
                        tag => {
                            return Err(Error::Internal(format!(
                                "rank 0 got message {tag} from rank {from} in the evaluation"
                            )))
                        }
                    }
                }
            };
            match got {
                Ok(part) => parts.push(part),
                Err(why) => {
                    error.get_or_insert(Error::Internal(why));
                    feeding = false;
                }
            }
        }
        let mut end = Writer::default();
        end.u8(EVAL_END);
        if p > 1 {
            t.send(1, end.0.clone())?;
        }
        for r in 1..replicas {
            t.send(layout.rank(r, 0), end.0.clone())?;
        }
        match error {
            Some(e) => Err(e),
            None => Ok(parts),
        }
    }

    /// Every rank but 0: runs its stage on every batch that arrives and passes it on, until
    /// the end.
    fn follow_eval(&self, t: &mut dyn Transport, layout: &Layout, rank: usize) -> Result<()> {
        let (replica, j) = layout.place(rank);
        let p = layout.stages().workers();
        let mine = layout.stages().stages()[j].clone();
        let from = if j == 0 {
            0
        } else {
            layout.rank(replica, j - 1)
        };
        let last = j + 1 == p;
        let next = if last { 0 } else { layout.rank(replica, j + 1) };
        let device = self.net.device()?;
        // Set when a batch failed on this rank: later ones are passed on as failed.
        let mut failed: Option<String> = None;
        loop {
            let bytes = t.recv(from)?;
            let mut r = Reader::new(&bytes);
            let msg = match r.u8()? {
                EVAL_END => {
                    if !last {
                        t.send(next, bytes)?;
                    }
                    return Ok(());
                }
                EVAL_FAILED => {
                    if !last {
                        t.send(next, bytes)?;
                        continue;
                    }
                    bytes
                }
                EVAL => {
                    let i = r.usize()?;
                    let h = r.tensor(&device)?;
                    let y = r.tensor(&device)?;
                    r.end()?;
                    let out = match &failed {
                        Some(why) => Err(why.clone()),
                        None => self
                            .net
                            .forward_modules(mine.clone(), &h, &mut Ctx::eval())
                            .and_then(|out| {
                                if last {
                                    let part = batch_eval(&self.net, &out, &y)?;
                                    let mut w = Writer::default();
                                    w.u8(EVAL_DONE);
                                    w.u64(i as u64);
                                    w.f64(part.loss_sum);
                                    w.u64(part.correct as u64);
                                    w.u64(part.top5 as u64);
                                    w.u64(part.samples as u64);
                                    Ok(w.0)
                                } else {
                                    eval_message(i, &out.detach(), &y)
                                }
                            })
                            .map_err(|e| format!("rank {rank}: {e}")),
                    };
                    match out {
                        Ok(m) => m,
                        Err(why) => {
                            failed.get_or_insert(why.clone());
                            failed_message(i, &why)
                        }
                    }
                }
                tag => {
                    return Err(Error::Internal(format!(
                        "rank {rank} got message {tag} from rank {from} in the evaluation"
                    )))
                }
            };
            t.send(next, msg)?;
        }
    }
}
