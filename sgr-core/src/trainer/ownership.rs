//! Which rank holds which module in a distributed run, and how the whole state meets on rank 0
//! when it is saved (docs/parallel.md, "Across processes").
//!
//! After [`Trainer::distribute`] (or [`Trainer::keep_stage`], where every rank holds rank 0's
//! state already) a rank holds the weights, buffers and optimizer state of its own stage's
//! modules only; the others' are freed ([`LocalNetwork::release_module`]), which
//! is the point of spreading the modules: a worker's memory is its own modules'. Nothing that
//! reads the whole model may then run on one rank, so each such reader has a collective form:
//! [`Trainer::gather`] copies every module's state to rank 0 for a checkpoint or the model file
//! (freed with the [`Snapshot`]), [`Trainer::first_non_finite_on`] combines every rank's check,
//! and [`Trainer::evaluate_on`] runs the test batches through the stages.
//!
//! [`LocalNetwork::release_module`]: crate::network::LocalNetwork::release_module

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};

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

/// One module's state: its body's tensors, its objective's, and its optimizer state.
struct ModuleState {
    body: Vec<Param>,
    objective: Vec<Param>,
    optimizer: HashMap<String, Tensor>,
}

/// One tensor of a module's state as it arrives.
enum Piece {
    Body(Param),
    Objective(Param),
    State(String, Tensor),
}

/// A module's state travels as a header (how many tensors of each kind follow, or why there
/// is none) and then one message per tensor, so that neither side holds more than one
/// tensor's bytes at a time besides the tensors themselves.
const MODULE: u8 = 20;
const MODULE_FAILED: u8 = 21;
const TENSOR: u8 = 22;

fn param_message(p: &Param) -> Result<Vec<u8>> {
    let mut w = Writer::default();
    w.u8(TENSOR);
    w.bytes(p.name.as_bytes());
    w.u8(u8::from(p.kind == ParamKind::Buffer));
    w.tensor(p.var.as_tensor())?;
    Ok(w.0)
}

fn state_message(key: &str, v: &Tensor) -> Result<Vec<u8>> {
    let mut w = Writer::default();
    w.u8(TENSOR);
    w.bytes(key.as_bytes());
    w.tensor(v)?;
    Ok(w.0)
}

fn read_param(bytes: &[u8], device: &Device) -> Result<Param> {
    let mut r = Reader::new(bytes);
    expect_tensor(&mut r)?;
    let name = String::from_utf8_lossy(r.bytes()?).into_owned();
    let kind = if r.u8()? == 0 {
        ParamKind::Trainable
    } else {
        ParamKind::Buffer
    };
    let var = r.var(device)?;
    r.end()?;
    Ok(Param { name, var, kind })
}

fn read_state(bytes: &[u8], device: &Device) -> Result<(String, Tensor)> {
    let mut r = Reader::new(bytes);
    expect_tensor(&mut r)?;
    let key = String::from_utf8_lossy(r.bytes()?).into_owned();
    let v = r.tensor(device)?;
    r.end()?;
    Ok((key, v))
}

fn expect_tensor(r: &mut Reader<'_>) -> Result<()> {
    match r.u8()? {
        TENSOR => Ok(()),
        tag => Err(Error::Internal(format!(
            "got message {tag} where a module's tensor was due"
        ))),
    }
}

/// Sends module `k`'s state in `parts` (or why it could not be read) to every rank of `to`.
fn send_module(
    t: &mut dyn Transport,
    to: &[usize],
    k: usize,
    parts: Result<ModuleState>,
) -> Result<()> {
    let send_all = |t: &mut dyn Transport, bytes: Vec<u8>| -> Result<()> {
        if let Some((&last, rest)) = to.split_last() {
            for &r in rest {
                t.send(r, bytes.clone())?;
            }
            t.send(last, bytes)?;
        }
        Ok(())
    };
    let mut w = Writer::default();
    let m = match parts {
        Ok(m) => m,
        Err(e) => {
            w.u8(MODULE_FAILED);
            w.bytes(format!("module {k}: {e}").as_bytes());
            return send_all(t, w.0);
        }
    };
    w.u8(MODULE);
    w.u64(m.body.len() as u64);
    w.u64(m.objective.len() as u64);
    w.u64(m.optimizer.len() as u64);
    send_all(t, w.0)?;
    for p in m.body.iter().chain(&m.objective) {
        send_all(t, param_message(p)?)?;
    }
    let state: BTreeMap<&String, &Tensor> = m.optimizer.iter().collect();
    for (key, v) in state {
        send_all(t, state_message(key, v)?)?;
    }
    Ok(())
}

