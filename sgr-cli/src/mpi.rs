//! `--distributed mpi`: the ranks of a distributed run are the processes `mpirun` starts, and
//! their messages go through MPI (rsmpi over the system's MPICH or Open MPI).
//!
//! A send must not wait for its receiver (the ranks send in a cycle: 0 → 1 → … → N−1 → 0), so
//! each message is sent with `MPI_Isend` from a buffer this transport owns until MPI reports
//! the send complete.

use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use sgr_core::trainer::distributed::Transport;
use sgr_core::{Error, Result};

/// Largest message MPI's `int` counts can describe.
const MAX_MESSAGE: usize = i32::MAX as usize;

/// A send in flight and the buffer it reads from (freed once the send completes).
struct InFlight {
    request: Request<'static, [u8], StaticScope>,
    buffer: &'static mut [u8],
}

/// This process's rank in `MPI_COMM_WORLD`.
pub struct MpiRanks {
    world: SimpleCommunicator,
    sends: Vec<InFlight>,
    // Last: MPI is finalised after the sends above are complete.
    _universe: mpi::environment::Universe,
}

// SAFETY: the transport is used from one thread at a time (behind a mutex, on the thread that
// initialised MPI with `Threading::Funneled`); the buffers are owned by it.
unsafe impl Send for MpiRanks {}

impl MpiRanks {
    /// Initialises MPI; fails when this process was not started by an MPI launcher that
    /// supports it, or MPI was initialised before.
    pub fn init() -> anyhow::Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| anyhow::anyhow!("--distributed mpi: MPI was already initialised"))?;
        let world = universe.world();
        Ok(Self {
            world,
            sends: Vec::new(),
            _universe: universe,
        })
    }

    /// Frees the buffers of the sends that have completed.
    fn reap(&mut self) {
        let mut still = Vec::with_capacity(self.sends.len());
        for s in self.sends.drain(..) {
            let InFlight { request, buffer } = s;
            match request.test() {
                Ok(_) => free(buffer),
                Err(request) => still.push(InFlight { request, buffer }),
            }
        }
        self.sends = still;
    }
}

fn free(buffer: &'static mut [u8]) {
    // SAFETY: `buffer` came from `Box::leak` in `send`, and its send has completed.
    drop(unsafe { Box::from_raw(buffer as *mut [u8]) });
}

fn too_large(n: usize) -> Error {
    Error::InvalidConfig(format!(
        "a message of {n} bytes is larger than MPI can send at once ({MAX_MESSAGE}); use a \
         smaller batch"
    ))
}

impl Transport for MpiRanks {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn send(&mut self, to: usize, bytes: Vec<u8>) -> Result<()> {
        if bytes.len() > MAX_MESSAGE {
            return Err(too_large(bytes.len()));
        }
        self.reap();
        let buffer: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
        // SAFETY: the buffer is not touched again until the request completes (`reap`, `Drop`).
        let shared: &'static [u8] = unsafe { &*(buffer as *const [u8]) };
        let request = self
            .world
            .process_at_rank(to as i32)
            .immediate_send(StaticScope, shared);
        self.sends.push(InFlight { request, buffer });
        Ok(())
    }

    fn recv(&mut self, from: usize) -> Result<Vec<u8>> {
        let (bytes, _) = self.world.process_at_rank(from as i32).receive_vec::<u8>();
        self.reap();
        Ok(bytes)
    }

    fn broadcast(&mut self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let me = self.rank() == root;
        let process = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        if me && bytes.len() > MAX_MESSAGE {
            return Err(too_large(bytes.len()));
        }
        process.broadcast_into(&mut len);
        let len = usize::try_from(len).ok().filter(|&n| n <= MAX_MESSAGE);
        let len = len.ok_or_else(|| too_large(usize::MAX))?;
        let mut buf = if me { bytes } else { vec![0u8; len] };
        process.broadcast_into(&mut buf[..]);
        Ok(buf)
    }
}

impl Drop for MpiRanks {
    fn drop(&mut self) {
        for InFlight { request, buffer } in self.sends.drain(..) {
            request.wait();
            free(buffer);
        }
    }
}
