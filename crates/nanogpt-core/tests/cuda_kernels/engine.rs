//! The engine training on the GPU step (`Engine::train_on_gpu_step`) against the same engine on the
//! CPU step: losses with dropout and gradient accumulation, evaluation, the optimizer state through a
//! save and a resume, and sampling from the trained weights.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Result};
use nanogpt_core::collective::{shard, Collective};
use nanogpt_core::kernels::cuda::Gpu;
use nanogpt_core::sample::SampleArgs;
use nanogpt_core::{files, Engine, Gelu, ModelArgs, OptimizerArgs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gpu::{on_cuda_device, shared_gpu};

const OPTIMIZER: OptimizerArgs = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0 };
const LR: f64 = 3e-3;

fn model(dropout: f64) -> ModelArgs {
    ModelArgs { n_layer: 2, n_head: 2, n_embd: 32, block_size: 8, vocab_size: 19, bias: true, dropout, gelu: Gelu::Erf }
}

/// (inputs, targets) of `b` rows, drawn from `seed`.
fn batch(args: &ModelArgs, b: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = b * args.block_size;
    (
        (0..n).map(|_| rng.random_range(0..args.vocab_size as u32)).collect(),
        (0..n).map(|_| rng.random_range(0..args.vocab_size as i32)).collect(),
    )
}

fn on_gpu_step(mut engine: Engine) -> Result<Engine> {
    engine.train_on_gpu_step(shared_gpu())?;
    Ok(engine)
}

/// `steps` optimizer steps of two accumulated micro-steps each; returns every micro-step's loss.
fn train(engine: &mut Engine, args: &ModelArgs, first_step: u64, steps: u64) -> Result<Vec<f32>> {
    let mut losses = Vec::new();
    for step in first_step..first_step + steps {
        for micro in 0..2 {
            let (x, y) = batch(args, 2, 100 * step + micro);
            losses.push(engine.forward_backward(&x, &y, 2, 0.5)?);
        }
        engine.step(LR)?;
    }
    Ok(losses)
}

fn weights(engine: &Engine) -> Result<HashMap<String, Vec<f32>>> {
    let tensors = candle_core::safetensors::load_buffer(&files::to_vec(|out| engine.save_weights(out))?, &Device::Cpu)?;
    tensors.into_iter().map(|(name, t)| Ok((name, t.flatten_all()?.to_vec1::<f32>()?))).collect()
}

/// The largest difference between like-named values; infinite where either is NaN (f32::max would skip it).
fn max_difference(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.len(), b.len());
    let difference = |x: f32, y: f32| if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() };
    a.iter().flat_map(|(name, va)| va.iter().zip(&b[name]).map(|(&x, &y)| difference(x, y))).fold(0.0, f32::max)
}

/// f32 products on a CUDA device round their inputs to TF32.
fn tolerance() -> f32 {
    if on_cuda_device() {
        2e-2
    } else {
        1e-4
    }
}

#[test]
fn the_gpu_step_trains_as_the_cpu_step() -> Result<()> {
    let args = model(0.1);
    let mut cpu = Engine::new(&args, 7, "cpu")?;
    let mut gpu = on_gpu_step(Engine::new(&args, 7, "cpu")?)?;
    assert_eq!(cpu.configure_optimizer(&OPTIMIZER)?, gpu.configure_optimizer(&OPTIMIZER)?);
    let (cpu_losses, gpu_losses) = (train(&mut cpu, &args, 0, 3)?, train(&mut gpu, &args, 0, 3)?);
    for (i, (c, g)) in cpu_losses.iter().zip(&gpu_losses).enumerate() {
        assert!((c - g).abs() < tolerance(), "micro-step {i}: cpu {c} gpu {g}");
    }
    let (x, y) = batch(&args, 3, 999);
    let (c, g) = (cpu.eval_loss(&x, &y, 3)?, gpu.eval_loss(&x, &y, 3)?);
    assert!((c - g).abs() < tolerance(), "eval: cpu {c} gpu {g}");
    // The engine's weights (what checkpoints and samples read) are the GPU step's.
    assert!(max_difference(&weights(&cpu)?, &weights(&gpu)?) < 10.0 * tolerance());
    Ok(())
}

