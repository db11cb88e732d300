//! Which rank holds which module in a distributed run, and how the whole state meets on rank 0
//! when it is saved (docs/parallel.md, "Across processes").
//!
//! After [`Trainer::distribute`] a rank holds the weights, buffers and optimizer state of its
//! own stage's modules only; the others' are freed ([`LocalNetwork::release_module`]), which
//! is the point of spreading the modules: a worker's memory is its own modules'. Nothing that
//! reads the whole model may then run on one rank, so each such reader has a collective form:
//! [`Trainer::gather`] copies every module's state to rank 0 for a checkpoint or the model file
//! (freed with the [`Snapshot`]), [`Trainer::first_non_finite_on`] combines every rank's check,
//! and [`Trainer::evaluate_on`] runs the test batches through the stages.
//!
//! [`LocalNetwork::release_module`]: crate::network::LocalNetwork::release_module

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor, Var};

use super::distributed::Transport;
use super::replicas::Layout;
use super::wire::{Reader, Writer};
use super::{Trainer, TrainerState};
use crate::nn::{Param, ParamKind};
use crate::{Error, Result};

/// The whole training state in one place: what a checkpoint holds
/// ([`crate::checkpoint::save_snapshot`]).
#[derive(Debug)]
pub struct Snapshot {
    /// Every weight and buffer, in [`crate::network::LocalNetwork::params`] order.
    pub params: Vec<Param>,
    /// Every module's optimizer state, in module order.
    pub optimizer_states: Vec<HashMap<String, Tensor>>,
    /// The position and partial epoch metrics.
    pub state: TrainerState,
}

/// One module's state as it travels between ranks: its body's tensors, its objective's, and
/// its optimizer state.
struct ModuleState {
    body: Vec<Param>,
    objective: Vec<Param>,
    optimizer: HashMap<String, Tensor>,
}

const MODULE: u8 = 20;
const MODULE_FAILED: u8 = 21;

fn write_params(w: &mut Writer, params: &[Param]) -> Result<()> {
    w.u64(params.len() as u64);
    for p in params {
        w.bytes(p.name.as_bytes());
        w.u8(u8::from(p.kind == ParamKind::Buffer));
        w.tensor(p.var.as_tensor())?;
    }
    Ok(())
}

fn read_params(r: &mut Reader<'_>, device: &Device) -> Result<Vec<Param>> {
    (0..r.usize()?)
        .map(|_| {
            let name = String::from_utf8_lossy(r.bytes()?).into_owned();
            let kind = if r.u8()? == 0 {
                ParamKind::Trainable
            } else {
                ParamKind::Buffer
            };
            let var = Var::from_tensor(&r.tensor(device)?)?;
            Ok(Param { name, var, kind })
        })
        .collect()
}

fn read_module(bytes: &[u8], device: &Device) -> Result<std::result::Result<ModuleState, String>> {
    let mut r = Reader::new(bytes);
    match r.u8()? {
        MODULE => {}
        MODULE_FAILED => return Ok(Err(String::from_utf8_lossy(r.bytes()?).into_owned())),
        tag => {
            return Err(Error::Internal(format!(
                "got message {tag} where a module's state was due"
            )))
        }
    }
    let body = read_params(&mut r, device)?;
    let objective = read_params(&mut r, device)?;
    let mut optimizer = HashMap::new();
    for _ in 0..r.usize()? {
        let key = String::from_utf8_lossy(r.bytes()?).into_owned();
        optimizer.insert(key, r.tensor(device)?);
    }
    r.end()?;
    Ok(Ok(ModuleState {
        body,
        objective,
        optimizer,
    }))
}

