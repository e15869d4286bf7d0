//! The engine training on the GPU step (`Engine::train_on_gpu_step`) against the same engine on the
//! CPU step: losses with dropout and gradient accumulation, evaluation, the optimizer state through a
//! save and a resume, and sampling from the trained weights.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Result};
use nanogpt_core::collective::Collective;
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

fn max_difference(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().flat_map(|(name, va)| va.iter().zip(&b[name]).map(|(x, y)| (x - y).abs())).fold(0.0, f32::max)
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