/// Receives a module's state from `from`, handing `take` each tensor as it arrives; `Ok(Err)`
/// is why the sender had none.
fn recv_module(
    t: &mut dyn Transport,
    from: usize,
    device: &Device,
    take: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<std::result::Result<(), String>> {
    let head = t.recv(from)?;
    let mut r = Reader::new(&head);
    let (body, objective, state) = match r.u8()? {
        MODULE => (r.usize()?, r.usize()?, r.usize()?),
        MODULE_FAILED => return Ok(Err(String::from_utf8_lossy(r.bytes()?).into_owned())),
        tag => {
            return Err(Error::Internal(format!(
                "got message {tag} from rank {from} where a module's state was due"
            )))
        }
    };
    r.end()?;
    for i in 0..body + objective {
        let p = read_param(&t.recv(from)?, device)?;
        take(if i < body {
            Piece::Body(p)
        } else {
            Piece::Objective(p)
        })?;
    }
    for _ in 0..state {
        let (key, v) = read_state(&t.recv(from)?, device)?;
        take(Piece::State(key, v))?;
    }
    Ok(Ok(()))
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

    /// Module `k`'s state, sharing its tensors.
    fn module_state(&self, k: usize) -> Result<ModuleState> {
        Ok(ModuleState {
            body: self.net.module_body_params(k),
            objective: self.net.module_objective(k)?.params(),
            optimizer: self.optimizers[k].state()?,
        })
    }

    /// Receives module `k`'s state from rank 0 and sets its weights, buffers (matched by name,
    /// each as it arrives) and optimizer state.
    fn load_module_from_rank0(
        &mut self,
        t: &mut dyn Transport,
        k: usize,
        device: &Device,
    ) -> Result<Result<()>> {
        let mine: HashMap<String, Param> = self
            .net
            .module_params(k)
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let mut set = 0usize;
        let mut state = HashMap::new();
        let mut take = |piece: Piece| -> Result<()> {
            match piece {
                Piece::Body(sent) | Piece::Objective(sent) => {
                    let p = mine.get(&sent.name).ok_or_else(|| {
                        Error::Internal(format!(
                            "module {k}: rank 0 sent `{}`, which it does not have",
                            sent.name
                        ))
                    })?;
                    if sent.var.dims() != p.var.dims() || sent.var.dtype() != p.var.dtype() {
                        return Err(Error::Internal(format!(
                            "module {k}: `{}` was sent as {:?} {:?}, it is {:?} {:?} here",
                            p.name,
                            sent.var.dtype(),
                            sent.var.dims(),
                            p.var.dtype(),
                            p.var.dims()
                        )));
                    }
                    p.var.set(sent.var.as_tensor())?;
                    set += 1;
                }
                Piece::State(key, v) => {
                    state.insert(key, v);
                }
            }
            Ok(())
        };
        // A tensor that does not fit is reported after the whole module has arrived, so that
        // no message is left unread.
        let mut failed: Option<Error> = None;
        let mut guarded = |piece: Piece| -> Result<()> {
            if failed.is_none() {
                if let Err(e) = take(piece) {
                    failed = Some(e);
                }
            }
            Ok(())
        };
        let got = recv_module(t, 0, device, &mut guarded)?;
        if let Err(why) = got {
            return Ok(Err(Error::Internal(format!("rank 0: {why}"))));
        }
        if let Some(e) = failed {
            return Ok(Err(e));
        }
        if set != mine.len() {
            return Ok(Err(Error::Internal(format!(
                "module {k} has {} tensors here and rank 0 sent {set}",
                mine.len()
            ))));
        }
        Ok(self.optimizers[k].load_state(&state))
    }

    /// Frees every module outside `rank`'s stage of `layout`, without any message: for a rank
    /// that holds rank 0's state of its own modules already, as every rank does when all built
    /// the same network from the same seed and nothing was loaded on rank 0 alone (a new run).
    /// [`Trainer::distribute`] sends rank 0's state first.
    pub fn keep_stage(&mut self, layout: &Layout, rank: usize) -> Result<()> {
        if rank >= layout.size() {
            return Err(Error::InvalidConfig(format!(
                "rank {rank} is not in a layout of {} ranks",
                layout.size()
            )));
        }
        let mine = layout.stages().stages()[layout.place(rank).1].clone();
        for k in (0..self.net.num_modules()).filter(|k| !mine.contains(k)) {
            self.release_module(k)?;
        }
        Ok(())
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
                    if !others.is_empty() {
                        send_module(t, &others, k, self.module_state(k))?;
                    }
                } else if owners.contains(&rank) {
                    let got = self.load_module_from_rank0(t, k, &device)?;
                    if loaded.is_ok() {
                        loaded = got;
                    }
                }
            }
        }
        agree(t, loaded)?;
        self.keep_stage(layout, rank)
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
                    send_module(t, &[0], k, self.module_state(k))?;
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
                    modules.push(self.module_state(k)?);
                    continue;
                }
                let mut m = ModuleState {
                    body: Vec::new(),
                    objective: Vec::new(),
                    optimizer: HashMap::new(),
                };
                let got = recv_module(t, owner, &device, &mut |piece| {
                    match piece {
                        Piece::Body(p) => m.body.push(p),
                        Piece::Objective(p) => m.objective.push(p),
                        Piece::State(key, v) => {
                            m.optimizer.insert(key, v);
                        }
                    }
                    Ok(())
                })?;
                match got {
                    Ok(()) => modules.push(m),
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
