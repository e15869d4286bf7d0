//! The collective of a data-parallel run on GPUs, one rank per GPU: NCCL (through cudarc), on a stream of
//! its own beside candle's stream of this rank's device, where the model computes. Each exchange waits on
//! the device for the work queued on the compute stream before it, and the work queued there after it
//! waits for the exchange, so the host never waits; the exception is the fused step's gradients, whose
//! means start range by range as the backward pass finishes them and run beside the rest of it, until
//! `finish_device_means` (under ZeRO-1 each range's mean goes only to the ranks whose shards hold it, and
//! the updated shards come back from their owners after the optimizer). The graph path's per-parameter
//! gradients are averaged in place in one NCCL group (one launch for all of them, as DDP's buckets), and
//! the weights are broadcast from rank 0 at join.

use std::ffi::{c_char, CStr};
use std::ops::Range;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Result, Tensor, Var};
use cudarc::driver::{sys, CudaSlice, CudaStream, CudaViewMut, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::result::{NcclError, NcclStatus};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp};

use crate::collective::{shard, Collective};
use crate::rendezvous::Rendezvous;

pub(crate) struct NcclWorld {
    /// Runs on its own stream, `comm.stream()`.
    comm: Comm,
    /// candle's stream of this rank's GPU.
    compute: Arc<CudaStream>,
}

