//! Data-parallel training with ranks as threads of this process exchanging host memory: the weights
//! start as rank 0's, and the ranks' steps equal one process accumulating all their micro-batches,
//! through candle's autograd graph (the path the GPU trains on) and on the explicit CPU step with
//! ZeRO-1 (the AdamW state sharded over the ranks). The GPU run over NCCL is tests/nccl.rs, and
//! the CPU ranks over MPI test/distributed.test.ts.

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
    assert_close("weights", &single.concat(), &ranks[0].1.concat(), 1e-5);
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

/// A clip that the first steps of this task exceed, so that the sharded gradient norm decides it.
const CLIPPING: OptimizerArgs = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 0.05 };

/// The bytes of the engine's saved AdamW state.
fn optimizer_file(engine: &Engine) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    engine.save_optimizer(&mut bytes)?;
    Ok(bytes)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    // NaN counts as the largest difference (f32::max would skip it).
    let worst = got.iter().zip(want).map(|(a, b)| if (a - b).is_nan() { f32::INFINITY } else { (a - b).abs() }).fold(0f32, f32::max);
    assert!(worst < tolerance, "{what}: differs from one process's by {worst}");
}

fn all_weights(engine: &Engine) -> Result<Vec<f32>> {
    Ok(weights(engine)?.concat())
}

/// What a rank of a ZeRO-1 run saw: its losses and gradient norms per step, its final weights, the
/// whole optimizer state (rank 0, after gathering it), and the refusal to save its shard alone.
struct RankRun {
    losses: Vec<f32>,
    norms: Vec<f64>,
    weights: Vec<f32>,
    state: Option<Vec<u8>>,
    refused: String,
}

