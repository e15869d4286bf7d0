//! Times the engine's CUDA kernels (kernels/cuda) one at a time on CUDA device 0, in bf16, at GPT-2 124M
//! training shapes (B=12, T=1024, C=768, NH=12, V=50304, a 4C MLP; AdamW over the 12-layer model's
//! parameters, no biases) or those given as `--key=value` (batch_size, block_size, n_embd, n_head,
//! vocab_size, n_layer, bias; warmup and iters set the launches). Each launch is
//! timed alone between two CUDA events, after a write of 512 MiB has evicted its inputs from L2, and each
//! kernel prints the median as one line, `KERNEL {"name", "ms", "gbps", ["tflops"]}`: gbps counts the bytes
//! the kernel must read and write at least, tflops (products and attention) its multiply-adds times two,
//! attention's causal half only. Attention is timed as the environment chose as `attention_fwd` and
//! `attention_bwd`; at head size 64 also the engine kernels' other shape (kernels::cuda::attention::WarpRows),
//! with its rows a warp as a suffix (`attention_fwd_rows16`), and cuDNN's kernels as `attention_fwd_cudnn` and
//! `attention_bwd_cudnn` where libcudnn.so.9 loads.
//! `python3 bench/torch_ref.py kernels` times PyTorch's counterparts the same way and prints the same lines
//! with the same names; bench/gpu-check.sh puts the two side by side.
//!
//!   cargo run --release -p nanogpt-core --features cuda --example cuda_kernels_bench
use std::process::ExitCode;
use std::sync::Arc;

use candle_core::{bail, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaStream;
use nanogpt_core::cuda::Kernels;
use nanogpt_core::kernels::adamw::AdamWUpdate;
use nanogpt_core::kernels::cuda::adamw::{FlatBuffers, TensorTable};
use nanogpt_core::kernels::cuda::{adamw, attention, bias, classifier, encoder, gelu, layernorm, matmul, DeviceBuffer, Gpu, Precision};
use nanogpt_core::train_step::ParamLayout;
use nanogpt_core::ModelArgs;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const X: Precision = Precision::Bf16;

/// `kernels` with attention on `which`, at `warp_rows` rows a warp on the engine's kernels.
fn with_attention(kernels: &Kernels, which: attention::AttentionKernels, warp_rows: attention::WarpRows) -> attention::WithAttention<'_> {
    attention::WithAttention { gpu: kernels, kernels: which, warp_rows }
}
/// Bytes of one bf16 and of one float.
const XB: usize = 2;
const F32B: usize = 4;

struct Shape {
    b: usize,
    t: usize,
    c: usize,
    n_head: usize,
    vocab: usize,
    n_layer: usize,
    bias: usize,
    warmup: usize,
    iters: usize,
}

impl Shape {
    fn from_args() -> Result<Self> {
        let mut shape = Shape { b: 12, t: 1024, c: 768, n_head: 12, vocab: 50304, n_layer: 12, bias: 0, warmup: 10, iters: 30 };
        for arg in std::env::args().skip(1) {
            let Some((key, value)) = arg.strip_prefix("--").and_then(|a| a.split_once('=')) else {
                bail!(
                    "argument `{arg}`: give --key=value (batch_size, block_size, n_embd, n_head, vocab_size, n_layer, bias, warmup, iters)"
                )
            };
            let Ok(value) = value.parse::<usize>() else { bail!("argument `{arg}`: the value must be a whole number") };
            let field = match key {
                "batch_size" => &mut shape.b,
                "block_size" => &mut shape.t,
                "n_embd" => &mut shape.c,
                "n_head" => &mut shape.n_head,
                "vocab_size" => &mut shape.vocab,
                "n_layer" => &mut shape.n_layer,
                "bias" => &mut shape.bias,
                "warmup" => &mut shape.warmup,
                "iters" => &mut shape.iters,
                _ => bail!(
                    "argument `{arg}`: unknown key; use batch_size, block_size, n_embd, n_head, vocab_size, n_layer, bias, warmup or iters"
                ),
            };
            *field = value;
        }
        if shape.iters == 0 {
            bail!("--iters=0: time at least one launch");
        }
        Ok(shape)
    }
}