impl NcclWorld {
    /// Meets the other ranks at `rendezvous` and makes the NCCL communicator on `device`'s stream; returns when
    /// every rank has (NCCL's initialisation is itself collective).
    pub(crate) fn open(device: &Device, rendezvous: &Rendezvous) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            candle_core::bail!(
                "NCCL exchanges GPU memory and this model is on the CPU; use --device=cuda (data-parallel runs on the CPU use the MPI build: npm run build:native:mpi)"
            );
        };
        let id = rendezvous.share(|| {
            let id = Id::new().map_err(|e| nccl_error("rank 0 cannot make NCCL's unique id", e))?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        })?;
        let internal: [c_char; 128] = id.iter().map(|&b| b as c_char).collect::<Vec<_>>().try_into().map_err(|bytes: Vec<c_char>| {
            candle_core::Error::Msg(format!("rank 0 sent {} bytes for NCCL's 128-byte unique id", bytes.len()))
        })?;
        let compute = cuda.cuda_stream();
        // NCCL makes the communicator on the calling thread's current device.
        compute.context().bind_to_thread().map_err(driver_error)?;
        let stream = compute.context().new_stream().map_err(driver_error)?;
        let comm = Comm::from_rank(stream, rendezvous.rank, rendezvous.world_size, Id::uninit(internal)).map_err(|e| {
            nccl_error(&format!("rank {} of {} cannot make the NCCL communicator", rendezvous.rank, rendezvous.world_size), e)
        })?;
        Ok(Self { comm, compute })
    }

    /// Queues `exchange` on the communicator's stream behind the work queued on the compute stream, and
    /// makes the compute stream's later work wait for it.
    fn ordered<T>(&self, exchange: impl FnOnce() -> Result<T>) -> Result<T> {
        let stream = self.comm.stream();
        stream.join(&self.compute).map_err(driver_error)?;
        let done = exchange();
        self.compute.join(&stream).map_err(driver_error)?;
        done
    }

    /// Runs `op` on a device copy of `host` and copies the result back: the host-memory side of [`Collective`].
    fn staged(&self, host: &mut [f32], what: &str, op: impl FnOnce(&Comm, &mut CudaSlice<f32>) -> NcclResult) -> Result<()> {
        let driver = |e: cudarc::driver::DriverError| candle_core::Error::Msg(format!("NCCL {what}: CUDA driver: {e}"));
        let mut buffer = self.compute.clone_htod(host).map_err(driver)?;
        self.ordered(|| op(&self.comm, &mut buffer).map(|_| ()).map_err(|e| nccl_error(&format!("NCCL {what} failed"), e)))?;
        self.compute.memcpy_dtoh(&buffer, host).map_err(driver)?;
        self.compute.synchronize().map_err(driver)
    }

    /// Applies `exchange` in place to every tensor, queued as one NCCL group.
    fn exchange<'t>(&self, tensors: impl IntoIterator<Item = &'t Tensor>, exchange: Exchange) -> Result<()> {
        let op = InPlace { comm: &self.comm, exchange };
        self.ordered(|| {
            group_start().map_err(|e| nccl_error("NCCL group start", e))?;
            let queued = tensors.into_iter().try_for_each(|t| t.inplace_op1(&op));
            // The group is closed whatever happened, or NCCL would hold every later call.
            let launched = group_end().map_err(|e| nccl_error(exchange.describe(), e));
            queued.and(launched.map(|_| ()))
        })
    }

    /// The `len` f32 values at `addr`, for NCCL's calls on the communicator's stream.
    fn device_values(&self, addr: u64, len: usize) -> RawDeviceSlice {
        RawDeviceSlice { addr, len, stream: self.comm.stream() }
    }

    /// The mean over the ranks of the `len` f32 values at `addr`, in place, queued on the communicator's stream.
    fn mean_in_place(&self, addr: u64, len: usize) -> Result<()> {
        let mut values = self.device_values(addr, len);
        self.comm.all_reduce_in_place(&mut values, &ReduceOp::Avg).map(|_| ()).map_err(|e| nccl_error(Exchange::Mean.describe(), e))
    }

    /// Queues `per_shard` for the part of `range` in each rank's [`shard`] of a `len`-long buffer at `addr`,
    /// as one NCCL group: ZeRO-1's shards are uneven where `len` does not divide, which NCCL's reduce-scatter
    /// and all-gather (equal counts) do not allow, and a group of one reduce or broadcast per shard moves
    /// the same bytes.
    fn per_shard(
        &self,
        addr: u64,
        len: usize,
        range: Range<usize>,
        what: &str,
        per_shard: impl Fn(&Comm, &mut RawDeviceSlice, i32) -> NcclResult,
    ) -> Result<()> {
        group_start().map_err(|e| nccl_error("NCCL group start", e))?;
        let world_size = self.world_size();
        let queued = (0..world_size).try_for_each(|owner| {
            let owned = shard(len, world_size, owner);
            let part = owned.start.max(range.start)..owned.end.min(range.end);
            if part.is_empty() {
                return Ok(());
            }
            let mut values = self.device_values(addr + (part.start * 4) as u64, part.len());
            per_shard(&self.comm, &mut values, owner as i32).map(|_| ()).map_err(|e| nccl_error(what, e))
        });
        // The group is closed whatever happened, or NCCL would hold every later call.
        let launched = group_end().map_err(|e| nccl_error(what, e));
        queued.and(launched.map(|_| ()))
    }
}

type NcclResult = std::result::Result<NcclStatus, NcclError>;

/// Device memory the engine allocated itself (the fused GPU step's buffers), used on the communicator's
/// stream: `NcclWorld` orders that stream against the compute stream, so there is nothing to record.
struct RawDeviceSlice {
    addr: u64,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceSlice<f32> for RawDeviceSlice {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl DevicePtrMut<f32> for RawDeviceSlice {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.addr, SyncOnDrop::Sync(None))
    }
}

/// An NCCL failure as one line: what was being done, NCCL's code and its description.
fn nccl_error(what: &str, e: NcclError) -> candle_core::Error {
    // SAFETY: NCCL returns a static string for every result code.
    let text = unsafe { CStr::from_ptr(cudarc::nccl::sys::ncclGetErrorString(e.0)) }.to_string_lossy();
    candle_core::Error::Msg(format!("{what}: {:?} ({text})", e.0))
}

#[derive(Clone, Copy)]
enum Exchange {
    /// Every rank's tensor becomes the mean over the ranks (NCCL's `ncclAvg`).
    Mean,
    /// Every rank's tensor becomes this rank's.
    BroadcastFrom(usize),
}

