//! NCCL behind the `cuda` feature: one rank per GPU.
//!
//! The [`Collective`] methods take host slices (staged through the device: what the CPU side of
//! the engine and the tests use); the CUDA backend's device buffers go through [`NcclCollective::comm`]
//! directly, inside the step, without staging. NCCL errors panic with NCCL's message: in a rank
//! thread that poisons the group like any other rank failure (see [`crate::tensor_parallel`]).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, ReduceOp};

use super::Collective;

/// A communicator that moves between threads.
struct SendComm(Comm);

// SAFETY: an NCCL communicator is not tied to the thread that created it; NCCL only forbids
// using one communicator from several threads at the same time, which the `Mutex` around it in
// `NcclCollective` rules out.
unsafe impl Send for SendComm {}

/// One rank of an NCCL group.
pub struct NcclCollective {
    comm: Mutex<SendComm>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// GPUs visible to this process; an error (not a panic) without a CUDA driver.
    pub fn device_count() -> Result<usize, String> {
        // SAFETY: only opens (dlopen) and closes the driver library to see whether it exists.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver library (libcuda) on this machine".into());
        }
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| format!("CUDA driver: {e:?}"))
    }

    /// One rank per GPU `0..n` of this process (a worker pod with `n` GPUs). Errors, never
    /// panics, without a driver, a device or NCCL.
    pub fn for_devices(n: usize) -> Result<Vec<Self>, String> {
        let available = Self::device_count()?;
        if n == 0 || n > available {
            return Err(format!("asked for {n} GPUs, {available} visible"));
        }
        // SAFETY: as above, for the NCCL library.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err("no NCCL library (libnccl) on this machine".into());
        }
        let streams = (0..n)
            .map(|i| {
                CudaContext::new(i)
                    .map(|ctx| ctx.default_stream())
                    .map_err(|e| format!("CUDA device {i}: {e:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let comms = Comm::from_devices(streams.clone()).map_err(|e| format!("NCCL: {e:?}"))?;
        Ok(comms
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(rank, (comm, stream))| Self {
                comm: Mutex::new(SendComm(comm)),
                stream,
                rank,
                world: n,
            })
            .collect())
    }

    /// Runs `f` with the communicator (device-buffer collectives of the CUDA backend).
    pub fn with_comm<T>(&self, f: impl FnOnce(&Comm) -> T) -> T {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        f(&guard.0)
    }

    fn staged(
        &self,
        host: &[f32],
        op: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<f32>),
    ) -> Vec<f32> {
        let mut dev = self
            .stream
            .clone_htod(host)
            .unwrap_or_else(|e| panic!("NCCL rank {}: host to device copy: {e:?}", self.rank));
        self.with_comm(|c| op(c, &mut dev));
        self.stream
            .clone_dtoh(&dev)
            .unwrap_or_else(|e| panic!("NCCL rank {}: device to host copy: {e:?}", self.rank))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let rank = self.rank;
        let out = self.staged(buf, |c, d| {
            c.all_reduce_in_place(d, &ReduceOp::Sum)
                .unwrap_or_else(|e| panic!("NCCL rank {rank}: all-reduce: {e:?}"));
        });
        buf.copy_from_slice(&out);
    }

    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        let rank = self.rank;
        let send = self
            .stream
            .clone_htod(local)
            .unwrap_or_else(|e| panic!("NCCL rank {rank}: host to device copy: {e:?}"));
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.world)
            .unwrap_or_else(|e| panic!("NCCL rank {rank}: allocation: {e:?}"));
        self.with_comm(|c| {
            c.all_gather(&send, &mut recv)
                .unwrap_or_else(|e| panic!("NCCL rank {rank}: all-gather: {e:?}"));
        });
        self.stream
            .clone_dtoh(&recv)
            .unwrap_or_else(|e| panic!("NCCL rank {rank}: device to host copy: {e:?}"))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) {
        let rank = self.rank;
        let out = self.staged(buf, |c, d| {
            c.broadcast_in_place(d, root as i32)
                .unwrap_or_else(|e| panic!("NCCL rank {rank}: broadcast: {e:?}"));
        });
        buf.copy_from_slice(&out);
    }

    fn barrier(&self) {
        // A one-element all-reduce: returns once every rank has joined.
        let mut one = [0f32];
        self.all_reduce_sum(&mut one);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs where a GPU is present; elsewhere it says why it did nothing.
    #[test]
    fn nccl_all_reduce_on_the_gpus_of_this_machine() {
        let n = match NcclCollective::device_count() {
            Ok(n) if n > 0 => n,
            other => {
                eprintln!("skipped: no CUDA device ({other:?})");
                return;
            }
        };
        let ranks = match NcclCollective::for_devices(n) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipped: NCCL unavailable: {e}");
                return;
            }
        };
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let mut buf = vec![c.rank() as f32 + 1.0; 576];
                    c.all_reduce_sum(&mut buf);
                    let gathered = c.all_gather(&[c.rank() as f32]);
                    (buf, gathered)
                })
            })
            .collect();
        let want = (n * (n + 1) / 2) as f32;
        for h in handles {
            let (buf, gathered) = h.join().expect("rank");
            assert!(buf.iter().all(|&x| x == want));
            assert_eq!(gathered, (0..n).map(|r| r as f32).collect::<Vec<_>>());
        }
    }
}