/// Device buffers, alive as long as the benchmark; kernels get their addresses.
struct Memory {
    gpu: Arc<dyn Gpu + Send + Sync>,
    buffers: Vec<DeviceBuffer>,
    rng: StdRng,
    /// Uniform draws in (-1, 1), repeated to fill the value buffers: drawing each of the logits' and the
    /// optimizer's ~10^9 values would take longer than every timing here, and the timings do not depend on them.
    pool: Vec<f32>,
}

impl Memory {
    fn zeroed(&mut self, bytes: usize) -> Result<u64> {
        let buffer = DeviceBuffer::zeroed(&self.gpu, bytes)?;
        let addr = buffer.addr;
        self.buffers.push(buffer);
        Ok(addr)
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64> {
        let addr = self.zeroed(bytes.len())?;
        self.gpu.upload(addr, bytes)?;
        Ok(addr)
    }

    fn new(gpu: Arc<dyn Gpu + Send + Sync>) -> Self {
        let mut rng = StdRng::seed_from_u64(1337);
        let pool = (0..1 << 20).map(|_| rng.random_range(-1.0..1.0)).collect();
        Memory { gpu, buffers: Vec::new(), rng, pool }
    }

    /// `n` bf16 values spread over (-scale, scale): layer norms, softmaxes and GELUs see varied inputs.
    fn random_bf16(&mut self, n: usize, scale: f32) -> Result<u64> {
        let bytes: Vec<u8> =
            self.pool.iter().cycle().take(n).flat_map(|v| half::bf16::from_f32(v * scale).to_bits().to_le_bytes()).collect();
        self.upload(&bytes)
    }

    fn random_f32(&mut self, n: usize, scale: f32) -> Result<u64> {
        let bytes: Vec<u8> = self.pool.iter().cycle().take(n).flat_map(|v| (v * scale).to_le_bytes()).collect();
        self.upload(&bytes)
    }

    /// `n` token ids uniform below `vocab`, as i32: the embedding gradient's adds spread over the rows of
    /// dwte the way a real batch's do, rather than all landing on one.
    fn random_tokens(&mut self, n: usize, vocab: usize) -> Result<u64> {
        let bytes: Vec<u8> = (0..n).flat_map(|_| (self.rng.random_range(0..vocab) as i32).to_le_bytes()).collect();
        self.upload(&bytes)
    }
}

fn driver_error(e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA driver: {e}"))
}

/// Times launches on `kernels`' stream.
struct Timer<'a> {
    kernels: &'a Kernels,
    stream: Arc<CudaStream>,
    /// Written before every timed launch: more than H100/H200's 50/60 MB of L2, so that each launch reads its
    /// inputs from device memory, as it does inside a training step.
    flush: u64,
    flush_bytes: usize,
    warmup: usize,
    iters: usize,
}

