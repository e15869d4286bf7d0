//! Communication between the processes of a data-parallel run, as PyTorch's DDP does it: every
//! process (rank) holds the whole model, trains on its own batches, and before each optimizer step
//! the flat gradient buffer is averaged across ranks, so every rank takes the same step. The
//! weights start equal because rank 0's are broadcast to the others. Under ZeRO stage 1 each rank
//! keeps AdamW's moments for its own [`shard`] of the flat buffer only: the gradients are
//! reduce-scattered, each rank updates its shard, and the updated weights are all-gathered.
//!
//! [`SingleProcess`] is a run of one; [`open_mpi`] joins the ranks `mpirun` started (only in a build
//! with the `mpi` feature: OpenMPI through the `mpi` crate); [`open_nccl`] joins the ranks `torchrun`
//! started, each on its own GPU (only in a build with the `nccl` feature, `collective_nccl.rs`).
//! [`Watchdog`] bounds how long any backend's calls may wait for the other ranks.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};

use crate::rendezvous::Rendezvous;

/// Elements per all-reduce call: 4 MiB of f32. Each call is one MPI message of at most this size,
/// so the MPI backend's staging buffer stays small whatever the model's size.
pub const BUCKET_LEN: usize = 1 << 20;

/// The elements of a `len`-long flat buffer that rank `rank` of `world_size` owns under ZeRO stage 1:
/// consecutive shards of `len / world_size` rounded up, the last ones shorter (or empty).
pub fn shard(len: usize, world_size: usize, rank: usize) -> Range<usize> {
    let size = len.div_ceil(world_size);
    (rank * size).min(len)..((rank + 1) * size).min(len)
}

