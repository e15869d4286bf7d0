//! The GPU training step (train_step_cuda.rs) against the CPU one (train_step.rs) on a small model:
//! the loss and every parameter gradient over two accumulated micro-steps, with and without biases and
//! dropout, with either GELU, and the parameters after an AdamW step with clipping; then the losses of a
//! 10-step training run. f32 is held tightly, bf16 loosely.

use nanogpt_core::kernels::cuda::Precision;
use nanogpt_core::kernels::dropout::DropoutKey;
use nanogpt_core::model::{Gelu, ModelArgs};
use nanogpt_core::optim::{FlatAdamW, OptimizerArgs};
use nanogpt_core::train_step::{self as cpu, Activations, ParamLayout};
use nanogpt_core::train_step_cuda::CudaTrainStep;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gpu::{assert_close, on_cuda_device, random, shared_gpu};

fn model(bias: bool, gelu: Gelu) -> ModelArgs {
    ModelArgs { n_layer: 2, n_head: 2, n_embd: 32, block_size: 8, vocab_size: 19, bias, dropout: 0.0, gelu }
}

/// Random weights, with LayerNorm weights near 1 as a trained model has them.
fn parameters(args: &ModelArgs) -> Vec<f32> {
    let layout = ParamLayout::new(args);
    let mut params = random(layout.len, 0.3, 11);
    for tensor in layout.tensors.iter().filter(|t| t.name.contains(".ln_") && t.name.ends_with(".weight")) {
        params[tensor.range.clone()].iter_mut().for_each(|w| *w += 1.0);
    }
    params
}

/// Tokens and targets for `micro_steps` batches of (b, t), with some targets ignored (-1).
fn batches(args: &ModelArgs, b: usize, t: usize, micro_steps: usize) -> Vec<(Vec<u32>, Vec<i32>)> {
    let mut rng = StdRng::seed_from_u64(5);
    (0..micro_steps)
        .map(|_| {
            let tokens = (0..b * t).map(|_| rng.random_range(0..args.vocab_size as u32)).collect();
            let targets = (0..b * t).map(|i| if i % 7 == 3 { -1 } else { rng.random_range(0..args.vocab_size as i32) }).collect();
            (tokens, targets)
        })
        .collect()
}

/// What a step produced: the micro-steps' losses, the summed gradients, and the parameters after
/// one AdamW step from them.
struct Step {
    losses: Vec<f32>,
    grads: Vec<f32>,
    params: Vec<f32>,
}

/// An f32 tolerance: `exact` where the products are f32 (the emulator), `tf32` on a CUDA device, whose f32
/// products round their inputs to TF32's 11 bits.
fn f32_tolerance(exact: f32, tf32: f32) -> f32 {
    if on_cuda_device() {
        tf32
    } else {
        exact
    }
}

const OPTIMIZER: OptimizerArgs = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 0.5 };

/// The same optimizer step on the CPU step and on the GPU step in precision `x`.
fn both(args: &ModelArgs, x: Precision, p: f32) -> (Step, Step) {
    let (b, t, micro_steps) = (2, 8, 2);
    let layout = ParamLayout::new(args);
    let params = parameters(args);
    let data = batches(args, b, t, micro_steps);
    let scale = 1.0 / micro_steps as f64;
    let dropout = |step: u64| (p > 0.0).then_some((DropoutKey { seed: 3, step }, p));

    let mut acts = Activations::new(args, b, t);
    let mut grads = vec![0f32; layout.len];
    let mut cpu_losses = Vec::new();
    for (step, (tokens, targets)) in data.iter().enumerate() {
        cpu::forward(args, &layout, &params, &mut acts, tokens, dropout(step as u64));
        cpu_losses.push(cpu::loss(args, &mut acts, targets, Some(scale)).unwrap());
        cpu::backward(args, &layout, &params, &mut grads, &mut acts, tokens, dropout(step as u64), step > 0);
    }
    let mut cpu_params = params.clone();
    FlatAdamW::new(&layout, OPTIMIZER).step(&layout, &mut cpu_params, &grads, 1e-2);

    let mut gpu = CudaTrainStep::new(shared_gpu(), args, x, &params).unwrap();
    gpu.zero_grads().unwrap();
    let mut gpu_losses = Vec::new();
    for (step, (tokens, targets)) in data.iter().enumerate() {
        gpu.forward(tokens, b, t, dropout(step as u64)).unwrap();
        gpu.loss(targets, Some(scale)).unwrap();
        gpu_losses.push(gpu.read_loss().unwrap());
        gpu.backward(dropout(step as u64), &mut |_| Ok(())).unwrap();
    }
    let gpu_grads = gpu.read_grads().unwrap();
    gpu.optimizer_step(&OPTIMIZER, 1e-2, &mut |_| Ok(())).unwrap();
    (
        Step { losses: cpu_losses, grads, params: cpu_params },
        Step { losses: gpu_losses, grads: gpu_grads, params: gpu.read_params().unwrap() },
    )
}

