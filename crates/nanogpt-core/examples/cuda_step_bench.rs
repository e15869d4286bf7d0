//! Times the GPU training step (train_step_cuda.rs) as nanoGPT's bench.py times its own: GPT-2 124M
//! (bias off, vocab 50304) at B=12, T=1024 in bf16 by default, one fixed batch, 10 steps of warm-up then
//! 20 timed ones, each ending with the loss read back (bench.py's `loss.item()`). Prints ms/iter,
//! tokens/s, MFU against `peak_tflops` (989: H100/H200 dense bf16), the device memory peak, and a
//! `RESULT {json}` line. Then `profile` more steps (default 3) with every kernel and product timed by
//! CUDA events: one `STEP_KERNEL {json}` line each, with its device milliseconds per step. Arguments are
//! `key=value`: n_layer n_head n_embd block_size vocab_size batch_size dtype (bfloat16 | float32) warmup
//! iters profile peak_tflops.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use nanogpt_core::kernels::cuda::{Gpu, Precision};
use nanogpt_core::optim::OptimizerArgs;
use nanogpt_core::train_step::ParamLayout;
use nanogpt_core::train_step_cuda::CudaTrainStep;
use nanogpt_core::ModelArgs;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_step_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> candle_core::Result<()> {
    let mut given: HashMap<String, String> = HashMap::new();
    for arg in std::env::args().skip(1) {
        let (key, value) = arg.split_once('=').ok_or_else(|| candle_core::Error::Msg(format!("argument `{arg}` is not key=value")))?;
        given.insert(key.trim_start_matches("--").to_string(), value.to_string());
    }
    let mut take = |key: &str, default: &str| given.remove(key).unwrap_or_else(|| default.to_string());
    let number = |key: &str, value: String| -> candle_core::Result<f64> {
        value.parse().map_err(|_| candle_core::Error::Msg(format!("{key}={value} is not a number")))
    };
    let n_layer = number("n_layer", take("n_layer", "12"))? as usize;
    let n_head = number("n_head", take("n_head", "12"))? as usize;
    let n_embd = number("n_embd", take("n_embd", "768"))? as usize;
    let block_size = number("block_size", take("block_size", "1024"))? as usize;
    let vocab_size = number("vocab_size", take("vocab_size", "50304"))? as usize;
    let b = number("batch_size", take("batch_size", "12"))? as usize;
    let warmup = number("warmup", take("warmup", "10"))? as usize;
    let iters = number("iters", take("iters", "20"))? as usize;
    let profiled = number("profile", take("profile", "3"))? as usize;
    let peak_tflops = number("peak_tflops", take("peak_tflops", "989"))?;
    let x = match take("dtype", "bfloat16").as_str() {
        "bfloat16" => Precision::Bf16,
        "float32" => Precision::F32,
        other => candle_core::bail!("dtype={other}: the GPU step computes in bfloat16 or float32"),
    };
    if let Some(key) = given.keys().next() {
        candle_core::bail!("unknown argument `{key}`");
    }

    let args = ModelArgs { n_layer, n_head, n_embd, block_size, vocab_size, bias: false, dropout: 0.0, gelu: Default::default() };
    args.validate()?;
    let device = nanogpt_core::cuda::open(0, 1337)?;
    let kernels = Arc::new(nanogpt_core::cuda::Kernels::new(&device)?);
    let gpu: Arc<dyn Gpu + Send + Sync> = kernels.clone();
    let layout = ParamLayout::new(&args);
    // GPT-2's initialisation scale; the bench measures speed, so the residual projections' smaller
    // scale and the LayerNorm weights of one do not matter here.
    let mut rng = StdRng::seed_from_u64(1337);
    let normal = Normal::new(0.0f32, 0.02).expect("a valid normal");
    let params: Vec<f32> = (0..layout.len).map(|_| normal.sample(&mut rng)).collect();
    let mut step = CudaTrainStep::new(gpu, &args, x, &params)?;
    drop(params);
    let optimizer = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0 };

    let t = block_size;
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab_size as u32)).collect();
    let targets: Vec<i32> = (0..b * t).map(|_| rng.random_range(0..vocab_size as i32)).collect();
    let mut losses = Vec::new();
    let mut train = |step: &mut CudaTrainStep| -> candle_core::Result<()> {
        step.zero_grads()?;
        step.forward(&tokens, b, t, None)?;
        step.loss(&targets, Some(1.0))?;
        step.backward(None, &mut |_| Ok(()))?;
        step.optimizer_step(&optimizer, 6e-4, &mut |_| Ok(()))?;
        losses.push(step.read_loss()?);
        Ok(())
    };
    let mut timed = 0.0;
    for i in 0..warmup + iters {
        let start = Instant::now();
        train(&mut step)?;
        if i >= warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    kernels.start_profile();
    for _ in 0..profiled {
        train(&mut step)?;
    }
    let profile = kernels.take_profile()?;
    let ms_per_iter = timed / iters as f64 * 1e3;
    let tokens_per_s = (b * t) as f64 / (ms_per_iter / 1e3);
    // nanoGPT's estimate_mfu: 6N + 12·L·H·Q·T FLOPs per token, N without the position embedding.
    let n = (layout.len - block_size * n_embd) as f64;
    let flops_per_token = 6.0 * n + 12.0 * (n_layer * n_head * (n_embd / n_head) * t) as f64;
    let mfu = flops_per_token * tokens_per_s / (peak_tflops * 1e12);
    let peak = nanogpt_core::cuda::memory_stats(&device)?.map_or(0, |m| m.peak_bytes);
    println!(
        "{:?} step: {ms_per_iter:.2} ms/iter, {tokens_per_s:.0} tokens/s, MFU {:.1}%, peak device memory {:.2} GiB, loss {:.4} -> {:.4}",
        x,
        mfu * 100.0,
        peak as f64 / (1u64 << 30) as f64,
        losses[0],
        losses[losses.len() - 1]
    );
    println!(
        "RESULT {{\"ms_per_iter\": {ms_per_iter:.3}, \"tokens_per_s\": {tokens_per_s:.0}, \"mfu\": {mfu:.4}, \"peak_mem_bytes\": {peak}, \"first_loss\": {:.4}, \"last_loss\": {:.4}}}",
        losses[0],
        losses[losses.len() - 1]
    );
    if profiled > 0 {
        let total: f64 = profile.iter().map(|k| k.ms).sum::<f64>() / profiled as f64;
        println!("device time per step, by kernel, over {profiled} profiled steps: {total:.2} ms in kernels and products");
        let mut by_time = profile.clone();
        by_time.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        for k in &by_time {
            let (launches, ms) = (k.launches as f64 / profiled as f64, k.ms / profiled as f64);
            println!("  {:<60} {launches:>6} launches {ms:>9.3} ms {:>5.1}%", k.name, 100.0 * ms / total);
            println!("STEP_KERNEL {{\"name\": {:?}, \"launches_per_step\": {launches}, \"ms_per_step\": {ms:.4}}}", k.name);
        }
    }
    Ok(())
}
