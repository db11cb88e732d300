//! Data-parallel replicas: R copies of a stage's modules, each on its own rank and its own
//! shard of the batch, that average their gradients before every update (docs/parallel.md,
//! "Replicas").
//!
//! The ranks that hold copies of one stage form a group; its first rank (replica 0) forms the
//! average, weighting each copy's gradients by its share of the batch and adding them in
//! replica order, and sends it back. The result is the same bits however the messages arrive.
//! A module's gradients leave as soon as they are computed, and its update waits until the
//! next module's pass is done, so the transfer overlaps that pass (the next module does not
//! read the weights it updates: it receives its input detached). The module's buffers
//! (batch-norm running statistics) travel with its gradients and are averaged the same way,
//! so every copy holds the same weights, optimizer state and buffers after every step, and a
//! checkpoint taken from any copy continues the run exactly.
//!
//! Every rank of a group sends exactly one message per module and step, its gradients or why
//! it has none, and the first rank answers each with the average or the reason there is none.
//! A failure on any rank of the group so fails the step on all of them, at the same module,
//! and no rank waits for a message that will not come.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::distributed::Mailbox;
use super::module::{module_grads, update, BoundaryRecord, Carry, StepInput, StepRecord};
use super::pipeline::Pipeline;
use super::wire::{Reader, Writer};
use super::TrainerConfig;
use crate::network::LocalNetwork;
use crate::nn::ParamKind;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// How a distributed run's ranks divide the work: `replicas` copies of a pipeline of
/// `stages`. Rank `replica · P + stage` (P the number of stages) runs stage `stage` on shard
/// `replica` of every batch, so replica 0 is ranks 0..P, the pipeline of an unreplicated run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    stages: Pipeline,
    replicas: usize,
}

impl Layout {
    /// `replicas` copies of the pipeline `stages`.
    pub fn new(stages: Pipeline, replicas: usize) -> Result<Self> {
        if replicas == 0 {
            return Err(Error::InvalidConfig(
                "a layout needs at least one replica".into(),
            ));
        }
        Ok(Self { stages, replicas })
    }

    /// One copy of the pipeline `stages` (module parallelism only).
    pub fn pipeline(stages: Pipeline) -> Self {
        Self {
            stages,
            replicas: 1,
        }
    }

    /// The stages each replica is cut into.
    pub fn stages(&self) -> &Pipeline {
        &self.stages
    }

    /// The copies of the modules.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The ranks the layout needs: replicas × stages.
    pub fn size(&self) -> usize {
        self.replicas * self.stages.workers()
    }

    /// The rank that runs `stage` of `replica`.
    pub fn rank(&self, replica: usize, stage: usize) -> usize {
        replica * self.stages.workers() + stage
    }

    /// `(replica, stage)` of `rank`.
    pub fn place(&self, rank: usize) -> (usize, usize) {
        let p = self.stages.workers();
        (rank / p, rank % p)
    }

    /// The ranks holding copies of `stage`, replica 0 first.
    pub(crate) fn group(&self, stage: usize) -> Vec<usize> {
        (0..self.replicas).map(|r| self.rank(r, stage)).collect()
    }
}

const GRADS: u8 = 4;
const NO_GRADS: u8 = 5;

/// Whether `bytes` is a group's message (gradients), not the pipeline's.
pub(crate) fn is_group_message(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(&GRADS) | Some(&NO_GRADS))
}

/// What a copy contributes to the exchange of one module, or what the first copy answers:
/// its examples in the step, its gradients and its buffers after the step.
struct Share {
    n: usize,
    grads: Vec<Tensor>,
    buffers: Vec<Tensor>,
}

fn share_message(step: usize, k: usize, share: &Share) -> Result<Vec<u8>> {
    let mut w = Writer::default();
    w.u8(GRADS);
    w.u64(step as u64);
    w.u64(k as u64);
    w.u64(share.n as u64);
    for list in [&share.grads, &share.buffers] {
        w.u64(list.len() as u64);
        for t in list {
            w.tensor(t)?;
        }
    }
    Ok(w.0)
}

fn no_grads_message(step: usize, k: usize, why: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(NO_GRADS);
    w.u64(step as u64);
    w.u64(k as u64);
    w.bytes(why.as_bytes());
    w.0
}

