//! Communication between the processes of a data-parallel run, as PyTorch's DDP does it: every
//! process (rank) holds the whole model, trains on its own batches, and before each optimizer step
//! the flat gradient buffer is averaged across ranks, so every rank takes the same step. The
//! weights start equal because rank 0's are broadcast to the others.
//!
//! [`SingleProcess`] is a run of one; [`open_mpi`] joins the ranks `mpirun` started (only in a build
//! with the `mpi` feature: OpenMPI through the `mpi` crate); [`open_nccl`] joins the ranks `torchrun`
//! started, each on its own GPU (only in a build with the `nccl` feature, `collective_nccl.rs`).

use candle_core::{DType, Device, Tensor, Var};

use crate::rendezvous::Rendezvous;

/// Elements per all-reduce call: 4 MiB of f32. Each call is one MPI message of at most this size,
/// so the MPI backend's staging buffer stays small whatever the model's size.
pub const BUCKET_LEN: usize = 1 << 20;

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

    use super::{Collective, BUCKET_LEN};

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
}
