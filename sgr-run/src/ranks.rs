//! The ranks of a distributed run as a [`Run`](crate::Run) uses them: the transport shared by
//! its calls, and the few decisions rank 0 makes for all (a stop, the modules' placement).

use std::sync::{Arc, Mutex, MutexGuard};

use sgr_core::trainer::distributed::Transport;

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