#[test]
fn zero_stage_1_shards_the_adamw_state_and_steps_as_one_process() -> Result<()> {
    const STEPS: usize = 4;
    // Three ranks: shards of a length that does not divide evenly, and a rank whose shard starts mid-tensor.
    const WORLD: usize = 3;
    let rows = |rank: usize| rank * 8..(rank + 1) * 8;
    let batch = |s: usize| {
        let x: Vec<u32> = (0..WORLD * 8).map(|i| ((i * 3 + s) % 10) as u32).collect();
        let y: Vec<i32> = x.iter().map(|&v| v as i32 + 1).collect();
        (x, y)
    };
    let mut single = Engine::new(&args(), 3, "cpu")?;
    single.configure_optimizer(&CLIPPING)?;
    let (mut expected_losses, mut expected_norms) = (Vec::new(), Vec::new());
    for s in 0..STEPS {
        let (x, y) = batch(s);
        let mut losses = Vec::new();
        for rank in 0..WORLD {
            losses.push(single.forward_backward(&x[rows(rank)], &y[rows(rank)], 1, 1.0 / WORLD as f64)?);
        }
        let stats = single.step(1e-2)?;
        assert!(s > 0 || stats.clipped, "the first step must clip, so that the test covers the sharded norm");
        expected_losses.push(losses);
        expected_norms.push(stats.grad_norm);
    }
    let single_state = optimizer_file(&single)?;

    let ranks: Vec<RankRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = Threads::world(WORLD)
            .into_iter()
            .map(|collective| {
                scope.spawn(move || -> Result<_> {
                    let rank = collective.rank;
                    let mut engine = Engine::new(&args(), 3 + rank as u64 * 100, "cpu")?;
                    engine.join(Box::new(collective), TIMEOUT)?;
                    engine.set_zero_stage(1)?;
                    engine.configure_optimizer(&CLIPPING)?;
                    let (mut losses, mut norms) = (Vec::new(), Vec::new());
                    for s in 0..STEPS {
                        let (x, y) = batch(s);
                        losses.push(engine.forward_backward(&x[rows(rank)], &y[rows(rank)], 1, 1.0)?);
                        norms.push(engine.step(1e-2)?.grad_norm);
                    }
                    // Each rank holds a third of the state: saving it needs the whole, gathered on rank 0.
                    let refused = optimizer_file(&engine).unwrap_err().to_string();
                    engine.gather_optimizer_state()?;
                    let state = if rank == 0 { Some(optimizer_file(&engine)?) } else { None };
                    Ok(RankRun { losses, norms, weights: all_weights(&engine)?, state, refused })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("no panic in a rank")).collect::<Result<_>>()
    })?;

    for (rank, RankRun { losses, norms, refused, .. }) in ranks.iter().enumerate() {
        for s in 0..STEPS {
            let want = expected_losses[s][rank];
            assert!((losses[s] - want).abs() < 1e-5 * want, "step {s}, rank {rank}: loss {} where one process has {want}", losses[s]);
            let want = expected_norms[s];
            assert!(
                (norms[s] - want).abs() < 1e-5 * want,
                "step {s}, rank {rank}: gradient norm {} where one process has {want}",
                norms[s]
            );
        }
        assert!(refused.contains("the AdamW state is sharded over the ranks (zero_stage=1)"), "{refused}");
    }
    let single_weights = all_weights(&single)?;
    for (rank, RankRun { weights, .. }) in ranks.iter().enumerate() {
        assert_close(&format!("rank {rank}'s weights"), weights, &single_weights, 1e-5);
    }
    // The state rank 0 gathered is the one process's, tensor by tensor.
    let gathered = ranks[0].state.as_ref().expect("rank 0 saved the gathered state");
    let (gathered, single_state) =
        (safetensors::SafeTensors::deserialize(gathered).unwrap(), safetensors::SafeTensors::deserialize(&single_state).unwrap());
    assert_eq!(gathered.len(), single_state.len());
    for (name, want) in single_state.tensors() {
        let got = gathered.tensor(&name).unwrap();
        let floats = |bytes: &[u8]| -> Vec<f32> {
            match want.dtype() {
                safetensors::Dtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
                _ => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            }
        };
        assert_close(&format!("optimizer state `{name}`"), &floats(got.data()), &floats(want.data()), 1e-6);
    }
    Ok(())
}

#[test]
fn zero_stage_1_resumes_from_a_whole_state_and_continues_as_one_process() -> Result<()> {
    let (x, y) = batch(0);
    let mut single = Engine::new(&args(), 3, "cpu")?;
    single.configure_optimizer(&OPTIMIZER)?;
    single.forward_backward(&x, &y, 4, 1.0)?;
    single.step(1e-2)?;
    let (saved_weights, saved_state) = {
        let mut bytes = Vec::new();
        single.save_weights(&mut bytes)?;
        (bytes, optimizer_file(&single)?)
    };
    let (x, y) = batch(1);
    single.forward_backward(&x, &y, 4, 1.0)?;
    single.step(1e-2)?;
    let want = all_weights(&single)?;

    let ranks: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = Threads::world(2)
            .into_iter()
            .map(|collective| {
                let (saved_weights, saved_state, x, y) = (&saved_weights, &saved_state, &x, &y);
                scope.spawn(move || -> Result<_> {
                    let rank = collective.rank;
                    let mut engine = Engine::from_safetensors(&args(), saved_weights, "cpu")?;
                    engine.join(Box::new(collective), TIMEOUT)?;
                    engine.set_zero_stage(1)?;
                    engine.configure_optimizer(&OPTIMIZER)?;
                    engine.load_optimizer(saved_state)?;
                    let rows = rank * 16..(rank + 1) * 16;
                    engine.forward_backward(&x[rows.clone()], &y[rows], 2, 1.0)?;
                    engine.step(1e-2)?;
                    all_weights(&engine)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("no panic in a rank")).collect::<Result<_>>()
    })?;
    for (rank, weights) in ranks.iter().enumerate() {
        assert_close(&format!("rank {rank}'s weights after resuming"), weights, &want, 1e-5);
    }
    Ok(())
}

#[test]
fn zero_stage_is_refused_where_it_cannot_apply() -> Result<()> {
    let mut engine = Engine::new(&args(), 3, "cpu")?;
    let message = engine.set_zero_stage(2).unwrap_err().to_string();
    assert!(message.contains("zero_stage must be 0 (off) or 1"), "{message}");
    engine.configure_optimizer(&OPTIMIZER)?;
    let message = engine.set_zero_stage(1).unwrap_err().to_string();
    assert!(message.contains("set zero_stage before configuring the optimizer"), "{message}");
    let message = graph_engine(3)?.set_zero_stage(1).unwrap_err().to_string();
    assert!(message.contains("zero_stage=1 shards the AdamW state of the explicit training steps only"), "{message}");
    Ok(())
}