/// The ranks of a data-parallel run, from the point of view of one of them.
pub trait Collective {
    /// This process's number, 0..world_size.
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Replaces every element of `bucket` (at most [`BUCKET_LEN`] long) by its sum over all ranks.
    fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]);

    /// Replaces `buffer` on every rank by rank `root`'s.
    fn broadcast(&mut self, buffer: &mut [f32], root: usize);

    /// Returns once every rank has called it.
    fn barrier(&self);

    /// Replaces every element of `buffer` by its mean over all ranks, [`BUCKET_LEN`] elements at a time.
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) {
        if self.world_size() == 1 {
            return;
        }
        let scale = 1.0 / self.world_size() as f32;
        for bucket in buffer.chunks_mut(BUCKET_LEN) {
            self.all_reduce_sum_bucket(bucket);
            bucket.iter_mut().for_each(|g| *g *= scale);
        }
    }

    /// Replaces every value by its sum over all ranks: a step's partial sums, a few values, which go
    /// through f32.
    fn all_reduce_sum(&mut self, values: &mut [f64]) {
        if self.world_size() == 1 {
            return;
        }
        let mut single: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        single.chunks_mut(BUCKET_LEN).for_each(|bucket| self.all_reduce_sum_bucket(bucket));
        values.iter_mut().zip(single).for_each(|(v, s)| *v = s as f64);
    }

    /// ZeRO-1's gradient exchange: leaves this rank's [`shard`] of `buffer` holding its mean over all
    /// ranks, and the rest of `buffer` undefined. This default all-reduces the whole buffer; a backend
    /// that reduces each shard onto its owner sends half the bytes.
    fn reduce_scatter_mean(&mut self, buffer: &mut [f32]) {
        self.all_reduce_mean(buffer);
    }

    /// ZeRO-1's weight exchange: every rank's [`shard`] of `buffer` to every rank, each broadcast by
    /// its owner (as many bytes as an all-gather).
    fn all_gather(&mut self, buffer: &mut [f32]) {
        let world_size = self.world_size();
        for root in 0..world_size {
            let owned = shard(buffer.len(), world_size, root);
            self.broadcast(&mut buffer[owned], root);
        }
    }

    /// Whether `flag` is set on any rank, so that all of them take the same decision (e.g. to stop
    /// after the same step rather than leave the others waiting for a rank that left).
    fn any_rank(&mut self, flag: bool) -> bool {
        if self.world_size() == 1 {
            return flag;
        }
        let mut count = [f32::from(u8::from(flag))];
        self.all_reduce_sum_bucket(&mut count);
        count[0] > 0.0
    }

    /// Replaces every tensor (the graph path's per-parameter gradients) by its mean over all ranks. This
    /// default goes through host memory; a GPU backend reduces on the device.
    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> candle_core::Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        for tensor in tensors.iter_mut() {
            let mut host = tensor.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.all_reduce_mean(&mut host);
            *tensor = Tensor::from_vec(host, tensor.shape(), tensor.device())?.to_dtype(tensor.dtype())?;
        }
        Ok(())
    }

    /// Replaces the `len` f32 values at device address `addr` (the fused GPU step's flat gradients, on this
    /// rank's GPU) by their mean over all ranks, queued on the device; returns false, having done nothing,
    /// where the backend exchanges host memory only (the caller then goes through host memory).
    fn all_reduce_mean_device(&mut self, _addr: u64, _len: usize) -> candle_core::Result<bool> {
        Ok(self.world_size() == 1)
    }

    /// Starts replacing the `len` f32 values at device address `addr` (a finished part of the fused GPU
    /// step's gradients) by their mean over all ranks, on the device: it reads them once the work queued
    /// before has finished, and runs beside the work queued after, until [`Collective::finish_device_means`].
    /// Returns false, having done nothing, where the backend exchanges host memory only.
    fn start_mean_device(&mut self, _addr: u64, _len: usize) -> candle_core::Result<bool> {
        Ok(self.world_size() == 1)
    }

    /// ZeRO-1's [`Collective::start_mean_device`]: starts averaging the elements `range` of the `len` f32
    /// values at device address `addr` (the fused GPU step's flat gradients) onto the ranks whose [`shard`]s
    /// hold them, leaving the rest of the range undefined. Returns false, having done nothing, where the
    /// backend exchanges host memory only.
    fn start_reduce_scatter_mean_device(&mut self, _addr: u64, _len: usize, _range: Range<usize>) -> candle_core::Result<bool> {
        Ok(self.world_size() == 1)
    }

    /// Replaces the `len` f32 values at device address `addr` (a step's partial sums) by their sum over all
    /// ranks, queued on the device; returns false, having done nothing, where the backend exchanges host
    /// memory only.
    fn all_reduce_sum_device(&mut self, _addr: u64, _len: usize) -> candle_core::Result<bool> {
        Ok(self.world_size() == 1)
    }

    /// ZeRO-1's weight exchange on the device: every rank's [`shard`] of the `len` f32 values at device
    /// address `addr` to every rank, queued there; returns false, having done nothing, where the backend
    /// exchanges host memory only.
    fn all_gather_device(&mut self, _addr: u64, _len: usize) -> candle_core::Result<bool> {
        Ok(self.world_size() == 1)
    }

    /// Makes the work queued from now on wait for every mean that [`Collective::start_mean_device`] or
    /// [`Collective::start_reduce_scatter_mean_device`] started.
    fn finish_device_means(&mut self) -> candle_core::Result<()> {
        Ok(())
    }

    /// Runs `wait`, which waits for the device to finish the exchanges queued there (a device path's means
    /// return before the other ranks have taken part), under the same bound as a call that waits for them.
    fn wait_for_device(&mut self, wait: &mut dyn FnMut() -> candle_core::Result<()>) -> candle_core::Result<()> {
        wait()
    }

    /// Replaces every variable (the graph path's weights) on every rank by rank `root`'s. This default goes
    /// through host memory; a GPU backend broadcasts on the device.
    fn broadcast_vars(&mut self, vars: &[Var], root: usize) -> candle_core::Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        for var in vars {
            let mut host = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.broadcast(&mut host, root);
            var.set(&Tensor::from_vec(host, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// A run of one process: nothing to exchange.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum_bucket(&mut self, _bucket: &mut [f32]) {}

    fn broadcast(&mut self, _buffer: &mut [f32], _root: usize) {}

    fn barrier(&self) {}
}

/// The calls a [`Watchdog`] names when one of them times out, by their index in `CALLS`.
const CALLS: [&str; 7] = [
    "an all-reduce",
    // The engine averages only the gradients.
    "the gradient all-reduce",
    "the all-reduce of a stop or save flag",
    "a broadcast",
    "a barrier",
    "the gradient reduce-scatter",
    "the all-gather of the weights",
];
const ALL_REDUCE: usize = 0;
const ALL_REDUCE_MEAN: usize = 1;
const ANY_RANK: usize = 2;
const BROADCAST: usize = 3;
const BARRIER: usize = 4;
const REDUCE_SCATTER: usize = 5;
const ALL_GATHER: usize = 6;

/// How often the watchdog's thread wakes, to notice that this process was stopped for a while.
const POLL: Duration = Duration::from_millis(100);
/// How much later than asked the watchdog's thread may wake before it takes this process to have been
/// suspended: far more than a busy machine delays a thread, far less than anyone stops a process for.
const SUSPENDED: Duration = Duration::from_millis(200);

/// A [`Collective`] whose calls may wait at most `timeout` for the other ranks. A rank that hangs
/// without dying (stopped, deadlocked) would leave the others inside the backend's call forever:
/// the watchdog's thread, which never calls the backend, sees the call outlive its deadline, prints
/// one line that says so on stderr and ends this process with exit code 1, so that the launcher
/// (mpirun) stops the whole job.
pub struct Watchdog {
    inner: Box<dyn Collective>,
    watch: Arc<Watch>,
    thread: Option<JoinHandle<()>>,
}

/// What the calling thread and the watchdog's thread share.
struct Watch {
    timeout: Duration,
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the call in progress times out; 0 while none is.
    deadline_ns: AtomicU64,
    /// The call in progress, an index into `CALLS`.
    call: AtomicUsize,
    closing: AtomicBool,
}

impl Watchdog {
    pub fn new(inner: Box<dyn Collective>, timeout: Duration) -> Self {
        Self::with_action(inner, timeout, Box::new(exit_on_timeout))
    }

    /// `on_timeout` receives the line that names the problem and the fix.
    fn with_action(inner: Box<dyn Collective>, timeout: Duration, on_timeout: Box<dyn Fn(&str) + Send>) -> Self {
        let watch = Arc::new(Watch {
            timeout,
            epoch: Instant::now(),
            deadline_ns: AtomicU64::new(0),
            call: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
        });
        let rank = inner.rank();
        let seconds = timeout.as_secs_f64();
        let watched = Arc::clone(&watch);
        let thread = thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || {
                // Parked between polls; woken at the deadline of the call in progress, or by drop.
                while !watched.closing.load(Ordering::Acquire) {
                    let deadline_ns = watched.deadline_ns.load(Ordering::Acquire);
                    let now = watched.epoch.elapsed();
                    let pause = if deadline_ns == 0 {
                        POLL
                    } else if (now.as_nanos() as u64) < deadline_ns {
                        Duration::from_nanos(deadline_ns - now.as_nanos() as u64).min(POLL)
                    } else {
                        let call = CALLS[watched.call.load(Ordering::Acquire)];
                        on_timeout(&format!(
                            "error: rank {rank} waited {seconds} s in {call} for the other ranks; one of them is hung \
                             (or rank 0 evaluated for longer than that); the job was stopped; resume from the last \
                             checkpoint with --init_from=resume, or raise ddp_timeout"
                        ));
                        return;
                    };
                    thread::park_timeout(pause);
                    // Woken much later than asked, this process did not run in between (stopped by SIGSTOP or
                    // Ctrl-Z, then continued): the call did not wait for the others all that time, and the rank
                    // that was stopped must not blame the others. The deadline moves by as much (less at most one
                    // poll), unless the call ended or another began meanwhile.
                    let late = watched.epoch.elapsed().saturating_sub(now + pause);
                    let deadline_ns = watched.deadline_ns.load(Ordering::Acquire);
                    if late > SUSPENDED && deadline_ns != 0 {
                        let moved = deadline_ns + late.as_nanos() as u64;
                        let _ = watched.deadline_ns.compare_exchange(deadline_ns, moved, Ordering::AcqRel, Ordering::Acquire);
                    }
                }
            })
            .expect("the watchdog thread starts");
        Self { inner, watch, thread: Some(thread) }
    }
}

impl Watch {
    /// Starts the clock on `call`; it stops when the returned guard drops.
    fn begin(&self, call: usize) -> InCall<'_> {
        let deadline = self.epoch.elapsed() + self.timeout;
        self.call.store(call, Ordering::Release);
        self.deadline_ns.store(deadline.as_nanos() as u64, Ordering::Release);
        InCall(self)
    }
}