/// A group message about module `k` of `step`: a share, or why there is none.
fn read_share(
    bytes: &[u8],
    step: usize,
    k: usize,
    from: usize,
    device: &candle_core::Device,
) -> Result<std::result::Result<Share, String>> {
    let mut r = Reader::new(bytes);
    let tag = r.u8()?;
    let (s, m) = (r.usize()?, r.usize()?);
    if (s, m) != (step, k) {
        return Err(Error::Internal(format!(
            "rank {from} sent gradients of step {s}, module {m} where step {step}, module {k} \
             was due"
        )));
    }
    let out = match tag {
        GRADS => {
            let n = r.usize()?;
            let mut lists = [Vec::new(), Vec::new()];
            for list in &mut lists {
                let len = r.usize()?;
                *list = (0..len)
                    .map(|_| r.tensor(device))
                    .collect::<Result<Vec<_>>>()?;
            }
            let [grads, buffers] = lists;
            Ok(Share { n, grads, buffers })
        }
        NO_GRADS => Err(String::from_utf8_lossy(r.bytes()?).into_owned()),
        t => {
            return Err(Error::Internal(format!(
                "rank {from} sent message {t} where gradients were due"
            )))
        }
    };
    r.end()?;
    Ok(out)
}

/// Σ_r w_r · t_r over the copies with examples, in replica order, w_r = n_r / Σ n: one tensor
/// per copy, `(n_r, t_r)`.
fn weighted_sum(copies: &[(usize, &Tensor)]) -> Result<Tensor> {
    let total: usize = copies.iter().map(|(n, _)| n).sum();
    let mut sum: Option<Tensor> = None;
    for (n, t) in copies.iter().filter(|(n, _)| *n > 0) {
        let scaled = t.affine(*n as f64 / total as f64, 0.0)?;
        sum = Some(match sum {
            None => scaled,
            Some(acc) => (acc + scaled)?,
        });
    }
    sum.ok_or_else(|| Error::Internal("no replica had examples".into()))
}

/// The `i`-th tensor `pick` chooses of every share with examples (an empty shard sends no
/// gradients), with the share's examples; the first copy's comes first.
fn column(
    parts: &[Share],
    pick: fn(&Share) -> &Vec<Tensor>,
    i: usize,
) -> Result<Vec<(usize, &Tensor)>> {
    parts
        .iter()
        .filter(|p| p.n > 0)
        .map(|p| {
            let t = pick(p).get(i).ok_or_else(|| {
                Error::Internal("replicas sent different numbers of tensors for one module".into())
            })?;
            Ok((p.n, t))
        })
        .collect()
}

/// The weighted average ([`weighted_sum`]) of every tensor `pick` chooses of the shares.
fn weighted_average(parts: &[Share], pick: fn(&Share) -> &Vec<Tensor>) -> Result<Vec<Tensor>> {
    let len = pick(&parts[0]).len();
    if parts.iter().any(|p| p.n > 0 && pick(p).len() != len) {
        return Err(Error::Internal(
            "replicas sent different numbers of tensors for one module".into(),
        ));
    }
    (0..len)
        .map(|i| weighted_sum(&column(parts, pick, i)?))
        .collect()
}

/// The buffers every copy takes after a step: where the copies with examples differ
/// (running statistics), their weighted average; otherwise (a step count, a frozen head, a
/// float all agree on) the first copy's, bit for bit. Each with whether it was averaged.
fn merged_buffers(parts: &[Share]) -> Result<Vec<(Tensor, bool)>> {
    let pick: fn(&Share) -> &Vec<Tensor> = |p| &p.buffers;
    (0..parts[0].buffers.len())
        .map(|i| {
            let copies = column(parts, pick, i)?;
            let Some(((_, first), rest)) = copies.split_first() else {
                return Err(Error::Internal("no replica had examples".into()));
            };
            let mut agree = true;
            for (_, other) in rest {
                if first.elem_count() > 0 {
                    let eq = first.eq(*other)?.flatten_all()?.min(0)?.to_scalar::<u8>()?;
                    agree &= eq == 1;
                }
            }
            Ok(if agree || !first.dtype().is_float() {
                ((*first).clone(), false)
            } else {
                (weighted_sum(&copies)?, true)
            })
        })
        .collect()
}

/// Module `k`'s buffers (batch-norm running statistics and the like).
fn buffers(net: &LocalNetwork, k: usize) -> Vec<crate::nn::Param> {
    net.module_params(k)
        .into_iter()
        .filter(|p| p.kind == ParamKind::Buffer)
        .collect()
}

/// This rank's place in its group: `ranks[0]` averages, `me` indexes `ranks`.
pub(crate) struct Group {
    pub ranks: Vec<usize>,
    pub me: usize,
}

