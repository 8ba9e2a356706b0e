//! The GPU backend on CUDA devices: one rank thread per GPU, NCCL all-reduce on device buffers
//! between them.

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use cudarc::nccl::ReduceOp;
use gristmill_kernels::cuda::device::CudaDevice;
use half::bf16;

use super::{DeviceReduce, GpuBackend};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::llama::Llama;
use crate::parallel::nccl::NcclCollective;
use crate::parallel::{Collective, Local};
use crate::tensor_parallel::RankSpec;

impl DeviceReduce<CudaDevice> for NcclCollective {
    fn all_reduce_sum(&self, _dev: &CudaDevice, x: &mut CudaSlice<bf16>) -> Result<(), String> {
        self.with_comm(|c| c.all_reduce_in_place(x, &ReduceOp::Sum))
            .map(|_| ())
            .map_err(|e| format!("NCCL all-reduce: {e:?}"))
    }
}

/// Loads the model at `path` on CUDA devices: GPU `ordinal` alone, or GPUs `0..world` with
/// NCCL between them (`world` > 1), each at `memory_utilization` of its memory. A missing
/// driver, device, NVRTC, cuBLAS or NCCL is an error that names it.
pub fn load_engine(
    path: &Path,
    ordinal: usize,
    world: usize,
    memory_utilization: f32,
) -> Result<Engine> {
    let device_error = |e: super::DeviceError| Error::Device(e.to_string());
    let ranks: Vec<RankSpec<GpuBackend<CudaDevice>>> = if world <= 1 {
        let available = CudaDevice::count();
        if ordinal >= available {
            return Err(device_error(if available == 0 && !driver_present() {
                super::DeviceError::NoDriver
            } else {
                super::DeviceError::NoDevice(ordinal, available)
            }));
        }
        vec![RankSpec {
            collective: Arc::new(Local),
            poison: Box::new(|_| {}),
            load: Box::new(move |ckpt, c: Arc<dyn Collective>| {
                let dev = CudaDevice::new(ordinal).map_err(device_error)?;
                Llama::load_rank(ckpt, GpuBackend::new(Arc::new(dev)), c)
            }),
        }]
    } else {
        let comms = NcclCollective::for_devices(world).map_err(Error::Device)?;
        comms
            .into_iter()
            .map(|nccl| {
                let nccl = Arc::new(nccl);
                let rank = nccl.rank();
                let reduce: Arc<dyn DeviceReduce<CudaDevice>> = nccl.clone();
                RankSpec {
                    collective: nccl,
                    // A failed rank cannot interrupt NCCL calls in flight; the group fails
                    // when the step's replies come back.
                    poison: Box::new(|_| {}),
                    load: Box::new(move |ckpt, c: Arc<dyn Collective>| {
                        let dev = CudaDevice::new(rank).map_err(device_error)?;
                        let backend = GpuBackend::new(Arc::new(dev)).with_reduce(reduce);
                        Llama::load_rank(ckpt, backend, c)
                    }),
                }
            })
            .collect()
    };
    Engine::load_ranks(path, ranks, memory_utilization)
}

/// Whether the CUDA driver library can be opened.
fn driver_present() -> bool {
    // SAFETY: only opens (dlopen) and closes the driver library to see whether it exists.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
