//! The ranks of a distributed run as a [`Run`](crate::Run) uses them: the transport shared by
//! its calls, and the few decisions rank 0 makes for all (a stop, the modules' placement).

use std::sync::{Arc, Mutex, MutexGuard};

use sgr_core::events::EvalMetrics;
use sgr_core::network::LocalNetwork;
use sgr_core::trainer::distributed::Transport;
use sgr_core::trainer::{evaluate_batch, BatchEval};

use crate::{Error, Result, RunOptions};

/// The transport of a distributed run ([`RunOptions::ranks`]).
pub type SharedTransport = Arc<Mutex<dyn Transport + Send>>;

/// The transport, also after a panic elsewhere (the next message then fails).
pub(crate) fn lock(t: &SharedTransport) -> MutexGuard<'_, dyn Transport + Send + 'static> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rank of this process in `t`.
pub fn rank_of(t: &SharedTransport) -> usize {
    lock(t).rank()
}

/// This process's rank (0 when the run is not distributed).
pub(crate) fn rank(opts: &RunOptions) -> usize {
    opts.ranks.as_ref().map_or(0, |t| lock(t).rank())
}

/// Rank 0's `mine` on every rank.
pub(crate) fn from_rank0(t: &SharedTransport, mine: bool) -> Result<bool> {
    let bytes = lock(t).broadcast(0, vec![u8::from(mine)])?;
    Ok(bytes.first() == Some(&1))
}