impl Group {
    fn leads(&self) -> bool {
        self.me == 0
    }
}

/// The modules `first..first + optimizers.len()` of `step` on this replica's shard, with
/// every update on the group's average (module order, the pass of module k+1 overlapping the
/// exchange for module k). `work` is the step's input and carry, or why the step failed
/// upstream: the rank then takes part in the exchanges with the reason, so that the group
/// fails together. Returns the carry for the next stage, or why the step failed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn replicated_stage_step(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    optimizers: &mut [Box<dyn Optimizer>],
    first: usize,
    step: usize,
    work: std::result::Result<(&StepInput, Carry), String>,
    record: &mut StepRecord,
    mail: &mut Mailbox<'_>,
    group: &Group,
) -> Result<std::result::Result<Carry, String>> {
    let device = net.device()?;
    let rank = group.ranks[group.me];
    let (input, mut carry, mut failed) = match work {
        Ok((i, c)) => (Some(i), Some(c), None),
        Err(why) => (None, None, Some(why)),
    };
    let n = match input {
        Some(i) => i.batch.len()?,
        None => 0,
    };
    let ex = Exchange {
        net,
        cfg,
        step,
        lr: input.map_or(0.0, |i| i.lr),
        n,
        group,
        device: &device,
    };
    // Module k's own gradients (None once the step failed), waiting for the exchange.
    let mut pending: Option<(usize, Option<Vec<Tensor>>)> = None;
    for i in 0..optimizers.len() {
        let k = first + i;
        let mine = match (failed.is_none(), input, carry.take()) {
            (true, Some(_), Some(c)) if n == 0 => {
                // An empty shard (a last batch smaller than the replicas): nothing to compute,
                // the average still to apply.
                carry = Some(c);
                Some(Vec::new())
            }
            (true, Some(input), Some(c)) => match module_grads(net, cfg, k, input, c, record) {
                Ok((c, g)) => {
                    carry = Some(c);
                    Some(g)
                }
                Err(e) => {
                    failed = Some(format!("rank {rank}: {e}"));
                    None
                }
            },
            _ => None,
        };
        if !group.leads() {
            let msg = match (&mine, &failed) {
                (Some(g), _) => {
                    let share = Share {
                        n,
                        grads: g.clone(),
                        buffers: buffers(net, k)
                            .iter()
                            .map(|p| p.var.as_tensor().clone())
                            .collect(),
                    };
                    share_message(step, k, &share)?
                }
                (None, why) => no_grads_message(step, k, why.as_deref().unwrap_or("")),
            };
            mail.send(group.ranks[0], msg)?;
        }
        if let Some((pk, pg)) = pending.take() {
            ex.run(optimizers[pk - first].as_mut(), pk, pg, &mut failed, mail)?;
        }
        pending = Some((k, mine));
    }
    if let Some((pk, pg)) = pending.take() {
        ex.run(optimizers[pk - first].as_mut(), pk, pg, &mut failed, mail)?;
    }
    Ok(match (failed, carry) {
        (None, Some(c)) => Ok(c),
        (Some(why), _) => Err(why),
        (None, None) => Err(format!("rank {rank}: the step lost its carry")),
    })
}

/// What every exchange of one step on one rank shares.
struct Exchange<'a> {
    net: &'a LocalNetwork,
    cfg: &'a TrainerConfig,
    step: usize,
    lr: f64,
    /// This copy's examples in the step.
    n: usize,
    group: &'a Group,
    device: &'a candle_core::Device,
}