impl Exchange {
    fn describe(self) -> &'static str {
        match self {
            Exchange::Mean => "NCCL all-reduce of the gradients failed",
            Exchange::BroadcastFrom(_) => "NCCL broadcast of the weights failed",
        }
    }
}

/// The exchange as a candle in-place op: the only way to a tensor's device memory for writing.
struct InPlace<'a> {
    comm: &'a Comm,
    exchange: Exchange,
}

impl InPlace<'_> {
    fn run(&self, mut view: CudaViewMut<'_, f32>) -> Result<()> {
        let done = match self.exchange {
            Exchange::Mean => self.comm.all_reduce_in_place(&mut view, &ReduceOp::Avg),
            Exchange::BroadcastFrom(root) => self.comm.broadcast_in_place(&mut view, root as i32),
        };
        done.map(|_| ()).map_err(|e| nccl_error(self.exchange.describe(), e))
    }
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        candle_core::bail!("NCCL exchanges GPU memory, and this tensor is on the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL exchanges contiguous tensors only");
        };
        if storage.dtype() != DType::F32 {
            // The master weights and their gradients are f32 in every precision.
            candle_core::bail!("NCCL exchanges f32 weights and gradients, not {:?}", storage.dtype());
        }
        self.run(storage.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
    }
}

impl Collective for NcclWorld {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]) {
        self.staged(bucket, "all-reduce", |comm, buffer| comm.all_reduce_in_place(buffer, &ReduceOp::Sum))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) {
        self.staged(buffer, "broadcast", |comm, device| comm.broadcast_in_place(device, root as i32)).unwrap_or_else(|e| panic!("{e}"));
    }

    /// An all-reduce of one number, waited for: as torch.distributed's barrier on NCCL.
    fn barrier(&self) {
        self.staged(&mut [0f32], "barrier", |comm, buffer| comm.all_reduce_in_place(buffer, &ReduceOp::Sum))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// On the device, also with one rank (so that a run of one exercises the same path).
    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        // Gradients are fresh tensors of the backward pass, so writing them in place touches nothing else.
        for tensor in tensors.iter_mut().filter(|t| !t.is_contiguous()) {
            *tensor = tensor.contiguous()?;
        }
        self.exchange(tensors.iter(), Exchange::Mean)
    }

    fn broadcast_vars(&mut self, vars: &[Var], root: usize) -> Result<()> {
        self.exchange(vars.iter().map(Var::as_tensor), Exchange::BroadcastFrom(root))
    }

    /// In place, on the device, behind the backward pass and ahead of the optimizer, also with one rank.
    fn all_reduce_mean_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.ordered(|| self.mean_in_place(addr, len))?;
        Ok(true)
    }

    fn start_mean_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.comm.stream().join(&self.compute).map_err(driver_error)?;
        self.mean_in_place(addr, len)?;
        Ok(true)
    }

    fn start_reduce_scatter_mean_device(&mut self, addr: u64, len: usize, range: Range<usize>) -> Result<bool> {
        self.comm.stream().join(&self.compute).map_err(driver_error)?;
        self.per_shard(addr, len, range, "NCCL reduce of the gradients onto their shards' ranks failed", |comm, values, owner| {
            comm.reduce_in_place(values, &ReduceOp::Avg, owner)
        })?;
        Ok(true)
    }

    fn all_reduce_sum_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.ordered(|| {
            let mut values = self.device_values(addr, len);
            self.comm
                .all_reduce_in_place(&mut values, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_error("NCCL all-reduce of the step's sums failed", e))
        })?;
        Ok(true)
    }

    fn all_gather_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.ordered(|| {
            self.per_shard(addr, len, 0..len, "NCCL broadcast of the updated weights' shards failed", |comm, values, owner| {
                comm.broadcast_in_place(values, owner)
            })
        })?;
        Ok(true)
    }

    fn finish_device_means(&mut self) -> Result<()> {
        self.compute.join(&self.comm.stream()).map_err(driver_error)
    }
}

fn driver_error(e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA driver: {e}"))
}
