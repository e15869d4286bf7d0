//! The CUDA engine against the CPU engine on a small model: logits, loss and every gradient, in
//! float32 (TF32 matmuls) and bfloat16, then a few training steps in each dtype, and sampling on the
//! kernels, streamed token by token and as one batch. Built only with the
//! `cuda` feature. They need a GPU, so `cargo test` lists them as ignored: run them with
//! `cargo test --release -p nanogpt-core --features cuda --test cuda -- --ignored` (bench/gpu-check.sh
//! does), where a missing GPU fails them.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor};
use nanogpt_core::engine::device;
use nanogpt_core::model::{Gpt, Mode};
use nanogpt_core::sample::SampleArgs;
use nanogpt_core::{Engine, Gelu, ModelArgs, OptimizerArgs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Device {
    device("cuda", 0).unwrap_or_else(|e| panic!("no usable GPU: {e}"))
}

fn args(dropout: f64) -> ModelArgs {
    ModelArgs { n_layer: 2, n_head: 4, n_embd: 64, block_size: 32, vocab_size: 97, bias: true, dropout, gelu: Gelu::Erf }
}

fn batch(args: &ModelArgs, b: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = b * args.block_size;
    let x: Vec<u32> = (0..n).map(|_| rng.random_range(0..args.vocab_size as u32)).collect();
    // Learnable targets (the next id), so that training steps have something to reduce.
    let y = x.iter().map(|&v| ((v + 1) % args.vocab_size as u32) as i32).collect();
    (x, y)
}

fn tensors(x: &[u32], y: &[i32], b: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = x.len() / b;
    let y: Vec<i64> = y.iter().map(|&v| v as i64).collect();
    Ok((Tensor::from_slice(x, (b, t), device)?, Tensor::from_vec(y, (b, t), device)?))
}

/// ‖a − b‖ / ‖b‖, computed on the CPU in f32.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(diff / b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-12))
}