/// Every rank's verdict on every rank: `Ok` when all are, else the first failure in rank order,
/// naming its rank.
fn agree(t: &mut dyn Transport, mine: Result<()>) -> Result<()> {
    let text = match &mine {
        Ok(()) => String::new(),
        Err(e) => format!("rank {}: {e}", t.rank()),
    };
    let verdict = if t.rank() == 0 {
        let mut first = (!text.is_empty()).then_some(text);
        for r in 1..t.size() {
            let theirs = t.recv(r)?;
            if first.is_none() && !theirs.is_empty() {
                first = Some(String::from_utf8_lossy(&theirs).into_owned());
            }
        }
        t.broadcast(0, first.unwrap_or_default().into_bytes())?
    } else {
        t.send(0, text.into_bytes())?;
        t.broadcast(0, Vec::new())?
    };
    mine?;
    if verdict.is_empty() {
        Ok(())
    } else {
        Err(Error::Internal(
            String::from_utf8_lossy(&verdict).into_owned(),
        ))
    }
}

impl Trainer {
    /// Frees module `k`'s weights, buffers and optimizer state on this trainer
    /// ([`crate::network::LocalNetwork::release_module`]); its optimizer is replaced by an empty
    /// one. For a rank of a distributed run: [`Trainer::distribute`] calls it for every module
    /// the rank does not own.
    pub fn release_module(&mut self, k: usize) -> Result<()> {
        self.net.release_module(k)?;
        self.optimizers[k] = self.cfg.optimizer.build(Vec::new())?;
        Ok(())
    }

    /// Whether this trainer holds module `k` (see [`Trainer::release_module`]).
    pub fn holds_module(&self, k: usize) -> bool {
        self.net.holds_module(k)
    }

    /// The whole training state of a trainer that holds every module.
    pub fn snapshot(&self) -> Result<Snapshot> {
        if let Some(k) = (0..self.net.num_modules()).find(|&k| !self.holds_module(k)) {
            return Err(Error::Released { module: k });
        }
        Ok(Snapshot {
            params: self.net.params(),
            optimizer_states: self
                .optimizers
                .iter()
                .map(|o| o.state())
                .collect::<Result<_>>()?,
            state: self.state()?,
        })
    }