impl Timer<'_> {
    /// The median milliseconds of one `launch`. All launches are queued before the first wait, so the host
    /// never leaves the GPU idle between a start event and its launch.
    fn median_ms(&mut self, launch: &dyn Fn(&Kernels) -> Result<()>) -> Result<f64> {
        for _ in 0..self.warmup {
            launch(self.kernels)?;
        }
        let mut events = Vec::with_capacity(self.iters);
        for _ in 0..self.iters {
            self.kernels.zero(self.flush, self.flush_bytes)?;
            let start = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_error)?;
            launch(self.kernels)?;
            let end = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_error)?;
            events.push((start, end));
        }
        let mut ms = events
            .iter()
            .map(|(start, end)| start.elapsed_ms(end).map(f64::from))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(driver_error)?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }

    /// Times `launch` and prints its line: `bytes` read and written at least, `flops` where it computes.
    fn report(&mut self, name: &str, bytes: usize, flops: Option<f64>, launch: &dyn Fn(&Kernels) -> Result<()>) -> Result<()> {
        let ms = self.median_ms(launch)?;
        let mut line = serde_json::json!({
            "name": name,
            "ms": round(ms, 4),
            "gbps": round(bytes as f64 / (ms * 1e-3) / 1e9, 1),
        });
        if let Some(flops) = flops {
            line["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1).into();
        }
        println!("KERNEL {line}");
        Ok(())
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn run() -> Result<()> {
    let Shape { b, t, c, n_head, vocab, n_layer, bias, warmup, iters } = Shape::from_args()?;
    let device = nanogpt_core::cuda::open(0, 0)?;
    let kernels = Arc::new(Kernels::new(&device)?);
    let mut memory = Memory::new(kernels.clone());
    let flush_bytes = 512 << 20;
    let flush = memory.zeroed(flush_bytes)?;
    let stream = kernels.device().cuda_stream().clone();
    let mut timer = Timer { kernels: &kernels, stream, flush, flush_bytes, warmup, iters };
    let n = b * t;
    let hidden = 4 * c;

    // Token and position embeddings.
    let tokens = memory.random_tokens(n, vocab)?;
    let wte = memory.random_bf16(vocab * c, 0.02)?;
    let wpe = memory.random_bf16(t * c, 0.02)?;
    let embedded = memory.zeroed(n * c * XB)?;
    let dwte = memory.zeroed(vocab * c * F32B)?;
    let dwpe = memory.zeroed(t * c * F32B)?;
    let dout = memory.random_bf16(n * c, 1.0)?;
    timer.report("encoder_fwd", n * 4 + 2 * n * c * XB + t * c * XB, None, &|k| {
        encoder::forward(k, X, embedded, tokens, wte, wpe, b, t, c, None)
    })?;
    // Every token's row of dwte is read and written (the tokens are nearly all distinct), dwpe once.
    timer.report("encoder_bwd", n * 4 + n * c * XB + 2 * n * c * F32B + 2 * t * c * F32B, None, &|k| {
        encoder::backward(k, X, dwte, dwpe, dout, tokens, b, t, c, None)
    })?;

    // Layer norms over (N, C).
    let inp = memory.random_bf16(n * c, 1.0)?;
    let branch = memory.random_bf16(n * c, 1.0)?;
    let weight = memory.random_bf16(c, 1.0)?;
    let ln_bias = memory.random_bf16(c, 1.0)?;
    let ln_out = memory.zeroed(n * c * XB)?;
    let residual = memory.zeroed(n * c * XB)?;
    let mean = memory.zeroed(n * F32B)?;
    let rstd = memory.zeroed(n * F32B)?;
    let stats = 2 * n * F32B;
    timer.report("layernorm_fwd", 2 * n * c * XB + 2 * c * XB + stats, None, &|k| {
        layernorm::forward(k, X, ln_out, mean, rstd, inp, weight, Some(ln_bias), n, c)
    })?;
    timer.report("residual_layernorm_fwd", 4 * n * c * XB + 2 * c * XB + stats, None, &|k| {
        layernorm::residual_forward(k, X, residual, ln_out, mean, rstd, inp, branch, weight, Some(ln_bias), n, c, None)
    })?;
    let dinp = memory.zeroed(n * c * XB)?;
    let dweight = memory.zeroed(c * F32B)?;
    let dbias = memory.zeroed(c * F32B)?;
    let scratch = memory.zeroed(layernorm::backward_scratch_len(n, c) * F32B)?;
    // dinp written (not added to), as torch's layer_norm backward does; the weight and bias gradients added to.
    timer.report("layernorm_bwd", 3 * n * c * XB + c * XB + stats + 4 * c * F32B, None, &|k| {
        layernorm::backward(k, X, dinp, dweight, Some(dbias), scratch, dout, inp, weight, mean, rstd, n, c, false)
    })?;

    // The MLP's hidden activations, (N, 4C): GELU, and the first projection's bias.
    let pre = memory.random_bf16(n * hidden, 3.0)?;
    let post = memory.zeroed(n * hidden * XB)?;
    let dpost = memory.random_bf16(n * hidden, 1.0)?;
    let dpre = memory.zeroed(n * hidden * XB)?;
    timer.report("gelu_fwd", 2 * n * hidden * XB, None, &|k| gelu::forward(k, X, post, pre, n * hidden, true))?;
    // The backward pass recomputes the forward's output as it goes (the training step keeps none).
    timer.report("gelu_bwd", 4 * n * hidden * XB, None, &|k| gelu::backward(k, X, dpre, post, pre, dpost, n * hidden, true))?;
    // The MLP's first linear layer, (N, C) -> (N, 4C), its product alone (the bias is timed below): cuBLAS.
    let fc_weight = memory.random_bf16(hidden * c, 0.02)?;
    let dfc_weight = memory.zeroed(hidden * c * F32B)?;
    let fc_out = memory.zeroed(n * hidden * XB)?;
    let matmul_flops = 2.0 * n as f64 * c as f64 * hidden as f64;
    timer.report("matmul_fc_fwd", (n * c + hidden * c + n * hidden) * XB, Some(matmul_flops), &|k| {
        matmul::forward(k, X, fc_out, inp, fc_weight, None, n, c, hidden)
    })?;
    timer.report("matmul_fc_bwd", (2 * n * c + hidden * c + n * hidden) * XB + 2 * hidden * c * F32B, Some(2.0 * matmul_flops), &|k| {
        matmul::backward(k, X, Some(dinp), dfc_weight, None, 0, dpost, inp, fc_weight, n, c, hidden)
    })?;
    let fc_bias = memory.random_bf16(hidden, 1.0)?;
    let dfc_bias = memory.zeroed(hidden * F32B)?;
    let bias_scratch = memory.zeroed(bias::backward_scratch_len(n, hidden) * F32B)?;
    timer.report("bias_add", 2 * n * hidden * XB + hidden * XB, None, &|k| bias::add(k, X, post, fc_bias, n, hidden))?;
    timer.report("bias_bwd", n * hidden * XB + 2 * hidden * F32B, None, &|k| {
        bias::backward(k, X, dfc_bias, bias_scratch, dpre, n, hidden)
    })?;
    // The same layer with its bias, as the training step runs it: the bias in cuBLASLt's epilogue.
    kernels.take_bias_fallback();
    timer.report("matmul_fc_bias_fwd", (n * c + hidden * c + n * hidden + hidden) * XB, Some(matmul_flops), &|k| {
        matmul::forward(k, X, fc_out, inp, fc_weight, Some(fc_bias), n, c, hidden)
    })?;
    if let Some(reason) = kernels.take_bias_fallback() {
        eprintln!("cuda_kernels_bench: matmul_fc_bias_fwd added its bias with bias.cu's kernel, not cuBLASLt's epilogue: {reason}");
    }

    // Causal self-attention from qkv (B, T, 3C).
    let qkv = memory.random_bf16(n * 3 * c, 1.0)?;
    let att = memory.zeroed(n * c * XB)?;
    let lse = memory.zeroed(b * n_head * t * F32B)?;
    let delta = memory.zeroed(b * n_head * t * F32B)?;
    let dqkv = memory.zeroed(n * 3 * c * XB)?;
    // q kᵀ and (weights) v: 2 x 2·T·T·hs per (b, h), half of it under the causal mask; the backward's five
    // matmuls are 2.5 times the forward's two.
    let forward_flops = 2.0 * (b * n_head) as f64 * (t * t) as f64 * (c / n_head) as f64;
    let rows = b * n_head * t * F32B;
    timer.report("attention_fwd", 4 * n * c * XB + rows, Some(forward_flops), &|k| {
        attention::forward(k, X, att, lse, qkv, b, t, c, n_head, None)
    })?;
    timer.report("attention_bwd", 8 * n * c * XB + rows, Some(2.5 * forward_flops), &|k| {
        attention::backward(k, X, dqkv, dout, qkv, att, lse, delta, b, t, c, n_head, None)
    })?;
    // At head size 64 the engine kernels' other shape (attention::WarpRows), whichever the environment chose above.
    if c / n_head == 64 {
        let other = match kernels.attention_warp_rows() {
            attention::WarpRows::ThirtyTwo => attention::WarpRows::Sixteen,
            attention::WarpRows::Sixteen => attention::WarpRows::ThirtyTwo,
        };
        let suffix = format!("rows{}", other.rows());
        timer.report(&format!("attention_fwd_{suffix}"), 4 * n * c * XB + rows, Some(forward_flops), &|k| {
            let gpu = with_attention(k, attention::AttentionKernels::Engine, other);
            attention::forward(&gpu, X, att, lse, qkv, b, t, c, n_head, None)
        })?;
        timer.report(&format!("attention_bwd_{suffix}"), 8 * n * c * XB + rows, Some(2.5 * forward_flops), &|k| {
            let gpu = with_attention(k, attention::AttentionKernels::Engine, other);
            attention::backward(&gpu, X, dqkv, dout, qkv, att, lse, delta, b, t, c, n_head, None)
        })?;
    }
    // cuDNN's fused attention, where libcudnn.so.9 loads, whichever kernels the environment chose above.
    let timed_cudnn = timer
        .report("attention_fwd_cudnn", 4 * n * c * XB + rows, Some(forward_flops), &|k| {
            let gpu = with_attention(k, attention::AttentionKernels::Cudnn, k.attention_warp_rows());
            attention::forward(&gpu, X, att, lse, qkv, b, t, c, n_head, None)
        })
        .and_then(|()| {
            timer.report("attention_bwd_cudnn", 8 * n * c * XB + rows, Some(2.5 * forward_flops), &|k| {
                let gpu = with_attention(k, attention::AttentionKernels::Cudnn, k.attention_warp_rows());
                attention::backward(&gpu, X, dqkv, dout, qkv, att, lse, delta, b, t, c, n_head, None)
            })
        });
    if let Err(e) = timed_cudnn {
        eprintln!("cuda_kernels_bench: cuDNN's attention not timed: {e}");
    }

    // The loss over (N, V) logits: each row's loss, its gradient over the logits in place, and their sum.
    let logits = memory.random_bf16(n * vocab, 4.0)?;
    let targets = memory.random_tokens(n, vocab)?;
    let losses = memory.zeroed(n * F32B)?;
    let loss = memory.zeroed(F32B)?;
    timer.report("cross_entropy", 2 * n * vocab * XB + 2 * n * F32B, None, &|k| {
        classifier::cross_entropy(k, X, logits, losses, targets, n, vocab, Some(1.0 / n as f32))?;
        classifier::loss_sum(k, loss, losses, n)
    })?;

    // One AdamW step over the model's flat f32 buffers, writing the bf16 compute copy of the weights.
    let model =
        ModelArgs { n_layer, n_head, n_embd: c, block_size: t, vocab_size: vocab, bias: bias != 0, dropout: 0.0, gelu: Default::default() };
    let layout = ParamLayout::new(&model);
    let table = TensorTable::new(&layout);
    let ends: Vec<u8> = table.ends.iter().flat_map(|end| end.to_le_bytes()).collect();
    let table = table.on_device(memory.upload(&ends)?, memory.upload(&table.decays)?);
    let p = layout.len;
    let buffers = FlatBuffers {
        params: memory.random_f32(p, 0.02)?,
        grads: memory.random_f32(p, 1e-3)?,
        exp_avg: memory.zeroed(p * F32B)?,
        exp_avg_sq: memory.zeroed(p * F32B)?,
        params_copy: memory.zeroed(p * XB)?,
        len: p,
        shard: 0..p,
    };
    let (lr, beta1, beta2): (f64, f64, f64) = (6e-4, 0.9, 0.95);
    let step = AdamWUpdate {
        lr,
        beta1,
        beta2,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_scale: 1.0,
        step_size: lr / (1.0 - beta1),
        bias_correction2_sqrt: (1.0 - beta2).sqrt(),
    };
    // Reads params, grads and both moments; writes them back but the grads, and the bf16 copy.
    timer.report("adamw", p * (7 * F32B + XB), None, &|k| adamw::update(k, X, &buffers, &table, &step, None))?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cuda_kernels_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