/// Compares logits, loss and gradients of the same model on the GPU (computing in `dtype`) and on the CPU (f32).
fn compare(gpu: &Device, dtype: DType, tolerance: f32) -> Result<()> {
    let args = args(0.0);
    let cpu_model = Gpt::new(&args, 11, &Device::Cpu)?;
    let mut gpu_model = Gpt::new(&args, 11, gpu)?;
    gpu_model.set_compute_dtype(dtype);
    let (x, y) = batch(&args, 4, 5);
    let (cx, cy) = tensors(&x, &y, 4, &Device::Cpu)?;
    let (gx, gy) = tensors(&x, &y, 4, gpu)?;

    let logits_err = rel_err(&gpu_model.logits(&gx)?, &cpu_model.logits(&cx)?)?;
    let cpu_loss = cpu_model.loss(&cx, &cy, &Mode::Eval)?;
    let gpu_loss = gpu_model.loss(&gx, &gy, &Mode::Eval)?;
    let loss_err = rel_err(&gpu_loss, &cpu_loss)?;
    eprintln!(
        "{dtype:?}: loss cpu {:.5} gpu {:.5}; logits rel err {logits_err:.2e}, loss rel err {loss_err:.2e} (tolerance {tolerance:.0e})",
        cpu_loss.to_scalar::<f32>()?,
        gpu_loss.to_scalar::<f32>()?
    );
    assert!(logits_err < tolerance && loss_err < tolerance, "{dtype:?}: logits {logits_err}, loss {loss_err}");

    let mut cpu_grads = cpu_loss.backward()?;
    let mut gpu_grads = gpu_loss.backward()?;
    let mut worst = (0f32, String::new());
    for ((name, cpu_var), (_, gpu_var)) in cpu_model.named_parameters().into_iter().zip(gpu_model.named_parameters()) {
        let g_cpu = cpu_grads.remove(cpu_var.as_tensor()).unwrap_or_else(|| panic!("no CPU gradient for {name}"));
        let g_gpu = gpu_grads.remove(gpu_var.as_tensor()).unwrap_or_else(|| panic!("no GPU gradient for {name}"));
        assert_eq!(g_gpu.dtype(), DType::F32, "{name}: gradients of the master weights must be f32");
        let err = rel_err(&g_gpu, &g_cpu)?;
        if err > worst.0 {
            worst = (err, name.clone());
        }
        assert!(err < tolerance, "{dtype:?}: gradient of {name} differs by {err} (relative)");
    }
    eprintln!("{dtype:?}: worst gradient rel err {:.2e} ({})", worst.0, worst.1);
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn float32_matches_the_cpu_engine() -> Result<()> {
    let gpu = gpu();
    // TF32 keeps 10 mantissa bits in the matmuls.
    compare(&gpu, DType::F32, 1e-2)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bfloat16_matches_the_cpu_engine() -> Result<()> {
    let gpu = gpu();
    // bf16 keeps 8 mantissa bits.
    compare(&gpu, DType::BF16, 6e-2)
}

/// A few AdamW steps (with dropout, clipping and, for float16, loss scaling) on the GPU in each dtype,
/// on the fused step (float32 and bfloat16) and on candle's graph, follow the CPU's f32 losses.
#[test]
#[ignore = "needs a CUDA GPU"]
fn training_steps_track_the_cpu_engine() -> Result<()> {
    gpu();
    let args = args(0.1);
    let optimizer = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 };
    let (x, y) = batch(&args, 8, 9);
    let mut cpu = Engine::new(&args, 3, "cpu")?;
    cpu.configure_optimizer(&optimizer)?;
    let cpu_losses: Vec<f32> = (0..30)
        .map(|_| {
            let loss = cpu.forward_backward(&x, &y, 8, 1.0)?;
            cpu.step(3e-3)?;
            Ok(loss)
        })
        .collect::<Result<_>>()?;
    for (dtype, graph) in [("float32", false), ("bfloat16", false), ("float32", true), ("bfloat16", true), ("float16", true)] {
        let mut engine = Engine::new(&args, 3, "cuda")?;
        if graph {
            engine.train_on_graph()?;
        }
        engine.set_precision(dtype)?;
        engine.configure_optimizer(&optimizer)?;
        let mut skipped = 0;
        let mut losses = Vec::new();
        for _ in 0..30 {
            losses.push(engine.forward_backward(&x, &y, 8, 1.0)?);
            skipped += engine.step(3e-3)?.skipped as usize;
        }
        let (first, last) = (losses[0], losses[29]);
        eprintln!(
            "{dtype} on the {}: loss {first:.4} -> {last:.4} (cpu f32 {:.4} -> {:.4}), {skipped} skipped steps, loss scale {}",
            if graph { "graph" } else { "fused step" },
            cpu_losses[0],
            cpu_losses[29],
            engine.loss_scale()
        );
        assert!((first - cpu_losses[0]).abs() < 0.05 * cpu_losses[0], "{dtype}: first loss {first} vs {}", cpu_losses[0]);
        // Dropout masks differ between devices, so only the trend is compared.
        assert!(last < 0.9 * first && (last - cpu_losses[29]).abs() < 0.15 * cpu_losses[29], "{dtype}: {losses:?} vs {cpu_losses:?}");
        assert!(skipped <= 2, "{dtype}: {skipped} steps skipped");
        let memory = engine.memory_stats()?.expect("memory figures on a GPU");
        eprintln!("{dtype}: memory {memory:?}");
        assert!(memory.peak_bytes >= memory.in_use_bytes && memory.in_use_bytes > 0 && memory.total_bytes > 0);
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sampling_on_the_kernels_streams_what_a_batch_gives() -> Result<()> {
    gpu();
    let args = args(0.0);
    let sample = SampleArgs { max_new_tokens: args.block_size + 5, temperature: 0.8, top_k: Some(10), seed: 0 };
    let (prompt, seeds) = ([1u32, 2], [5u64, 6]);
    for dtype in ["float32", "bfloat16"] {
        let mut engine = Engine::new(&args, 3, "cuda")?;
        engine.set_precision(dtype)?;
        let batch = engine.generate_batch(&prompt, &seeds, &sample)?;
        assert!(
            batch.iter().all(|s| s.len() == prompt.len() + sample.max_new_tokens && s.iter().all(|&t| (t as usize) < args.vocab_size)),
            "{dtype}: {batch:?}"
        );
        engine.start_sampling(&prompt, &seeds, sample.temperature, sample.top_k)?;
        let mut streamed = vec![prompt.to_vec(); seeds.len()];
        for _ in 0..sample.max_new_tokens {
            for (seq, token) in streamed.iter_mut().zip(engine.next_tokens()?) {
                seq.push(token);
            }
        }
        assert_eq!(batch, streamed, "{dtype}: token by token against the whole batch");
    }
    Ok(())
}

/// A linear layer with a bias at GPT-2's shapes adds it in cuBLASLt's epilogue, in both precisions, and gets the
/// CPU kernel's values: `Kernels` falls back on a separate bias kernel only where cuBLASLt refuses a product,
/// and says so in `take_bias_fallback`. (The kernels' tests check the values at odd shapes, either way.)
#[test]
#[ignore = "needs a CUDA GPU"]
fn biases_are_added_in_cublaslt_epilogue() -> Result<()> {
    use std::sync::Arc;

    use nanogpt_core::cuda::Kernels;
    use nanogpt_core::kernels::cuda::{matmul, DeviceBuffer, Gpu, Precision};

    let kernels = Arc::new(Kernels::new(&gpu())?);
    let shared: Arc<dyn Gpu + Send + Sync> = kernels.clone();
    let (n, c, oc) = (256, 768, 2304);
    let mut rng = StdRng::seed_from_u64(9);
    let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let (inp, weight, bias) = (random(n * c), random(oc * c), random(oc));
    for x in [Precision::F32, Precision::Bf16] {
        // Values as precision x holds them, and on the device.
        let held = |values: &[f32]| -> Vec<f32> {
            match x {
                Precision::F32 => values.to_vec(),
                Precision::Bf16 => values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
            }
        };
        let upload = |values: &[f32]| -> Result<DeviceBuffer> {
            let buffer = DeviceBuffer::zeroed(&shared, values.len() * x.size_in_bytes())?;
            match x {
                Precision::F32 => buffer.upload_f32(values)?,
                Precision::Bf16 => {
                    buffer.upload_bytes(&values.iter().flat_map(|&v| half::bf16::from_f32(v).to_ne_bytes()).collect::<Vec<u8>>())?
                }
            }
            Ok(buffer)
        };
        let (inp, weight, bias) = (held(&inp), held(&weight), held(&bias));
        let out = DeviceBuffer::zeroed(&shared, n * oc * x.size_in_bytes())?;
        kernels.take_bias_fallback();
        matmul::forward(&*kernels, x, out.addr, upload(&inp)?.addr, upload(&weight)?.addr, Some(upload(&bias)?.addr), n, c, oc)?;
        assert_eq!(kernels.take_bias_fallback(), None, "{x:?}: the bias was not added in cuBLASLt's epilogue");

        let got: Vec<f32> = match x {
            Precision::F32 => out.download_f32()?,
            Precision::Bf16 => out.download_bytes()?.chunks_exact(2).map(|b| half::bf16::from_ne_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        let mut want = vec![0.0; n * oc];
        nanogpt_core::kernels::matmul::forward(&mut want, &inp, &weight, Some(&bias), n, c, oc, false);
        // Sums of 768 products of TF32- or bf16-rounded values, then bf16's rounding of the result.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 3e-2 * (1.0 + w.abs()), "{x:?} element {i}: got {g}, want {w}");
        }
    }
    Ok(())
}

/// cuDNN's attention (`NANOGPT_CUDA_ATTENTION=cudnn`) against the engine's kernels in bf16, at GPT-2's head size
/// and at 128, over lengths that are no multiple of any tile: the same outputs, log-sum-exps and gradients, within
/// bf16's rounding; and the engine's backward from cuDNN's forward, which the two sides' one lse allows.
#[test]
#[ignore = "needs a CUDA GPU and cuDNN 9"]
fn cudnn_attention_matches_the_engine_kernels() -> Result<()> {
    use std::sync::Arc;

    use nanogpt_core::cuda::Kernels;
    use nanogpt_core::kernels::cuda::attention::{self, AttentionKernels, WithAttention};
    use nanogpt_core::kernels::cuda::{DeviceBuffer, Gpu, Precision};

    let kernels = Arc::new(Kernels::new(&gpu())?);
    let shared: Arc<dyn Gpu + Send + Sync> = kernels.clone();
    let on = |which| WithAttention { gpu: &*kernels, kernels: which, warp_rows: kernels.attention_warp_rows() };
    let (engine, cudnn) = (on(AttentionKernels::Engine), on(AttentionKernels::Cudnn));
    let bf16_buffer = |values: &[f32]| -> Result<DeviceBuffer> {
        let buffer = DeviceBuffer::zeroed(&shared, values.len() * 2)?;
        buffer.upload_bytes(&values.iter().flat_map(|&v| half::bf16::from_f32(v).to_ne_bytes()).collect::<Vec<u8>>())?;
        Ok(buffer)
    };
    let bf16_values = |buffer: &DeviceBuffer| -> Result<Vec<f32>> {
        Ok(buffer.download_bytes()?.chunks_exact(2).map(|b| half::bf16::from_ne_bytes([b[0], b[1]]).to_f32()).collect())
    };
    // |got - want| over |want|, over the whole tensor.
    let relative = |got: &[f32], want: &[f32]| -> f32 {
        let diff: f32 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
        (diff / want.iter().map(|w| w * w).sum::<f32>()).sqrt()
    };
    let mut rng = StdRng::seed_from_u64(17);
    for (b, t, n_head, hs) in [(2, 300, 3, 64), (1, 129, 2, 128)] {
        let c = n_head * hs;
        let qkv = bf16_buffer(&(0..b * t * 3 * c).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>())?;
        let dout = bf16_buffer(&(0..b * t * c).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>())?;
        let delta = DeviceBuffer::zeroed(&shared, b * n_head * t * 4)?;
        let pass = |gpu: &dyn Gpu, backward_gpu: &dyn Gpu| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let out = DeviceBuffer::zeroed(&shared, b * t * c * 2)?;
            let lse = DeviceBuffer::zeroed(&shared, b * n_head * t * 4)?;
            let dqkv = DeviceBuffer::zeroed(&shared, b * t * 3 * c * 2)?;
            attention::forward(gpu, Precision::Bf16, out.addr, lse.addr, qkv.addr, b, t, c, n_head, None)?;
            attention::backward(
                backward_gpu,
                Precision::Bf16,
                dqkv.addr,
                dout.addr,
                qkv.addr,
                out.addr,
                lse.addr,
                delta.addr,
                b,
                t,
                c,
                n_head,
                None,
            )?;
            Ok((bf16_values(&out)?, lse.download_f32()?, bf16_values(&dqkv)?))
        };
        let (want_out, want_lse, want_dqkv) = pass(&engine, &engine)?;
        kernels.start_profile();
        let (out, lse, dqkv) = pass(&cudnn, &cudnn)?;
        let ran: Vec<String> = kernels.take_profile()?.into_iter().map(|k| k.name).collect();
        assert_eq!(ran, ["attention_forward_cudnn", "attention_backward_cudnn"], "what ran where cuDNN was asked for");
        let what = format!("B={b}, T={t}, n_head={n_head}, head size {hs}");
        assert!(relative(&out, &want_out) < 1e-2, "{what}: out differs by {}", relative(&out, &want_out));
        let lse_error = lse.iter().zip(&want_lse).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        assert!(lse_error < 1e-2, "{what}: lse differs by up to {lse_error}");
        assert!(relative(&dqkv, &want_dqkv) < 2e-2, "{what}: dqkv differs by {}", relative(&dqkv, &want_dqkv));
        let (_, _, mixed_dqkv) = pass(&cudnn, &engine)?;
        assert!(
            relative(&mixed_dqkv, &want_dqkv) < 2e-2,
            "{what}: the engine's backward from cuDNN's forward differs by {}",
            relative(&mixed_dqkv, &want_dqkv)
        );
    }
    Ok(())
}