/// A collective call in progress.
struct InCall<'a>(&'a Watch);

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        self.0.deadline_ns.store(0, Ordering::Release);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.watch.closing.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Collective for Watchdog {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]) {
        let _call = self.watch.begin(ALL_REDUCE);
        self.inner.all_reduce_sum_bucket(bucket);
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) {
        let _call = self.watch.begin(BROADCAST);
        self.inner.broadcast(buffer, root);
    }

    fn barrier(&self) {
        let _call = self.watch.begin(BARRIER);
        self.inner.barrier();
    }

    // The backend's own versions, which may do better than one call per bucket.
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) {
        let _call = self.watch.begin(ALL_REDUCE_MEAN);
        self.inner.all_reduce_mean(buffer);
    }

    fn any_rank(&mut self, flag: bool) -> bool {
        let _call = self.watch.begin(ANY_RANK);
        self.inner.any_rank(flag)
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) {
        let _call = self.watch.begin(ALL_REDUCE);
        self.inner.all_reduce_sum(values);
    }

    fn reduce_scatter_mean(&mut self, buffer: &mut [f32]) {
        let _call = self.watch.begin(REDUCE_SCATTER);
        self.inner.reduce_scatter_mean(buffer);
    }

    fn all_gather(&mut self, buffer: &mut [f32]) {
        let _call = self.watch.begin(ALL_GATHER);
        self.inner.all_gather(buffer);
    }

    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> candle_core::Result<()> {
        let _call = self.watch.begin(ALL_REDUCE_MEAN);
        self.inner.all_reduce_mean_tensors(tensors)
    }

    fn all_reduce_mean_device(&mut self, addr: u64, len: usize) -> candle_core::Result<bool> {
        let _call = self.watch.begin(ALL_REDUCE_MEAN);
        self.inner.all_reduce_mean_device(addr, len)
    }

    fn start_mean_device(&mut self, addr: u64, len: usize) -> candle_core::Result<bool> {
        let _call = self.watch.begin(ALL_REDUCE_MEAN);
        self.inner.start_mean_device(addr, len)
    }

    fn start_reduce_scatter_mean_device(&mut self, addr: u64, len: usize, range: Range<usize>) -> candle_core::Result<bool> {
        let _call = self.watch.begin(REDUCE_SCATTER);
        self.inner.start_reduce_scatter_mean_device(addr, len, range)
    }

    fn all_reduce_sum_device(&mut self, addr: u64, len: usize) -> candle_core::Result<bool> {
        let _call = self.watch.begin(ALL_REDUCE);
        self.inner.all_reduce_sum_device(addr, len)
    }

    fn all_gather_device(&mut self, addr: u64, len: usize) -> candle_core::Result<bool> {
        let _call = self.watch.begin(ALL_GATHER);
        self.inner.all_gather_device(addr, len)
    }

    fn finish_device_means(&mut self) -> candle_core::Result<()> {
        let _call = self.watch.begin(ALL_REDUCE_MEAN);
        self.inner.finish_device_means()
    }

    fn wait_for_device(&mut self, wait: &mut dyn FnMut() -> candle_core::Result<()>) -> candle_core::Result<()> {
        let _call = self.watch.begin(ALL_REDUCE_MEAN);
        self.inner.wait_for_device(wait)
    }

    fn broadcast_vars(&mut self, vars: &[Var], root: usize) -> candle_core::Result<()> {
        let _call = self.watch.begin(BROADCAST);
        self.inner.broadcast_vars(vars, root)
    }
}