    fn write_module(&self, k: usize) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        w.u8(MODULE);
        write_params(&mut w, &self.net.module_body_params(k))?;
        write_params(&mut w, &self.net.module_objective(k)?.params())?;
        let state: BTreeMap<String, Tensor> = self.optimizers[k].state()?.into_iter().collect();
        w.u64(state.len() as u64);
        for (key, v) in &state {
            w.bytes(key.as_bytes());
            w.tensor(v)?;
        }
        Ok(w.0)
    }

    /// Module `k`'s state, or why it could not be written, as a message.
    fn module_message(&self, k: usize) -> Result<Vec<u8>> {
        Ok(self.write_module(k).unwrap_or_else(|e| {
            let mut w = Writer::default();
            w.u8(MODULE_FAILED);
            w.bytes(format!("module {k}: {e}").as_bytes());
            w.0
        }))
    }

    /// Sets module `k`'s weights, buffers and optimizer state to `state` (matched by name).
    fn load_module(&mut self, k: usize, state: ModuleState) -> Result<()> {
        let sent: HashMap<String, Var> = state
            .body
            .into_iter()
            .chain(state.objective)
            .map(|p| (p.name, p.var))
            .collect();
        let mine = self.net.module_params(k);
        if mine.len() != sent.len() {
            return Err(Error::Internal(format!(
                "module {k} has {} tensors here and {} were sent",
                mine.len(),
                sent.len()
            )));
        }
        for p in &mine {
            let v = sent
                .get(&p.name)
                .ok_or_else(|| Error::Internal(format!("module {k}: `{}` was not sent", p.name)))?;
            if v.dims() != p.var.dims() || v.dtype() != p.var.dtype() {
                return Err(Error::Internal(format!(
                    "module {k}: `{}` was sent as {:?} {:?}, it is {:?} {:?} here",
                    p.name,
                    v.dtype(),
                    v.dims(),
                    p.var.dtype(),
                    p.var.dims()
                )));
            }
            p.var.set(v.as_tensor())?;
        }
        self.optimizers[k].load_state(&state.optimizer)
    }

    /// Places the modules on the ranks as `layout` says: rank 0's weights, buffers and
    /// optimizer state of each module go to the ranks of its stage (every replica's copy), and
    /// every rank then frees the modules of the other stages. Every rank calls it once, holding
    /// every module (as built, and on rank 0 as resumed): rank 0's state is the one that
    /// counts, so the other ranks need not load a checkpoint. Afterwards a rank holds only its
    /// own stage; [`Trainer::gather`] brings everything back to rank 0 for saving.
    pub fn distribute(&mut self, t: &mut dyn Transport, layout: &Layout) -> Result<()> {
        self.check_layout(t, layout)?;
        if t.size() == 1 {
            return Ok(());
        }
        let k_all = self.net.num_modules();
        let held: Vec<usize> = (0..k_all).filter(|&k| self.holds_module(k)).collect();
        let all = if held.len() == k_all {
            "every module".to_string()
        } else {
            format!("modules {held:?} of {k_all}")
        };
        // The same verdict on every rank, before any state moves.
        super::distributed::check_same(t, "modules before they are distributed", &all)?;
        if held.len() != k_all {
            return Err(Error::InvalidConfig(format!(
                "the ranks hold {all}: distribute the modules once, before any is released"
            )));
        }
        let rank = t.rank();
        let device = self.net.device()?;
        let mut loaded = Ok(());
        for (stage, range) in layout.stages().stages().iter().enumerate() {
            let owners = layout.group(stage);
            for k in range.clone() {
                if rank == 0 {
                    let others: Vec<usize> = owners.iter().copied().filter(|&r| r != 0).collect();
                    if let Some((&last, rest)) = others.split_last() {
                        let bytes = self.module_message(k)?;
                        for &r in rest {
                            t.send(r, bytes.clone())?;
                        }
                        t.send(last, bytes)?;
                    }
                } else if owners.contains(&rank) {
                    let bytes = t.recv(0)?;
                    if loaded.is_ok() {
                        loaded = match read_module(&bytes, &device)? {
                            Ok(state) => self.load_module(k, state),
                            Err(why) => Err(Error::Internal(format!("rank 0: {why}"))),
                        };
                    }
                }
            }
        }
        agree(t, loaded)?;
        let mine = layout.stages().stages()[layout.place(rank).1].clone();
        for k in (0..k_all).filter(|k| !mine.contains(k)) {
            self.release_module(k)?;
        }
        Ok(())
    }

    /// The whole training state on rank 0 (`None` elsewhere): the owner of each module (its
    /// stage's rank in replica 0) sends rank 0 a copy of its weights, buffers and optimizer
    /// state, and rank 0 adds its own modules and the position. The snapshot is what
    /// [`Trainer::snapshot`] gives a trainer that trained alone, bit for bit; dropping it frees
    /// the copies, so rank 0 holds the whole model only while it saves. Every rank calls it.
    /// Only rank 0's position counts: call [`Trainer::share_state`] for the others'.
    pub fn gather(&self, t: &mut dyn Transport, layout: &Layout) -> Result<Option<Snapshot>> {
        self.check_layout(t, layout)?;
        if t.size() == 1 {
            return self.snapshot().map(Some);
        }
        let rank = t.rank();
        if rank != 0 {
            let (replica, stage) = layout.place(rank);
            if replica == 0 {
                for k in layout.stages().stages()[stage].clone() {
                    t.send(0, self.module_message(k)?)?;
                }
            }
            return Ok(None);
        }
        let device = self.net.device()?;
        let k_all = self.net.num_modules();
        let mut modules = Vec::with_capacity(k_all);
        let mut failed = None;
        for (stage, range) in layout.stages().stages().iter().enumerate() {
            let owner = layout.rank(0, stage);
            for k in range.clone() {
                if owner == 0 {
                    modules.push(ModuleState {
                        body: self.net.module_body_params(k),
                        objective: self.net.module_objective(k)?.params(),
                        optimizer: self.optimizers[k].state()?,
                    });
                    continue;
                }
                match read_module(&t.recv(owner)?, &device)? {
                    Ok(m) => modules.push(m),
                    Err(why) => {
                        failed.get_or_insert(format!("rank {owner}: {why}"));
                    }
                }
            }
        }
        if let Some(why) = failed {
            return Err(Error::Internal(why));
        }
        let mut params: Vec<Param> = Vec::new();
        let mut objectives: Vec<Param> = Vec::new();
        let mut optimizer_states = Vec::with_capacity(k_all);
        for m in modules {
            params.extend(m.body);
            objectives.extend(m.objective);
            optimizer_states.push(m.optimizer);
        }
        // The network lists every body first, then every objective.
        params.extend(objectives);
        Ok(Some(Snapshot {
            params,
            optimizer_states,
            state: self.state()?,
        }))
    }

    /// The first weight or buffer this trainer holds that is NaN or infinite, with its module,
    /// in [`crate::network::LocalNetwork::params`] order (every body, then every objective).
    pub fn first_non_finite(&self) -> Result<Option<(String, usize)>> {
        Ok(self.first_non_finite_keyed()?.map(|(_, k, name)| (name, k)))
    }

    /// [`Trainer::first_non_finite`] keyed by its place in the network's order: (objective,
    /// module).
    fn first_non_finite_keyed(&self) -> Result<Option<(bool, usize, String)>> {
        let k_all = self.net.num_modules();
        let mut tensors: Vec<(bool, usize, Param)> = Vec::new();
        for k in 0..k_all {
            tensors.extend(
                self.net
                    .module_body_params(k)
                    .into_iter()
                    .map(|p| (false, k, p)),
            );
        }
        for k in 0..k_all {
            let objective = self.net.module_objective(k)?.params();
            tensors.extend(objective.into_iter().map(|p| (true, k, p)));
        }
        let first = crate::checkpoint::first_non_finite(
            tensors
                .iter()
                .map(|(_, _, p)| (p.name.as_str(), p.var.as_tensor())),
        )?;
        Ok(first.and_then(|name| {
            tensors
                .iter()
                .find(|(_, _, p)| p.name == name)
                .map(|(o, k, _)| (*o, *k, name.clone()))
        }))
    }

    /// [`Trainer::first_non_finite`] over the modules of every rank: each checks its own, and
    /// rank 0 picks the first in the network's order and tells every rank. Every rank calls it
    /// and gets the same answer.
    pub fn first_non_finite_on(
        &self,
        t: &mut dyn Transport,
        layout: &Layout,
    ) -> Result<Option<(String, usize)>> {
        self.check_layout(t, layout)?;
        type Verdict = std::result::Result<Option<(bool, usize, String)>, String>;
        let encode = |v: &Verdict| {
            serde_json::to_vec(v)
                .map_err(|e| Error::Internal(format!("a rank's finiteness check: {e}")))
        };
        let decode = |b: &[u8]| {
            serde_json::from_slice::<Verdict>(b)
                .map_err(|e| Error::Internal(format!("a rank's finiteness check: {e}")))
        };
        let mine: Verdict = self
            .first_non_finite_keyed()
            .map_err(|e| format!("rank {}: {e}", t.rank()));
        let verdict = if t.rank() == 0 {
            let mut all = vec![mine];
            for r in 1..t.size() {
                all.push(decode(&t.recv(r)?)?);
            }
            let combined: Verdict =
                all.into_iter()
                    .try_fold(None, |best: Option<(bool, usize, String)>, v| {
                        Ok(match (best, v?) {
                            (Some(b), Some(n)) => Some(if (n.0, n.1) < (b.0, b.1) { n } else { b }),
                            (b, n) => b.or(n),
                        })
                    });
            t.broadcast(0, encode(&combined)?)?
        } else {
            t.send(0, encode(&mine)?)?;
            t.broadcast(0, Vec::new())?
        };
        decode(&verdict)?
            .map(|v| v.map(|(_, k, name)| (name, k)))
            .map_err(Error::Internal)
    }
}
