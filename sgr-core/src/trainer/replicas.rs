//! Data-parallel replicas: R copies of a stage's modules, each on its own rank and its own
//! shard of the batch, that average their gradients before every update (docs/parallel.md,
//! "Replicas").
//!
//! The ranks that hold copies of one stage form a group; its first rank (replica 0) forms the
//! average, weighting each copy's gradients by its share of the batch and adding them in
//! replica order, and sends it back. The result is the same bits however the messages arrive.
//! A module's gradients leave as soon as they are computed, and its update waits until the
//! next module's pass is done, so the transfer overlaps that pass (the next module does not
//! read the weights it updates: it receives its input detached).
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

fn grads_message(step: usize, k: usize, n: usize, grads: &[Tensor]) -> Result<Vec<u8>> {
    let mut w = Writer::default();
    w.u8(GRADS);
    w.u64(step as u64);
    w.u64(k as u64);
    w.u64(n as u64);
    w.u64(grads.len() as u64);
    for g in grads {
        w.tensor(g)?;
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

/// A group message about module `k` of `step`: `Ok((examples, gradients))` or why there are
/// none.
fn read_grads(
    bytes: &[u8],
    step: usize,
    k: usize,
    from: usize,
    device: &candle_core::Device,
) -> Result<std::result::Result<(usize, Vec<Tensor>), String>> {
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
            let len = r.usize()?;
            let grads = (0..len)
                .map(|_| r.tensor(device))
                .collect::<Result<Vec<_>>>()?;
            Ok((n, grads))
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

/// Σ_r w_r · g_r over the copies that have examples, in replica order, w_r their share of the
/// batch.
fn weighted_average(parts: &[(usize, Vec<Tensor>)]) -> Result<Vec<Tensor>> {
    let total: usize = parts.iter().map(|(n, _)| n).sum();
    let mut sum: Option<Vec<Tensor>> = None;
    for (n, grads) in parts.iter().filter(|(n, _)| *n > 0) {
        let w = *n as f64 / total as f64;
        let scaled = grads
            .iter()
            .map(|g| g.affine(w, 0.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        sum = Some(match sum {
            None => scaled,
            Some(acc) => {
                if acc.len() != scaled.len() {
                    return Err(Error::Internal(format!(
                        "replicas sent {} and {} gradients for one module",
                        acc.len(),
                        scaled.len()
                    )));
                }
                acc.iter()
                    .zip(&scaled)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<Vec<_>>>()?
            }
        });
    }
    sum.ok_or_else(|| Error::Internal("no replica had examples".into()))
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
                (Some(g), _) => grads_message(step, k, n, g)?,
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
        if group.leads() {
            let mut parts = vec![(self.n, mine.unwrap_or_default())];
            let mut why = failed.clone();
            for &r in &group.ranks[1..] {
                let bytes = mail.recv_sync(r)?;
                match read_grads(&bytes, step, k, r, self.device)? {
                    Ok(part) => parts.push(part),
                    Err(w) => {
                        why.get_or_insert(w);
                    }
                }
            }
            let answer = match &why {
                None => match weighted_average(&parts).and_then(|avg| {
                    let msg = grads_message(step, k, 0, &avg)?;
                    update(self.cfg, opt, avg, self.lr)?;
                    Ok(msg)
                }) {
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
            match read_grads(&bytes, step, k, leader, self.device)? {
                Ok((_, avg)) if failed.is_none() => {
                    if let Err(e) = update(self.cfg, opt, avg, self.lr) {
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

/// Averages the buffers (batch-norm running statistics) of module `k` over its copies, in
/// replica order, into the first rank of `group`: the copies' weights are equal already, but
/// each copy's statistics saw only its shards.
pub(crate) fn average_buffers(
    net: &LocalNetwork,
    k: usize,
    mail: &mut Mailbox<'_>,
    group: &Group,
) -> Result<()> {
    let buffers: Vec<_> = net
        .module_params(k)
        .into_iter()
        .filter(|p| p.kind == ParamKind::Buffer)
        .collect();
    if buffers.is_empty() || group.ranks.len() == 1 {
        return Ok(());
    }
    let device = net.device()?;
    let mine: Vec<Tensor> = buffers.iter().map(|p| p.var.as_tensor().clone()).collect();
    if !group.leads() {
        return mail.send(group.ranks[0], grads_message(usize::MAX, k, 1, &mine)?);
    }
    let mut parts = vec![(1, mine)];
    for &r in &group.ranks[1..] {
        let bytes = mail.recv_sync(r)?;
        match read_grads(&bytes, usize::MAX, k, r, &device)? {
            Ok(part) => parts.push(part),
            Err(w) => return Err(Error::Internal(w)),
        }
    }
    for (i, p) in buffers.iter().enumerate() {
        let copies: Vec<&Tensor> = parts.iter().filter_map(|(_, b)| b.get(i)).collect();
        if copies.len() != parts.len() {
            return Err(Error::Internal(format!(
                "module {k}'s copies hold different numbers of buffers"
            )));
        }
        if copies[0].elem_count() == 0 {
            continue;
        }
        // Buffers the copies agree on (an integer count, a frozen head) stay bit for bit.
        let first = copies[0].flatten_all()?.to_dtype(candle_core::DType::F64)?;
        let mut agree = true;
        for c in &copies[1..] {
            let diff = (c.flatten_all()?.to_dtype(candle_core::DType::F64)? - &first)?;
            agree &= diff.abs()?.max(0)?.to_scalar::<f64>()? == 0.0;
        }
        if agree || !copies[0].dtype().is_float() {
            continue;
        }
        let each: Vec<(usize, Vec<Tensor>)> =
            copies.iter().map(|c| (1, vec![(*c).clone()])).collect();
        let avg = weighted_average(&each)?.remove(0);
        p.var.set(&avg)?;
    }
    Ok(())
}
