//! Data-parallel training through candle's autograd graph (the path the GPU trains on), with ranks as
//! threads of this process exchanging host memory: the weights start as rank 0's, and the ranks' steps
//! equal one process accumulating all their micro-batches. The GPU run over NCCL is tests/nccl.rs.

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use candle_core::{DType, Result};
use nanogpt_core::collective::Collective;
use nanogpt_core::{Engine, Gelu, ModelArgs, OptimizerArgs};

/// Ranks as threads: every collective call meets the others at a barrier around a shared buffer.
struct Threads {
    rank: usize,
    world_size: usize,
    shared: Arc<(Barrier, Mutex<Vec<f32>>)>,
}

impl Threads {
    fn world(world_size: usize) -> Vec<Threads> {
        let shared = Arc::new((Barrier::new(world_size), Mutex::new(Vec::new())));
        (0..world_size).map(|rank| Threads { rank, world_size, shared: shared.clone() }).collect()
    }

    fn wait(&self) {
        self.shared.0.wait();
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Vec<f32>> {
        self.shared.1.lock().unwrap()
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]) {
        if self.rank == 0 {
            *self.buffer() = vec![0.0; bucket.len()];
        }
        self.wait();
        // In rank order, so that every run sums in the same order.
        for turn in 0..self.world_size {
            if turn == self.rank {
                self.buffer().iter_mut().zip(bucket.iter()).for_each(|(s, g)| *s += g);
            }
            self.wait();
        }
        bucket.copy_from_slice(&self.buffer());
        self.wait();
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) {
        if self.rank == root {
            *self.buffer() = buffer.to_vec();
        }
        self.wait();
        buffer.copy_from_slice(&self.buffer());
        self.wait();
    }

    fn barrier(&self) {
        self.wait();
    }
}

fn args() -> ModelArgs {
    ModelArgs { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 11, bias: true, dropout: 0.0, gelu: Gelu::Erf }
}

/// How long a collective call may wait for the other thread: far more than these steps take.
const TIMEOUT: Duration = Duration::from_secs(60);

const OPTIMIZER: OptimizerArgs = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 };

/// One engine on the graph path: the CPU engine computes in float16 there (candle's CPU matmul has no bf16).
fn graph_engine(seed: u64) -> Result<Engine> {
    let mut engine = Engine::new(&args(), seed, "cpu")?;
    engine.set_compute_dtype(DType::F16)?;
    Ok(engine)
}

/// Step `s`'s batch of 4 rows: the learnable next-id task, shifted per step.
fn batch(s: usize) -> (Vec<u32>, Vec<i32>) {
    let x: Vec<u32> = (0..32).map(|i| ((i * 3 + s) % 10) as u32).collect();
    let y = x.iter().map(|&v| v as i32 + 1).collect();
    (x, y)
}

fn weights(engine: &Engine) -> Result<Vec<Vec<f32>>> {
    engine.model().named_parameters().into_iter().map(|(_, v)| v.flatten_all()?.to_vec1::<f32>()).collect()
}

#[test]
fn two_ranks_on_the_graph_path_step_as_one_process_with_both_batches() -> Result<()> {
    const STEPS: usize = 5;
    let mut single = graph_engine(3)?;
    single.configure_optimizer(&OPTIMIZER)?;
    let mut expected = Vec::new();
    for s in 0..STEPS {
        let (x, y) = batch(s);
        let losses = [single.forward_backward(&x[..16], &y[..16], 2, 0.5)?, single.forward_backward(&x[16..], &y[16..], 2, 0.5)?];
        single.step(1e-2)?;
        expected.push(losses);
    }

    let ranks: Vec<(Vec<f32>, Vec<Vec<f32>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = Threads::world(2)
            .into_iter()
            .map(|collective| {
                scope.spawn(move || -> Result<_> {
                    let rank = collective.rank;
                    // Rank 1 starts from other weights: joining gives it rank 0's.
                    let mut engine = graph_engine(3 + rank as u64 * 100)?;
                    engine.join(Box::new(collective), TIMEOUT)?;
                    engine.configure_optimizer(&OPTIMIZER)?;
                    let mut losses = Vec::new();
                    for s in 0..STEPS {
                        let (x, y) = batch(s);
                        let rows = rank * 16..(rank + 1) * 16;
                        losses.push(engine.forward_backward(&x[rows.clone()], &y[rows], 2, 1.0)?);
                        engine.step(1e-2)?;
                    }
                    Ok((losses, weights(&engine)?))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("no panic in a rank")).collect::<Result<_>>()
    })?;

    for s in 0..STEPS {
        for (rank, (losses, _)) in ranks.iter().enumerate() {
            let want = expected[s][rank];
            assert!((losses[s] - want).abs() < 1e-4 * want, "step {s}, rank {rank}: loss {} where one process has {want}", losses[s]);
        }
    }
    assert_eq!(ranks[0].1, ranks[1].1, "the ranks' weights differ after the same steps");
    let single = weights(&single)?;
    let worst = single.iter().flatten().zip(ranks[0].1.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "weights differ from one process's by {worst}");
    Ok(())
}

#[test]
fn joining_after_a_forward_backward_is_refused() -> Result<()> {
    let mut engine = graph_engine(3)?;
    let (x, y) = batch(0);
    engine.forward_backward(&x, &y, 4, 1.0)?;
    let message = engine.join(Box::new(Threads::world(1).remove(0)), TIMEOUT).unwrap_err().to_string();
    assert!(message.contains("join the data-parallel run before the first forward_backward"), "{message}");
    Ok(())
}