#[test]
fn a_resumed_gpu_step_continues_the_same_run() -> Result<()> {
    let args = model(0.0);
    let mut straight = on_gpu_step(Engine::new(&args, 3, "cpu")?)?;
    straight.configure_optimizer(&OPTIMIZER)?;
    train(&mut straight, &args, 0, 2)?;

    let mut first = on_gpu_step(Engine::new(&args, 3, "cpu")?)?;
    first.configure_optimizer(&OPTIMIZER)?;
    train(&mut first, &args, 0, 1)?;
    let mut resumed = on_gpu_step(Engine::from_safetensors(&args, &files::to_vec(|out| first.save_weights(out))?, "cpu")?)?;
    resumed.configure_optimizer(&OPTIMIZER)?;
    resumed.load_optimizer(&files::to_vec(|out| first.save_optimizer(out))?)?;
    train(&mut resumed, &args, 1, 1)?;
    let difference = max_difference(&weights(&straight)?, &weights(&resumed)?);
    assert!(difference < 1e-5, "resumed run differs by {difference}");
    // Without the optimizer state, the same step lands elsewhere: the test can tell.
    let mut fresh = on_gpu_step(Engine::from_safetensors(&args, &files::to_vec(|out| first.save_weights(out))?, "cpu")?)?;
    fresh.configure_optimizer(&OPTIMIZER)?;
    train(&mut fresh, &args, 1, 1)?;
    assert!(max_difference(&weights(&straight)?, &weights(&fresh)?) > 1e-4);
    Ok(())
}

#[test]
fn sampling_after_gpu_training_uses_the_trained_weights() -> Result<()> {
    let args = model(0.0);
    let mut gpu = on_gpu_step(Engine::new(&args, 5, "cpu")?)?;
    gpu.configure_optimizer(&OPTIMIZER)?;
    train(&mut gpu, &args, 0, 1)?;
    let reloaded = Engine::from_safetensors(&args, &files::to_vec(|out| gpu.save_weights(out))?, "cpu")?;
    let sample = SampleArgs { max_new_tokens: 12, temperature: 1.0, top_k: Some(1), seed: 0 };
    assert_eq!(gpu.generate(&[1, 2], &sample)?, reloaded.generate(&[1, 2], &sample)?);
    let untrained = Engine::new(&args, 5, "cpu")?;
    assert_ne!(weights(&gpu)?, weights(&untrained)?, "training should have changed the weights");
    Ok(())
}

#[test]
fn the_loss_is_read_when_asked_even_after_an_evaluation() -> Result<()> {
    let args = model(0.0);
    let mut gpu = on_gpu_step(Engine::new(&args, 5, "cpu")?)?;
    let mut cpu = Engine::new(&args, 5, "cpu")?;
    let ((x, y), (ex, ey)) = (batch(&args, 2, 1), batch(&args, 2, 2));
    gpu.accumulate(&x, &y, 2, 1.0)?;
    let expected = cpu.forward_backward(&x, &y, 2, 1.0)?;
    // The evaluation reuses the step's loss buffer; the micro-step's loss must survive it.
    let eval = gpu.eval_loss(&ex, &ey, 2)?;
    let loss = gpu.last_loss()?;
    assert!((loss - expected).abs() < tolerance(), "last loss {loss}, cpu {expected}");
    assert!((eval - loss).abs() > 1e-3, "the evaluation's batch should have another loss ({eval} vs {loss})");
    Ok(())
}

#[test]
fn the_gpu_step_refuses_what_it_cannot_do() -> Result<()> {
    let args = model(0.0);
    let mut gpu = on_gpu_step(Engine::new(&args, 5, "cpu")?)?;
    let Err(err) = gpu.set_precision("float16") else { panic!("float16 is not a precision of the GPU step") };
    assert!(err.to_string().contains("float32 or bfloat16"), "{err}");
    let (x, y) = batch(&args, 2, 1);
    gpu.forward_backward(&x, &y, 2, 1.0)?;
    let Err(err) = gpu.step(LR) else { panic!("a step without an optimizer must fail") };
    assert!(err.to_string().contains("configure the optimizer"), "{err}");
    let mut configured = Engine::new(&args, 5, "cpu")?;
    configured.configure_optimizer(&OPTIMIZER)?;
    assert!(configured.train_on_gpu_step(shared_gpu()).is_err(), "moving after configuring the optimizer would drop its state");
    Ok(())
}

/// Rank 0 of two, where the other rank's gradients are always twice this one's: a mean over the ranks is
/// 1.5 times this rank's gradients, applied on the GPU. It records the device means, by address and length.
struct TwiceTheGradients {
    gpu: Arc<dyn Gpu + Send + Sync>,
    /// The ranges `start_mean_device` was given.
    started: Arc<Mutex<Vec<(u64, usize)>>>,
    /// How many times `all_reduce_mean_device` averaged the whole buffer.
    whole: Arc<Mutex<usize>>,
}