/// Prints `message` and ends the process at once, from the watchdog's thread.
fn exit_on_timeout(message: &str) {
    eprintln!("{message}");
    // Without running exit handlers: the main thread is inside the backend's call, whose state they may need.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: _exit only ends the process.
    unsafe {
        libc::_exit(1)
    };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    std::process::exit(1);
}

/// The world of the processes `mpirun` started, initialising MPI on the first call.
#[cfg(feature = "mpi")]
pub fn open_mpi() -> candle_core::Result<Box<dyn Collective>> {
    Ok(Box::new(mpi_world::MpiWorld::open()?))
}

#[cfg(not(feature = "mpi"))]
pub fn open_mpi() -> candle_core::Result<Box<dyn Collective>> {
    candle_core::bail!("this engine build has no MPI; build the one that has with `npm run build:native:mpi` (needs OpenMPI)")
}

/// The world of the ranks `torchrun` started (or any launcher that sets its variables), this one on `device`
/// (its GPU, `cuda:LOCAL_RANK`): they meet at `rendezvous` (`MASTER_ADDR:MASTER_PORT`), where rank 0 hands out
/// NCCL's unique id, then exchange gradients and weights over NCCL on the device.
#[cfg(feature = "nccl")]
pub fn open_nccl(device: &Device, rendezvous: &Rendezvous) -> candle_core::Result<Box<dyn Collective>> {
    Ok(Box::new(crate::collective_nccl::NcclWorld::open(device, rendezvous)?))
}