/// Rank 0's per-module step times on every rank (bit for bit, so that every rank computes the
/// same placement).
pub(crate) fn seconds_from_rank0(t: &SharedTransport, mine: &[f64], k: usize) -> Result<Vec<f64>> {
    let bytes: Vec<u8> = mine
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .collect();
    let bytes = lock(t).broadcast(0, bytes)?;
    if bytes.len() != 8 * k {
        return Err(Error::Spec(format!(
            "rank 0 measured {} module times, this rank's network has K={k} modules",
            bytes.len() / 8
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_bits(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
        .collect())
}

/// Every rank's `mine` on rank 0, in rank order (empty on the other ranks).
pub(crate) fn gather_to_rank0(t: &SharedTransport, mine: u64) -> Result<Vec<u64>> {
    let mut t = lock(t);
    if t.rank() != 0 {
        t.send(0, mine.to_le_bytes().to_vec())?;
        return Ok(Vec::new());
    }
    let mut all = vec![mine];
    for r in 1..t.size() {
        let bytes = t.recv(r)?;
        let v: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
            Error::Spec(format!(
                "rank {r} sent {} bytes where 8 were due",
                bytes.len()
            ))
        })?;
        all.push(u64::from_le_bytes(v));
    }
    Ok(all)
}

/// The evaluation of `net` over `batches`, spread over the ranks: rank r evaluates the batches
/// whose index is r modulo the ranks, rank 0 adds every batch's sums in batch order (the
/// one-process numbers, bit for bit) and sends the metrics to all. For the time before the
/// modules are placed, when every rank holds the same whole model (an `init_from` run's first
/// evaluation); afterwards a rank holds only its own modules and the evaluation is pipelined
/// (`Trainer::evaluate_on`). Every rank reads the same batches. A data error on any rank is
/// every rank's error.
pub(crate) fn evaluate_on_ranks<I, E>(
    t: &SharedTransport,
    net: &LocalNetwork,
    batches: I,
) -> Result<EvalMetrics>
where
    I: IntoIterator<Item = std::result::Result<(candle_core::Tensor, candle_core::Tensor), E>>,
    E: std::fmt::Display,
{
    let (rank, size) = {
        let t = lock(t);
        (t.rank(), t.size())
    };
    let mut mine: std::result::Result<Vec<(usize, BatchEval)>, String> = Ok(Vec::new());
    for (i, b) in batches.into_iter().enumerate() {
        if i % size != rank {
            continue;
        }
        let part = b
            .map_err(|e| e.to_string())
            .and_then(|(x, y)| evaluate_batch(net, &x, &y).map_err(|e| e.to_string()));
        match (part, &mut mine) {
            (Ok(p), Ok(list)) => list.push((i, p)),
            (Err(e), _) => {
                mine = Err(format!("rank {rank}: {e}"));
                break;
            }
            (Ok(_), Err(_)) => {}
        }
    }
    let encode = |v: &std::result::Result<Vec<(usize, BatchEval)>, String>| {
        serde_json::to_vec(v).map_err(|e| Error::Spec(format!("an evaluation message: {e}")))
    };
    let mut t = lock(t);
    let verdict = if rank == 0 {
        let mut all = Vec::new();
        let mut failed = None;
        let parts = std::iter::once(Ok(encode(&mine)?))
            .chain((1..size).map(|r| t.recv(r)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for bytes in parts {
            let part: std::result::Result<Vec<(usize, BatchEval)>, String> =
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Spec(format!("a rank's evaluation: {e}")))?;
            match part {
                Ok(list) => all.extend(list),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        all.sort_by_key(|(i, _)| *i);
        let parts: Vec<BatchEval> = all.into_iter().map(|(_, p)| p).collect();
        let result = match failed {
            None => Ok(BatchEval::metrics(&parts, net.num_classes() > 5)),
            Some(e) => Err(e),
        };
        let bytes =
            serde_json::to_vec(&result).map_err(|e| Error::Spec(format!("the evaluation: {e}")))?;
        t.broadcast(0, bytes)?
    } else {
        t.send(0, encode(&mine)?)?;
        t.broadcast(0, Vec::new())?
    };
    let result: std::result::Result<EvalMetrics, String> = serde_json::from_slice(&verdict)
        .map_err(|e| Error::Spec(format!("rank 0's evaluation: {e}")))?;
    result.map_err(|e| Error::Core(sgr_core::Error::Data(e.into())))
}

/// On a resume, rank 0's specification on every rank: rank 0 passes `Some` (what it read:
/// the specification and its checkpoint file) and gets both back; the others pass `None` and
/// receive the specification. They need no checkpoint: rank 0 loads it and sends each rank its
/// position ([`position_from_rank0`]) and, once the modules are placed, its modules' state.
/// When rank 0 could not read its files, every rank returns the error.
pub(crate) fn spec_from_rank0(
    t: &SharedTransport,
    mine: Option<Result<(crate::RunSpec, std::path::PathBuf)>>,
) -> Result<(crate::RunSpec, Option<std::path::PathBuf>)> {
    let mut t = lock(t);
    if let Some(mine) = mine {
        let read = mine.and_then(|(spec, path)| {
            let json = serde_json::to_vec(&spec)
                .map_err(|e| Error::Spec(format!("the run's configuration: {e}")))?;
            Ok((spec, json, path))
        });
        return match read {
            Ok((spec, json, path)) => {
                t.broadcast(0, [&[1u8][..], &json].concat())?;
                Ok((spec, Some(path)))
            }
            Err(e) => {
                t.broadcast(0, [&[0u8][..], e.to_string().as_bytes()].concat())?;
                Err(e)
            }
        };
    }
    let head = t.broadcast(0, Vec::new())?;
    match head.split_first() {
        Some((1, spec)) => {
            let spec: crate::RunSpec = serde_json::from_slice(spec)
                .map_err(|e| Error::Spec(format!("rank 0's configuration: {e}")))?;
            Ok((spec, None))
        }
        Some((_, why)) => Err(Error::Spec(format!(
            "rank 0 cannot resume the run: {}",
            String::from_utf8_lossy(why)
        ))),
        None => Err(Error::Spec("rank 0 sent an empty message".into())),
    }
}

/// On a resume, rank 0's position (epoch, step, the epoch's sums so far) on every rank, once
/// rank 0 has `loaded` its checkpoint; when it could not, every rank returns the error (rank 0
/// its own).
pub(crate) fn position_from_rank0(
    t: &SharedTransport,
    trainer: &mut sgr_core::trainer::Trainer,
    loaded: Result<()>,
) -> Result<()> {
    let mut t = lock(t);
    if t.rank() == 0 {
        let state = loaded.and_then(|()| {
            serde_json::to_vec(&trainer.state()?)
                .map_err(|e| Error::Spec(format!("the trainer state: {e}")))
        });
        let message = match &state {
            Ok(state) => [&[1u8][..], state].concat(),
            Err(e) => [&[0u8][..], e.to_string().as_bytes()].concat(),
        };
        t.broadcast(0, message)?;
        return state.map(|_| ());
    }
    let head = t.broadcast(0, Vec::new())?;
    match head.split_first() {
        Some((1, state)) => {
            let state = serde_json::from_slice(state)
                .map_err(|e| Error::Spec(format!("rank 0's trainer state: {e}")))?;
            Ok(trainer.load_state(state)?)
        }
        Some((_, why)) => Err(Error::Spec(format!(
            "rank 0 cannot resume the run: {}",
            String::from_utf8_lossy(why)
        ))),
        None => Err(Error::Spec("rank 0 sent an empty message".into())),
    }
}

/// Rank 0's summary of a finished run (or `None`: train on) on every rank.
pub(crate) fn summary_from_rank0(
    t: &SharedTransport,
    mine: Option<sgr_schema::Summary>,
) -> Result<Option<sgr_schema::Summary>> {
    let bytes = match &mine {
        Some(s) => {
            serde_json::to_vec(s).map_err(|e| Error::Spec(format!("the run's summary: {e}")))?
        }
        None => Vec::new(),
    };
    let bytes = lock(t).broadcast(0, bytes)?;
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Spec(format!("rank 0's summary: {e}")))
}