#[test]
fn f32_losses_and_gradients_match_the_cpu_step() {
    for (bias, gelu, p) in [(true, Gelu::Erf, 0.0), (false, Gelu::Tanh, 0.0), (true, Gelu::Tanh, 0.2)] {
        let args = model(bias, gelu);
        let (cpu, gpu) = both(&args, Precision::F32, p);
        let what = format!("bias={bias} gelu={gelu:?} dropout={p}");
        assert_close(&format!("losses, {what}"), &gpu.losses, &cpu.losses, f32_tolerance(1e-5, 1e-3));
        for tensor in &ParamLayout::new(&args).tensors {
            let r = tensor.range.clone();
            assert_close(&format!("d{}, {what}", tensor.name), &gpu.grads[r.clone()], &cpu.grads[r.clone()], f32_tolerance(1e-4, 1e-2));
            // Adam divides each gradient by its own magnitude: where that is rounding noise (the key bias's
            // gradient is zero in exact arithmetic, and TF32 makes noise of gradients below about 1e-3) the
            // two steps legitimately differ by up to lr.
            for i in r.filter(|&i| cpu.grads[i].abs() > f32_tolerance(1e-6, 1e-3)) {
                let (g, c) = (gpu.params[i], cpu.params[i]);
                assert!((g - c).abs() <= 1e-5 * (1.0 + c.abs()), "{}[{i}] after AdamW, {what}: got {g}, want {c}", tensor.name);
            }
        }
    }
}

#[test]
fn bf16_losses_and_gradients_follow_the_cpu_step() {
    let args = model(true, Gelu::Tanh);
    let (cpu, gpu) = both(&args, Precision::Bf16, 0.0);
    assert_close("losses", &gpu.losses, &cpu.losses, 2e-2);
    // bf16 activations keep 8 significant bits: each tensor's gradient is compared as a whole.
    for tensor in &ParamLayout::new(&args).tensors {
        let r = tensor.range.clone();
        let (g, c) = (&gpu.grads[r.clone()], &cpu.grads[r]);
        let error: f32 = g.iter().zip(c).map(|(g, c)| (g - c) * (g - c)).sum::<f32>().sqrt();
        let size: f32 = c.iter().map(|c| c * c).sum::<f32>().sqrt();
        assert!(error <= 5e-2 * size + 1e-6, "d{}: relative error {}", tensor.name, error / size);
    }
}

/// The losses of `steps` optimizer steps of one micro-step each, on the CPU step and on the GPU step.
fn training_run(args: &ModelArgs, x: Precision, steps: usize) -> (Vec<f32>, Vec<f32>) {
    let (b, t) = (2, 8);
    let layout = ParamLayout::new(args);
    let data = batches(args, b, t, steps);
    let lr = 3e-3;

    let mut params = parameters(args);
    let mut acts = Activations::new(args, b, t);
    let mut grads = vec![0f32; layout.len];
    let mut optimizer = FlatAdamW::new(&layout, OPTIMIZER);
    let mut gpu = CudaTrainStep::new(shared_gpu(), args, x, &params).unwrap();
    let (mut cpu_losses, mut gpu_losses) = (Vec::new(), Vec::new());
    for (tokens, targets) in &data {
        cpu::forward(args, &layout, &params, &mut acts, tokens, None);
        cpu_losses.push(cpu::loss(args, &mut acts, targets, Some(1.0)).unwrap());
        cpu::backward(args, &layout, &params, &mut grads, &mut acts, tokens, None, false);
        optimizer.step(&layout, &mut params, &grads, lr);

        gpu.zero_grads().unwrap();
        gpu.forward(tokens, b, t, None).unwrap();
        gpu.loss(targets, Some(1.0)).unwrap();
        gpu_losses.push(gpu.read_loss().unwrap());
        gpu.backward(None, &mut |_| Ok(())).unwrap();
        gpu.optimizer_step(&OPTIMIZER, lr, &mut |_| Ok(())).unwrap();
    }
    (cpu_losses, gpu_losses)
}

#[test]
fn ten_training_steps_give_the_cpu_steps_losses() {
    let args = model(false, Gelu::Tanh);
    let (cpu, gpu) = training_run(&args, Precision::F32, 10);
    assert!(cpu[9] < cpu[0], "the run should learn: losses {cpu:?}");
    assert_close("f32 losses over 10 steps", &gpu, &cpu, f32_tolerance(1e-4, 2e-3));
    let (cpu, gpu) = training_run(&args, Precision::Bf16, 10);
    assert_close("bf16 losses over 10 steps", &gpu, &cpu, 3e-2);
}