impl TwiceTheGradients {
    /// The f32 values at `addr`, as they are once the work queued before has run, times 1.5.
    fn mean(&self, addr: u64, len: usize) -> Result<()> {
        let mut bytes = vec![0u8; len * 4];
        self.gpu.download(addr, &mut bytes)?;
        let scaled: Vec<u8> = bytes.chunks_exact(4).flat_map(|b| (1.5 * f32::from_ne_bytes(b.try_into().unwrap())).to_ne_bytes()).collect();
        self.gpu.upload(addr, &scaled)
    }
}

impl Collective for TwiceTheGradients {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        2
    }

    fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]) {
        bucket.iter_mut().for_each(|v| *v *= 3.0);
    }

    fn broadcast(&mut self, _buffer: &mut [f32], _root: usize) {}

    fn barrier(&self) {}

    fn all_reduce_mean_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.mean(addr, len)?;
        *self.whole.lock().unwrap() += 1;
        Ok(true)
    }

    fn start_mean_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.mean(addr, len)?;
        self.started.lock().unwrap().push((addr, len));
        Ok(true)
    }
}

/// What a run over [`TwiceTheGradients`] leaves: its weights, the ranges averaged during backward passes (in
/// order), and how many times a step averaged the whole buffer.
struct AveragedRun {
    weights: HashMap<String, Vec<f32>>,
    started: Vec<(u64, usize)>,
    whole: usize,
}

/// Three steps of two micro-steps over [`TwiceTheGradients`]; with `sync`, the second micro-step's backward
/// pass averages the gradients, as nanoGPT's `require_backward_grad_sync` does.
fn averaged_run(args: &ModelArgs, sync: bool) -> Result<AveragedRun> {
    let mut engine = on_gpu_step(Engine::new(args, 7, "cpu")?)?;
    let rank = TwiceTheGradients { gpu: shared_gpu(), started: Default::default(), whole: Default::default() };
    let (started, whole) = (rank.started.clone(), rank.whole.clone());
    engine.join(Box::new(rank), Duration::from_secs(600))?;
    engine.configure_optimizer(&OPTIMIZER)?;
    for step in 0..3 {
        for micro in 0..2 {
            engine.set_backward_grad_sync(sync && micro == 1);
            let (x, y) = batch(args, 2, 100 * step + micro);
            engine.accumulate(&x, &y, 2, 0.5)?;
        }
        engine.step(LR)?;
    }
    let (started, whole) = (started.lock().unwrap().clone(), *whole.lock().unwrap());
    Ok(AveragedRun { weights: weights(&engine)?, started, whole })
}

#[test]
fn gradients_averaged_during_the_backward_pass_take_the_same_step() -> Result<()> {
    let args = model(0.1);
    let after_step = averaged_run(&args, false)?;
    assert!(after_step.started.is_empty() && after_step.whole == 3, "without the sync, each step averages the whole buffer once");
    let during_backward = averaged_run(&args, true)?;
    assert_eq!(during_backward.whole, 0, "gradients averaged during the backward pass must not be averaged again");
    // Each step's ranges: the final LayerNorm's, each layer's, the embeddings'; together the buffer, once.
    let per_step = args.n_layer + 2;
    assert_eq!(during_backward.started.len(), 3 * per_step);
    let params = Engine::new(&args, 7, "cpu")?.num_params(false);
    for ranges in during_backward.started.chunks(per_step) {
        let mut sorted = ranges.to_vec();
        sorted.sort();
        assert!(sorted.windows(2).all(|w| w[0].0 + 4 * w[0].1 as u64 == w[1].0), "the ranges must be contiguous: {sorted:?}");
        assert_eq!(sorted.iter().map(|r| r.1).sum::<usize>(), params);
    }
    // A range averaged before its last gradient was added would leave that gradient out of the mean: AdamW
    // then moves its weights by ~1e-3 (reporting the embeddings' range before their backward kernel: 8e-3).
    // Two runs alike differ by up to ~4e-6, from the order of the kernels' atomic additions.
    let difference = max_difference(&after_step.weights, &during_backward.weights);
    assert!(difference < 1e-4, "averaging during the backward pass changed the weights by {difference}");
    Ok(())
}