#[cfg(not(feature = "nccl"))]
pub fn open_nccl(_device: &Device, _rendezvous: &Rendezvous) -> candle_core::Result<Box<dyn Collective>> {
    candle_core::bail!("this engine build has no NCCL; build the one that has with `npm run build:cuda:nccl`")
}

/// Finalises MPI if [`open_mpi`] initialised it (a no-op otherwise). Call it once, when every rank
/// has finished: MPI cannot be used again in this process.
pub fn finalize_mpi() {
    #[cfg(feature = "mpi")]
    mpi_world::finalize();
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use std::sync::Mutex;

    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator, CommunicatorCollectives, Root};
    use mpi::Threading;

    use super::{shard, Collective, BUCKET_LEN};

    /// The MPI environment, kept until [`finalize`]: dropping it calls MPI_Finalize.
    static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);
    /// Whether MPI was finalised: it cannot be initialised again.
    static FINALIZED: Mutex<bool> = Mutex::new(false);

    pub(super) struct MpiWorld {
        world: SimpleCommunicator,
        /// MPI all-reduces from one buffer into another; the bucket is copied here first.
        staging: Vec<f32>,
    }

    impl MpiWorld {
        pub(super) fn open() -> candle_core::Result<Self> {
            let mut universe = UNIVERSE.lock().expect("no panic while initialising MPI");
            if universe.is_none() {
                if *FINALIZED.lock().expect("no panic while finalising MPI") {
                    candle_core::bail!("MPI was finalised by an earlier data-parallel run in this process; start one run per process");
                }
                // Only Node's main thread calls MPI; the engine's worker threads never do.
                let (opened, _) = mpi::initialize_with_threading(Threading::Funneled)
                    .ok_or_else(|| candle_core::Error::Msg("MPI was initialised by something else in this process".into()))?;
                *universe = Some(opened);
            }
            let world = universe.as_ref().expect("just initialised").world();
            Ok(Self { world, staging: Vec::new() })
        }
    }

    impl Collective for MpiWorld {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn world_size(&self) -> usize {
            self.world.size() as usize
        }

        fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]) {
            debug_assert!(bucket.len() <= BUCKET_LEN);
            self.staging.clear();
            self.staging.extend_from_slice(bucket);
            self.world.all_reduce_into(&self.staging[..], bucket, SystemOperation::sum());
        }

        /// Each shard is summed onto its owner alone (MPI_Reduce, bucket by bucket), not onto every rank.
        fn reduce_scatter_mean(&mut self, buffer: &mut [f32]) {
            let (rank, world_size) = (self.rank(), self.world_size());
            if world_size == 1 {
                return;
            }
            for owner in 0..world_size {
                let root = self.world.process_at_rank(owner as i32);
                let owned = shard(buffer.len(), world_size, owner);
                for bucket in buffer[owned].chunks_mut(BUCKET_LEN) {
                    if owner == rank {
                        self.staging.clear();
                        self.staging.extend_from_slice(bucket);
                        root.reduce_into_root(&self.staging[..], bucket, SystemOperation::sum());
                    } else {
                        root.reduce_into(&bucket[..], SystemOperation::sum());
                    }
                }
            }
            let (scale, mine) = (1.0 / world_size as f32, shard(buffer.len(), world_size, rank));
            buffer[mine].iter_mut().for_each(|g| *g *= scale);
        }

        fn broadcast(&mut self, buffer: &mut [f32], root: usize) {
            let root = self.world.process_at_rank(root as i32);
            // MPI counts elements in an i32.
            for bucket in buffer.chunks_mut(BUCKET_LEN) {
                root.broadcast_into(bucket);
            }
        }

        fn barrier(&self) {
            self.world.barrier();
        }
    }

    pub(super) fn finalize() {
        if let Some(universe) = UNIVERSE.lock().expect("no panic while initialising MPI").take() {
            *FINALIZED.lock().expect("no panic while finalising MPI") = true;
            drop(universe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_buffer_once_in_rank_order() {
        for (len, world_size) in [(10, 4), (2, 4), (12, 3), (0, 2), (7, 1)] {
            let shards: Vec<_> = (0..world_size).map(|rank| shard(len, world_size, rank)).collect();
            assert_eq!((shards[0].start, shards[world_size - 1].end), (0, len));
            assert!(shards.windows(2).all(|pair| pair[0].end == pair[1].start));
            assert!(shards.iter().all(|s| s.len() <= len.div_ceil(world_size)));
        }
        assert_eq!(shard(10, 4, 3), 9..10);
        assert_eq!(shard(2, 4, 3), 2..2);
    }

    #[test]
    fn single_process_all_reduce_leaves_the_buffer() {
        let original: Vec<f32> = (0..BUCKET_LEN * 2 + 123).map(|i| (i as f32).sin()).collect();
        let mut buffer = original.clone();
        SingleProcess.all_reduce_mean(&mut buffer);
        assert_eq!(buffer, original);
        SingleProcess.broadcast(&mut buffer, 0);
        assert_eq!(buffer, original);
    }

    /// Ranks that all hold the same buffer: the sum over them is `world_size` times each bucket.
    struct Replicas {
        world_size: usize,
        buckets: Vec<usize>,
    }

    impl Collective for Replicas {
        fn rank(&self) -> usize {
            0
        }

        fn world_size(&self) -> usize {
            self.world_size
        }

        fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]) {
            self.buckets.push(bucket.len());
            bucket.iter_mut().for_each(|g| *g *= self.world_size as f32);
        }

        fn broadcast(&mut self, _buffer: &mut [f32], _root: usize) {}

        fn barrier(&self) {}
    }

    #[test]
    fn all_reduce_mean_goes_bucket_by_bucket_and_divides_by_the_world_size() {
        let original: Vec<f32> = (0..BUCKET_LEN * 2 + 123).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut buffer = original.clone();
        let mut replicas = Replicas { world_size: 4, buckets: Vec::new() };
        replicas.all_reduce_mean(&mut buffer);
        assert_eq!(replicas.buckets, [BUCKET_LEN, BUCKET_LEN, 123]);
        // The mean of four equal values is that value: multiplying by 4 and by 0.25 is exact.
        assert_eq!(buffer, original);
    }

    /// Rank 1 of two, whose peers answer each call after `delay`, or, without one, only once the
    /// watchdog's action releases the call (a peer that hangs).
    struct Peers {
        delay: Option<Duration>,
        released: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    }

    impl Peers {
        fn wait(&self) {
            match self.delay {
                Some(delay) => thread::sleep(delay),
                None => {
                    let (lock, freed) = &*self.released;
                    let mut released = lock.lock().unwrap();
                    while !*released {
                        released = freed.wait(released).unwrap();
                    }
                }
            }
        }
    }

    impl Collective for Peers {
        fn rank(&self) -> usize {
            1
        }

        fn world_size(&self) -> usize {
            2
        }

        fn all_reduce_sum_bucket(&mut self, _bucket: &mut [f32]) {
            self.wait();
        }

        fn broadcast(&mut self, _buffer: &mut [f32], _root: usize) {
            self.wait();
        }

        fn barrier(&self) {
            self.wait();
        }
    }

    /// A watchdog over `Peers` whose action records the message and releases the hung call.
    fn watched(delay: Option<Duration>, timeout: Duration) -> (Watchdog, Arc<std::sync::Mutex<Vec<String>>>) {
        let released = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let messages = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (release, record) = (Arc::clone(&released), Arc::clone(&messages));
        let on_timeout = Box::new(move |message: &str| {
            record.lock().unwrap().push(message.to_string());
            *release.0.lock().unwrap() = true;
            release.1.notify_all();
        });
        (Watchdog::with_action(Box::new(Peers { delay, released }), timeout, on_timeout), messages)
    }

    #[test]
    fn watchdog_stops_a_call_that_waits_past_the_timeout() {
        let timeout = Duration::from_millis(250);
        let (mut watchdog, messages) = watched(None, timeout);
        let start = Instant::now();
        watchdog.all_reduce_mean(&mut [1.0; 8]);
        let waited = start.elapsed();
        assert!(waited >= timeout && waited < timeout * 8, "waited {waited:?}");
        assert_eq!(
            *messages.lock().unwrap(),
            ["error: rank 1 waited 0.25 s in the gradient all-reduce for the other ranks; one of them is hung (or rank 0 \
              evaluated for longer than that); the job was stopped; resume from the last checkpoint with \
              --init_from=resume, or raise ddp_timeout"]
        );
    }

    #[test]
    fn watchdog_names_the_call_that_hung() {
        let (watchdog, messages) = watched(None, Duration::from_millis(50));
        watchdog.barrier();
        let (mut watchdog_of_flag, flag_messages) = watched(None, Duration::from_millis(50));
        watchdog_of_flag.any_rank(true);
        assert!(messages.lock().unwrap()[0].contains(" in a barrier for the other ranks;"));
        assert!(flag_messages.lock().unwrap()[0].contains(" in the all-reduce of a stop or save flag for the other ranks;"));
        // A device that never finishes the gradients' means queued there (a peer hung inside NCCL's kernels).
        let (mut device, device_messages) = watched(None, Duration::from_millis(50));
        let (stopped, start) = (Arc::clone(&device_messages), Instant::now());
        device
            .wait_for_device(&mut || {
                while stopped.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(5) {
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            })
            .unwrap();
        let messages = device_messages.lock().unwrap();
        assert!(messages.first().is_some_and(|m| m.contains(" in the gradient all-reduce for the other ranks;")), "{messages:?}");
    }

    #[test]
    fn watchdog_lets_calls_within_the_timeout_run_for_longer_in_all() {
        // Twenty calls of 25 ms each take twice the timeout together, none of them alone.
        let (mut watchdog, messages) = watched(Some(Duration::from_millis(25)), Duration::from_millis(250));
        let start = Instant::now();
        for _ in 0..10 {
            watchdog.all_reduce_mean(&mut [1.0; 8]);
            watchdog.broadcast(&mut [1.0; 8], 0);
        }
        assert!(start.elapsed() >= Duration::from_millis(500));
        assert!(messages.lock().unwrap().is_empty());
        // Dropping it ends its thread at once, not at the next timeout.
        let (idle, _) = watched(None, Duration::from_secs(600));
        let start = Instant::now();
        drop(idle);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn any_rank_is_the_flag_alone_and_else_asks_the_others() {
        assert!(SingleProcess.any_rank(true));
        assert!(!SingleProcess.any_rank(false));
        // Four ranks agreeing that none is set, or that one is: the sum over them is 4 times each rank's.
        assert!(!Replicas { world_size: 4, buckets: Vec::new() }.any_rank(false));
        let mut replicas = Replicas { world_size: 4, buckets: Vec::new() };
        assert!(replicas.any_rank(true));
        assert_eq!(replicas.buckets, [1]);
    }
}