impl Exchange<'_> {
    /// Module `k`'s exchange: the first rank averages and answers, the others apply its
    /// answer. `failed` is the step's failure so far, and becomes the group's.
    fn run(
        &self,
        opt: &mut dyn Optimizer,
        k: usize,
        mine: Option<Vec<Tensor>>,
        failed: &mut Option<String>,
        mail: &mut Mailbox<'_>,
    ) -> Result<()> {
        let (group, step) = (self.group, self.step);
        let own = buffers(self.net, k);
        if group.leads() {
            let mut parts = vec![Share {
                n: self.n,
                grads: mine.unwrap_or_default(),
                buffers: own.iter().map(|p| p.var.as_tensor().clone()).collect(),
            }];
            let mut why = failed.clone();
            for &r in &group.ranks[1..] {
                let bytes = mail.recv_sync(r)?;
                match read_share(&bytes, step, k, r, self.device)? {
                    Ok(part) => parts.push(part),
                    Err(w) => {
                        why.get_or_insert(w);
                    }
                }
            }
            let answer = match &why {
                None => match self.apply_average(opt, k, &own, &parts) {
                    Ok(msg) => msg,
                    Err(e) => {
                        let w = format!("rank {}: {e}", group.ranks[0]);
                        why = Some(w.clone());
                        no_grads_message(step, k, &w)
                    }
                },
                Some(w) => no_grads_message(step, k, w),
            };
            for &r in &group.ranks[1..] {
                mail.send(r, answer.clone())?;
            }
            *failed = why;
        } else {
            let leader = group.ranks[0];
            let bytes = mail.recv_sync(leader)?;
            match read_share(&bytes, step, k, leader, self.device)? {
                Ok(avg) if failed.is_none() => {
                    let applied = set_buffers(&own, &avg.buffers)
                        .and_then(|()| update(self.cfg, opt, avg.grads, self.lr));
                    if let Err(e) = applied {
                        failed.get_or_insert(format!("rank {}: {e}", group.ranks[group.me]));
                    }
                }
                Ok(_) => {}
                Err(w) => {
                    failed.get_or_insert(w);
                }
            }
        }
        Ok(())
    }

    /// The first copy's side: averages the shares, updates its own module and buffers, and
    /// returns the answer for the others.
    fn apply_average(
        &self,
        opt: &mut dyn Optimizer,
        k: usize,
        own: &[crate::nn::Param],
        parts: &[Share],
    ) -> Result<Vec<u8>> {
        let merged = merged_buffers(parts)?;
        let answer = Share {
            n: 0,
            grads: weighted_average(parts, |p| &p.grads)?,
            buffers: merged.iter().map(|(t, _)| t.clone()).collect(),
        };
        let msg = share_message(self.step, k, &answer);
        // The buffers the copies agreed on are this copy's own already.
        for (p, (v, averaged)) in own.iter().zip(&merged) {
            if *averaged {
                p.var.set(v)?;
            }
        }
        update(self.cfg, opt, answer.grads, self.lr)?;
        msg
    }
}

/// Sets a module's buffers to the group's.
fn set_buffers(own: &[crate::nn::Param], values: &[Tensor]) -> Result<()> {
    if own.len() != values.len() {
        return Err(Error::Internal(format!(
            "the group sent {} buffers for a module with {}",
            values.len(),
            own.len()
        )));
    }
    for (p, v) in own.iter().zip(values) {
        p.var.set(v)?;
    }
    Ok(())
}

/// One step's record from the records of its replicas, each with its number of examples: the
/// losses and boundary statistics weighted by share of the batch (replica order), the correct
/// predictions summed.
pub(crate) fn combine(parts: Vec<(usize, StepRecord)>) -> Result<StepRecord> {
    let total: usize = parts.iter().map(|(n, _)| n).sum();
    let mut out = StepRecord::default();
    let mut boundaries: BTreeMap<usize, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let acc = |sum: Option<Tensor>, t: &Tensor, w: f64| -> Result<Tensor> {
        let t = t.affine(w, 0.0)?;
        Ok(match sum {
            None => t,
            Some(s) => (s + t)?,
        })
    };
    for (n, rec) in parts.into_iter().filter(|(n, _)| *n > 0) {
        let w = n as f64 / total as f64;
        if out.losses.is_empty() {
            out.losses = rec
                .losses
                .iter()
                .map(|l| l.affine(w, 0.0))
                .collect::<candle_core::Result<Vec<_>>>()?;
        } else {
            if out.losses.len() != rec.losses.len() {
                return Err(Error::Internal(format!(
                    "replicas recorded {} and {} module losses for one step",
                    out.losses.len(),
                    rec.losses.len()
                )));
            }
            for (o, l) in out.losses.iter_mut().zip(&rec.losses) {
                *o = acc(Some(o.clone()), l, w)?;
            }
        }
        out.correct = match (out.correct.take(), &rec.correct) {
            (None, c) => c.clone(),
            (Some(a), Some(c)) => Some((a + c)?),
            (a, None) => a,
        };
        for b in &rec.boundaries {
            let e = boundaries.entry(b.slot).or_default();
            if let Some(s) = &b.stats {
                e.0 = Some(acc(e.0.take(), s, w)?);
            }
            if let Some(d) = &b.distance {
                e.1 = Some(acc(e.1.take(), d, w)?);
            }
        }
    }
    out.boundaries = boundaries
        .into_iter()
        .map(|(slot, (stats, distance))| BoundaryRecord {
            slot,
            stats,
            distance,
        })
        .collect();
    Ok(out)
}