/// The ranks of a data-parallel run as threads of this process, each with its own engine on the shared
/// GPU, exchanging through host memory: every call puts this rank's values on the table, waits for the
/// others', and takes them all. Device paths are taken (and synchronous); ZeRO-1's reduce-scatter leaves
/// NaN where the range is not this rank's, so reading a gradient another rank owns poisons the step.
struct ThreadRanks {
    rank: usize,
    world_size: usize,
    gpu: Arc<dyn Gpu + Send + Sync>,
    table: Arc<(std::sync::Barrier, Mutex<Vec<Vec<f32>>>)>,
}

impl ThreadRanks {
    fn world(world_size: usize) -> Vec<Self> {
        let table = Arc::new((std::sync::Barrier::new(world_size), Mutex::new(vec![Vec::new(); world_size])));
        (0..world_size).map(|rank| Self { rank, world_size, gpu: shared_gpu(), table: table.clone() }).collect()
    }

    /// Every rank's `mine`, in rank order.
    fn exchange(&self, mine: &[f32]) -> Vec<Vec<f32>> {
        let (barrier, slots) = &*self.table;
        slots.lock().unwrap()[self.rank] = mine.to_vec();
        barrier.wait();
        let all = slots.lock().unwrap().clone();
        // Nobody writes the next call's values before everyone has read these.
        barrier.wait();
        all
    }

    fn summed(&self, mine: &[f32]) -> Vec<f32> {
        let all = self.exchange(mine);
        (0..mine.len()).map(|i| all.iter().map(|values| values[i]).sum()).collect()
    }

    fn read(&self, addr: u64, len: usize) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; len * 4];
        self.gpu.download(addr, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_ne_bytes(b.try_into().unwrap())).collect())
    }

    fn write(&self, addr: u64, values: &[f32]) -> Result<()> {
        self.gpu.upload(addr, &values.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>())
    }

    fn device_mean(&self, addr: u64, len: usize) -> Result<bool> {
        let scale = 1.0 / self.world_size as f32;
        let mean: Vec<f32> = self.summed(&self.read(addr, len)?).iter().map(|s| s * scale).collect();
        self.write(addr, &mean)?;
        Ok(true)
    }
}

impl Collective for ThreadRanks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum_bucket(&mut self, bucket: &mut [f32]) {
        let sum = self.summed(bucket);
        bucket.copy_from_slice(&sum);
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) {
        let all = self.exchange(buffer);
        buffer.copy_from_slice(&all[root]);
    }

    fn barrier(&self) {
        self.table.0.wait();
    }

    fn all_reduce_mean_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.device_mean(addr, len)
    }

    fn start_mean_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        self.device_mean(addr, len)
    }

    fn start_reduce_scatter_mean_device(&mut self, addr: u64, len: usize, range: std::ops::Range<usize>) -> Result<bool> {
        let at = addr + (range.start * 4) as u64;
        let scale = 1.0 / self.world_size as f32;
        let sum = self.summed(&self.read(at, range.len())?);
        let owned = shard(len, self.world_size, self.rank);
        let values: Vec<f32> = range.clone().zip(sum).map(|(i, s)| if owned.contains(&i) { s * scale } else { f32::NAN }).collect();
        self.write(at, &values)?;
        Ok(true)
    }

    fn all_reduce_sum_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        let sum = self.summed(&self.read(addr, len)?);
        self.write(addr, &sum)?;
        Ok(true)
    }

    fn all_gather_device(&mut self, addr: u64, len: usize) -> Result<bool> {
        let all = self.exchange(&self.read(addr, len)?);
        let gathered: Vec<f32> =
            (0..len).map(|i| all[(0..self.world_size).find(|&r| shard(len, self.world_size, r).contains(&i)).unwrap()][i]).collect();
        self.write(addr, &gathered)?;
        Ok(true)
    }
}

/// What rank 0 of a two-rank run ends with: its weights and the whole AdamW state, as a checkpoint has them.
struct RankZero {
    weights: HashMap<String, Vec<f32>>,
    optimizer: HashMap<String, Vec<f32>>,
}

/// Two ranks over [`ThreadRanks`], each training three steps of two micro-steps on batches of its own, in
/// `precision`, with ZeRO `zero_stage`; with `sync`, the second micro-step's backward pass averages the
/// gradients as it finishes them. Before the last step both load the AdamW state rank 0 saved, as a resume does.
fn two_ranks(args: &ModelArgs, precision: &str, zero_stage: u32, sync: bool) -> Result<RankZero> {
    let checkpoint = Arc::new(Mutex::new(Vec::new()));
    let runs: Vec<_> = ThreadRanks::world(2)
        .into_iter()
        .map(|ranks| {
            let (args, precision, checkpoint) = (args.clone(), precision.to_string(), checkpoint.clone());
            std::thread::spawn(move || -> Result<Option<RankZero>> {
                let rank = ranks.rank as u64;
                let mut engine = on_gpu_step(Engine::new(&args, 7 + rank, "cpu")?)?;
                engine.set_precision(&precision)?;
                engine.join(Box::new(ranks), Duration::from_secs(600))?;
                engine.set_zero_stage(zero_stage)?;
                engine.configure_optimizer(&OPTIMIZER)?;
                for step in 0..3 {
                    if step == 2 {
                        engine.gather_optimizer_state()?;
                        if rank == 0 {
                            *checkpoint.lock().unwrap() = files::to_vec(|out| engine.save_optimizer(out))?;
                        }
                        engine.barrier();
                        let saved = checkpoint.lock().unwrap().clone();
                        engine.load_optimizer(&saved)?;
                    }
                    for micro in 0..2 {
                        engine.set_backward_grad_sync(sync && micro == 1);
                        let (x, y) = batch(&args, 2, 1000 * rank + 100 * step + micro);
                        engine.accumulate(&x, &y, 2, 0.5)?;
                    }
                    engine.step(LR)?;
                }
                engine.gather_optimizer_state()?;
                if rank > 0 {
                    return Ok(None);
                }
                let state = candle_core::safetensors::load_buffer(&files::to_vec(|out| engine.save_optimizer(out))?, &Device::Cpu)?;
                let optimizer = state
                    .into_iter()
                    .map(|(name, t)| Ok((name, t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)))
                    .collect::<Result<_>>()?;
                Ok(Some(RankZero { weights: weights(&engine)?, optimizer }))
            })
        })
        .collect();
    let mut results = runs.into_iter().map(|run| run.join().expect("a rank panicked")).collect::<Result<Vec<_>>>()?;
    Ok(results.swap_remove(0).expect("rank 0 returns its state"))
}

#[test]
fn zero_stage_1_on_the_gpu_step_takes_the_steps_of_a_whole_optimizer_on_every_rank() -> Result<()> {
    let args = model(0.0);
    // bfloat16 adds the compute copy of the gathered weights; averaging during the backward pass is the same there.
    for (precision, sync) in [("float32", false), ("float32", true), ("bfloat16", true)] {
        let whole = two_ranks(&args, precision, 0, sync)?;
        let sharded = two_ranks(&args, precision, 1, sync)?;
        let what = format!("{precision}, averaging {}", if sync { "during the backward pass" } else { "before the optimizer" });
        // The shards' norms are summed in another order than the whole buffer's, and the embeddings' gradients
        // come from atomic additions: ~1e-6 apart. Each of these moves the weights by 8e-4 or more: the shards
        // not gathered back, the bf16 copy of the gathered weights not refreshed, the norm of one shard alone,
        // a resumed rank loading another shard's moments.
        let difference = max_difference(&whole.weights, &sharded.weights);
        assert!(difference < 1e-4, "{what}: ZeRO-1 moved the weights by {difference}");
        let difference = max_difference(&whole.optimizer, &sharded.optimizer);
        assert!(difference < 1e-4, "{what}: ZeRO-1's gathered AdamW state differs by {difference}");
    }
    Ok(())
}

#[test]
fn zero_stage_1_refuses_a_micro_step_after_one_that_averaged() -> Result<()> {
    let args = model(0.0);
    let runs: Vec<_> = ThreadRanks::world(2)
        .into_iter()
        .map(|ranks| {
            let args = args.clone();
            std::thread::spawn(move || -> Result<String> {
                let mut engine = on_gpu_step(Engine::new(&args, 7, "cpu")?)?;
                engine.join(Box::new(ranks), Duration::from_secs(600))?;
                engine.set_zero_stage(1)?;
                engine.configure_optimizer(&OPTIMIZER)?;
                engine.set_backward_grad_sync(true);
                let (x, y) = batch(&args, 2, 1);
                engine.accumulate(&x, &y, 2, 0.5)?;
                // Each rank now holds the mean of its own shard only, and its own sums elsewhere.
                let Err(err) = engine.accumulate(&x, &y, 2, 0.5) else { panic!("a second averaging micro-step must be refused") };
                Ok(err.to_string())
            })
        })
        .collect();
    for run in runs {
        let message = run.join().expect("a rank panicked")?;
        assert!(message.contains("set_backward_grad_sync only on the last micro-step"), "{message}");
    }
    Ok(())
}
