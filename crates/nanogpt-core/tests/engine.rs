//! Correctness of the engine: gradients against finite differences and against candle's
//! composite ops, AdamW against hand-computed values, the LR schedule against nanoGPT's values,
//! clipping, the KV cache, checkpoints and sampling.

use std::collections::HashMap;

use candle_core::{Device, IndexOp, Result, Tensor};
use nanogpt_core::kernels::dropout::DropoutKey;
use nanogpt_core::model::{Gpt, KvCache, Mode};
use nanogpt_core::ops::with_composite_ops;
use nanogpt_core::optim::AdamW;
use nanogpt_core::sample::SampleArgs;
use nanogpt_core::{files, Engine, Gelu, GradScaler, LrSchedule, ModelArgs, OptimizerArgs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn tiny(bias: bool, dropout: f64, gelu: Gelu) -> ModelArgs {
    ModelArgs { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 11, bias, dropout, gelu }
}

fn batch(args: &ModelArgs, b: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = b * args.block_size;
    let x = (0..n).map(|_| rng.random_range(0..args.vocab_size as u32)).collect();
    let y = (0..n).map(|_| rng.random_range(0..args.vocab_size as i32)).collect();
    (x, y)
}

fn tensors(x: &[u32], y: &[i32], b: usize) -> Result<(Tensor, Tensor)> {
    let t = x.len() / b;
    let x = Tensor::from_slice(x, (b, t), &Device::Cpu)?;
    let y = Tensor::from_slice(y, (b, t), &Device::Cpu)?.to_dtype(candle_core::DType::I64)?;
    Ok((x, y))
}

/// Loss with dropout masks drawn from a fixed seed, so that repeated evaluations see the same masks.
fn loss_at(model: &Gpt, x: &Tensor, y: &Tensor, dropout_seed: u64) -> Result<Tensor> {
    model.loss(x, y, &Mode::Train(DropoutKey { seed: dropout_seed, step: 0 }))
}

fn gradients(model: &Gpt, x: &Tensor, y: &Tensor, dropout_seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut store = loss_at(model, x, y, dropout_seed)?.backward()?;
    model
        .named_parameters()
        .into_iter()
        .map(|(name, var)| {
            let g = store.remove(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reached {name}"));
            Ok((name, g))
        })
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// For every parameter tensor, the derivative of the loss along a random direction from central
/// finite differences must match the analytic gradient projected on that direction.
fn finite_difference_check(args: ModelArgs) -> Result<()> {
    let model = Gpt::new(&args, 7, &Device::Cpu)?;
    let (x, y) = batch(&args, 3, 11);
    let (x, y) = tensors(&x, &y, 3)?;
    let grads = gradients(&model, &x, &y, 5)?;
    let mut rng = StdRng::seed_from_u64(3);
    let eps = 1e-3f64;
    for ((name, var), (_, grad)) in model.named_parameters().into_iter().zip(&grads) {
        let original = var.as_tensor().copy()?;
        let direction: Vec<f32> = (0..var.elem_count()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let direction = Tensor::from_vec(direction, var.shape(), &Device::Cpu)?;
        let analytic = (grad * &direction)?.sum_all()?.to_scalar::<f32>()? as f64;
        var.set(&(&original + (&direction * eps)?)?)?;
        let plus = loss_at(&model, &x, &y, 5)?.to_scalar::<f32>()? as f64;
        var.set(&(&original - (&direction * eps)?)?)?;
        let minus = loss_at(&model, &x, &y, 5)?.to_scalar::<f32>()? as f64;
        var.set(&original)?;
        let numeric = (plus - minus) / (2.0 * eps);
        let tolerance = 2e-3 + 2e-2 * analytic.abs();
        assert!((numeric - analytic).abs() <= tolerance, "{name}: finite difference {numeric:.6e} vs gradient {analytic:.6e}");
        let norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!(norm > 1e-4, "{name}: gradient vanished (norm {norm:e})");
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences_with_bias() -> Result<()> {
    finite_difference_check(tiny(true, 0.0, Gelu::Erf))
}

#[test]
fn gradients_match_finite_differences_without_bias_tanh_gelu() -> Result<()> {
    finite_difference_check(tiny(false, 0.0, Gelu::Tanh))
}

#[test]
fn gradients_match_finite_differences_with_dropout() -> Result<()> {
    finite_difference_check(tiny(true, 0.2, Gelu::Erf))
}

#[test]
fn fused_cpu_kernels_match_candle_composite_ops() -> Result<()> {
    for (bias, gelu) in [(true, Gelu::Erf), (false, Gelu::Tanh)] {
        let args = ModelArgs { n_layer: 2, n_head: 4, n_embd: 32, block_size: 16, vocab_size: 37, bias, dropout: 0.0, gelu };
        let model = Gpt::new(&args, 1, &Device::Cpu)?;
        let (x, y) = batch(&args, 4, 2);
        let (x, y) = tensors(&x, &y, 4)?;
        let fused_loss = loss_at(&model, &x, &y, 0)?.to_scalar::<f32>()?;
        let composite_loss = with_composite_ops(|| loss_at(&model, &x, &y, 0))?.to_scalar::<f32>()?;
        assert!((fused_loss - composite_loss).abs() < 1e-5, "loss {fused_loss} vs {composite_loss}");
        let fused = gradients(&model, &x, &y, 0)?;
        let composite = with_composite_ops(|| gradients(&model, &x, &y, 0))?;
        for ((name, f), (_, c)) in fused.iter().zip(&composite) {
            let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = max_abs_diff(f, c);
            assert!(diff <= 1e-4 * scale.max(1e-3), "{name}: fused and composite gradients differ by {diff} (scale {scale})");
        }
    }
    Ok(())
}

#[test]
fn ignored_targets_do_not_count() -> Result<()> {
    let args = tiny(false, 0.0, Gelu::Erf);
    let model = Gpt::new(&args, 1, &Device::Cpu)?;
    let (x, mut y) = batch(&args, 2, 4);
    let (xt, yt) = tensors(&x, &y, 2)?;
    let full = model.loss(&xt, &yt, &Mode::Eval)?.to_scalar::<f32>()?;
    // Ignoring the second row leaves the mean loss of the first row only.
    let t = args.block_size;
    y[t..].iter_mut().for_each(|v| *v = -1);
    let (_, yt_half) = tensors(&x, &y, 2)?;
    let first_row_only = model.loss(&xt, &yt_half, &Mode::Eval)?.to_scalar::<f32>()?;
    let (x1, y1) = tensors(&x[..t], &y[..t], 1)?;
    let expected = model.loss(&x1, &y1, &Mode::Eval)?.to_scalar::<f32>()?;
    assert!((first_row_only - expected).abs() < 1e-6, "{first_row_only} vs {expected}");
    assert!((first_row_only - full).abs() > 1e-4);
    let composite = with_composite_ops(|| model.loss(&xt, &yt_half, &Mode::Eval))?.to_scalar::<f32>()?;
    assert!((composite - expected).abs() < 1e-5);
    Ok(())
}

#[test]
fn initialisation_follows_nanogpt() -> Result<()> {
    let args = ModelArgs { n_layer: 6, n_head: 4, n_embd: 128, block_size: 64, vocab_size: 65, bias: true, dropout: 0.0, gelu: Gelu::Erf };
    let model = Gpt::new(&args, 1337, &Device::Cpu)?;
    let std = |t: &Tensor| -> f32 {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    };
    for (name, var) in model.named_parameters() {
        let t = var.as_tensor();
        if name.ends_with("c_proj.weight") {
            let expected = 0.02 / (12f32).sqrt();
            assert!((std(t) - expected).abs() < 0.05 * expected, "{name}: std {}", std(t));
        } else if t.rank() == 2 {
            assert!((std(t) - 0.02).abs() < 0.001, "{name}: std {}", std(t));
        } else if name.ends_with("bias") {
            assert_eq!(t.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0, "{name}");
        } else {
            assert_eq!(t.to_vec1::<f32>()?, vec![1.0; t.elem_count()], "{name}");
        }
    }
    // nanoGPT's README CPU model: 0.80M parameters without the position embedding.
    let cpu_recipe =
        ModelArgs { n_layer: 4, n_head: 4, n_embd: 128, block_size: 64, vocab_size: 65, bias: false, dropout: 0.0, gelu: Gelu::Erf };
    let model = Gpt::new(&cpu_recipe, 0, &Device::Cpu)?;
    assert_eq!(model.num_params(true), 795_904);
    assert_eq!(model.num_params(false), 804_096);
    Ok(())
}

#[test]
fn lr_schedule_matches_nanogpt_values() {
    let defaults = LrSchedule { learning_rate: 6e-4, min_lr: 6e-5, warmup_iters: 2000, lr_decay_iters: 600_000, decay_lr: true };
    for (iter, expected) in [(0, 2.9985e-7), (1999, 5.997e-4), (2000, 6e-4), (301_000, 3.3e-4), (600_000, 6e-5), (700_000, 6e-5)] {
        let lr = defaults.lr_at(iter);
        assert!((lr - expected).abs() <= 1e-4 * expected, "iter {iter}: {lr} vs {expected}");
    }
    let shakespeare = LrSchedule { learning_rate: 1e-3, min_lr: 1e-4, warmup_iters: 100, lr_decay_iters: 5000, decay_lr: true };
    for (iter, expected) in [(0, 9.90099e-6), (100, 1e-3), (2550, 5.5e-4), (5000, 1e-4)] {
        let lr = shakespeare.lr_at(iter);
        assert!((lr - expected).abs() <= 1e-4 * expected, "iter {iter}: {lr} vs {expected}");
    }
    let constant = LrSchedule { decay_lr: false, ..shakespeare };
    assert_eq!(constant.lr_at(0), 1e-3);
    assert_eq!(constant.lr_at(4000), 1e-3);
}

fn adamw_fixture(grad_clip: f64) -> Result<(AdamW, candle_core::Var, candle_core::Var)> {
    let matrix = candle_core::Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu)?)?;
    let vector = candle_core::Var::from_tensor(&Tensor::new(&[0.25f32, -1.0], &Device::Cpu)?)?;
    let args = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip };
    let opt = AdamW::new(vec![("w".into(), matrix.clone()), ("b".into(), vector.clone())], args)?;
    Ok((opt, matrix, vector))
}

#[test]
fn adamw_step_matches_hand_computed_values() -> Result<()> {
    let (mut opt, matrix, vector) = adamw_fixture(0.0)?;
    let groups = opt.groups();
    assert_eq!((groups.decay_tensors, groups.decay_params, groups.no_decay_tensors, groups.no_decay_params), (1, 4, 1, 2));
    let g1 = [Tensor::new(&[[0.1f32, -0.2], [0.3, 0.0]], &Device::Cpu)?, Tensor::new(&[0.5f32, -0.05], &Device::Cpu)?];
    let g2 = [Tensor::new(&[[0.2f32, 0.1], [-0.3, 0.4]], &Device::Cpu)?, Tensor::new(&[-0.5f32, 0.05], &Device::Cpu)?];
    let first = opt.step(&g1, 1e-2)?;
    opt.step(&g2, 5e-3)?;
    // The update/weight ratio of the first step, by hand: each entry with a gradient moves by lr·sign(g) plus the
    // decay -lr·wd·w, so Δw = [-0.011, 0.012, -0.0105, -0.003] (the last has no gradient and only decays),
    // against ‖w‖ = sqrt(1 + 4 + 0.25 + 9).
    let (name, ratio) = &first.update_ratios[0];
    let expected = ((0.011f64.powi(2) + 0.012f64.powi(2) + 0.0105f64.powi(2) + 0.003f64.powi(2)) / 14.25).sqrt();
    assert_eq!(name, "w");
    assert!((ratio - expected).abs() < 1e-3 * expected, "{ratio} vs {expected}");
    // PyTorch AdamW by hand, two steps, f64: p <- p(1 - lr wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + 1e-8).
    let hand = |p0: f64, ga: f64, gb: f64, wd: f64| -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.95f64, 1e-8f64);
        let m1 = (1.0 - b1) * ga;
        let v1 = (1.0 - b2) * ga * ga;
        let p1 = p0 * (1.0 - 1e-2 * wd) - 1e-2 / (1.0 - b1) * m1 / ((v1 / (1.0 - b2)).sqrt() + eps);
        let m2 = b1 * m1 + (1.0 - b1) * gb;
        let v2 = b2 * v1 + (1.0 - b2) * gb * gb;
        p1 * (1.0 - 5e-3 * wd) - 5e-3 / (1.0 - b1 * b1) * m2 / ((v2 / (1.0 - b2 * b2)).sqrt() + eps)
    };
    let expected_matrix = [hand(1.0, 0.1, 0.2, 0.1), hand(-2.0, -0.2, 0.1, 0.1), hand(0.5, 0.3, -0.3, 0.1), hand(3.0, 0.0, 0.4, 0.1)];
    let expected_vector = [hand(0.25, 0.5, -0.5, 0.0), hand(-1.0, -0.05, 0.05, 0.0)];
    // The first entry worked through on paper: 1 -> 0.999 - 0.01 = 0.989 -> 0.9885055 - 0.0047899 = 0.9837156.
    assert!((expected_matrix[0] - 0.983_715_6).abs() < 1e-6, "{}", expected_matrix[0]);
    let got_matrix = matrix.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let got_vector = vector.as_tensor().to_vec1::<f32>()?;
    for (g, e) in got_matrix.iter().zip(expected_matrix).chain(got_vector.iter().zip(expected_vector)) {
        assert!((*g as f64 - e).abs() < 1e-6, "{g} vs {e}");
    }
    Ok(())
}

#[test]
fn clipping_scales_gradients_to_the_global_norm() -> Result<()> {
    // Global norm of these gradients: sqrt(3^2 + 4^2) = 5.
    let grads = [Tensor::new(&[[3.0f32, 0.0], [0.0, 0.0]], &Device::Cpu)?, Tensor::new(&[0.0f32, 4.0], &Device::Cpu)?];
    let exp_avg = |opt: &AdamW| -> Vec<f32> {
        let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
        let mut v = state["w.exp_avg"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.extend(state["b.exp_avg"].to_vec1::<f32>().unwrap());
        v
    };
    let (mut clipped, ..) = adamw_fixture(1.0)?;
    let stats = clipped.step(&grads, 1e-3)?;
    assert!((stats.grad_norm - 5.0).abs() < 1e-6 && stats.clipped);
    let m = exp_avg(&clipped);
    // exp_avg = (1 - beta1) * g * 1/(5 + 1e-6)
    assert!((m[0] - 0.1 * 3.0 / 5.0).abs() < 1e-6 && (m[5] - 0.1 * 4.0 / 5.0).abs() < 1e-6, "{m:?}");

    let (mut unclipped, ..) = adamw_fixture(0.0)?;
    let stats = unclipped.step(&grads, 1e-3)?;
    assert!(!stats.clipped);
    assert!((exp_avg(&unclipped)[0] - 0.3).abs() < 1e-6);

    let (mut under_threshold, ..) = adamw_fixture(10.0)?;
    assert!(!under_threshold.step(&grads, 1e-3)?.clipped);
    assert!((exp_avg(&under_threshold)[0] - 0.3).abs() < 1e-6);
    Ok(())
}

#[test]
fn kv_cache_logits_equal_full_recompute() -> Result<()> {
    for bias in [true, false] {
        let args = ModelArgs { n_layer: 3, n_head: 2, n_embd: 16, block_size: 12, vocab_size: 19, bias, dropout: 0.1, gelu: Gelu::Erf };
        let model = Gpt::new(&args, 9, &Device::Cpu)?;
        let tokens: Vec<u32> = (0..12).map(|i| (i * 5 % 19) as u32).collect();
        let full = model.logits(&Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
        let mut cache = KvCache::new(args.n_layer);
        // A 4-token prompt, then one token at a time.
        let mut fed = 0;
        for end in [4, 5, 6, 7, 8, 9, 10, 11, 12] {
            let idx = Tensor::new(&tokens[fed..end], &Device::Cpu)?.unsqueeze(0)?;
            let cached = model.next_token_logits(&idx, Some(&mut cache))?;
            fed = end;
            let expected = full.i((.., end - 1, ..))?;
            let diff = max_abs_diff(&cached, &expected);
            assert!(diff < 1e-5, "position {}: cache differs by {diff}", end - 1);
        }
        assert_eq!(cache.len(), 12);
    }
    Ok(())
}

#[test]
fn checkpoint_round_trip_restores_weights_and_optimizer() -> Result<()> {
    let args = tiny(true, 0.0, Gelu::Erf);
    let opt = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 };
    let mut a = Engine::new(&args, 1, "cpu")?;
    a.configure_optimizer(&opt)?;
    let (x, y) = batch(&args, 2, 8);
    for _ in 0..3 {
        a.forward_backward(&x, &y, 2, 1.0)?;
        a.step(1e-3)?;
    }
    let mut b = Engine::from_safetensors(&args, &files::to_vec(|out| a.save_weights(out))?, "cpu")?;
    b.configure_optimizer(&opt)?;
    b.load_optimizer(&files::to_vec(|out| a.save_optimizer(out))?)?;
    assert_eq!(a.eval_loss(&x, &y, 2)?, b.eval_loss(&x, &y, 2)?);
    // The next step from restored state is the same step.
    for e in [&mut a, &mut b] {
        e.forward_backward(&x, &y, 2, 1.0)?;
        e.step(1e-3)?;
    }
    assert_eq!(a.eval_loss(&x, &y, 2)?, b.eval_loss(&x, &y, 2)?);

    let other = ModelArgs { n_embd: 32, ..args.clone() };
    let err = Engine::from_safetensors(&other, &files::to_vec(|out| a.save_weights(out))?, "cpu").err().expect("shape mismatch must fail");
    assert!(err.to_string().contains("shape"), "{err}");
    assert!(Engine::from_safetensors(&args, b"not a checkpoint", "cpu").is_err());
    Ok(())
}

#[test]
fn a_restored_engine_continues_the_dropout_masks_where_it_was_saved() -> Result<()> {
    let args = tiny(true, 0.2, Gelu::Erf);
    let opt = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 };
    let (x, y) = batch(&args, 2, 8);
    let train = |engine: &mut Engine, steps: usize| -> Result<()> {
        for _ in 0..steps {
            for _ in 0..2 {
                engine.accumulate(&x, &y, 2, 0.5)?;
            }
            engine.step(1e-3)?;
        }
        Ok(())
    };
    let mut uninterrupted = Engine::new(&args, 5, "cpu")?;
    uninterrupted.configure_optimizer(&opt)?;
    train(&mut uninterrupted, 1)?;
    let (weights, optimizer) =
        (files::to_vec(|out| uninterrupted.save_weights(out))?, files::to_vec(|out| uninterrupted.save_optimizer(out))?);
    train(&mut uninterrupted, 2)?;
    let expected = files::to_vec(|out| uninterrupted.save_weights(out))?;

    let resumed = |stream: Option<(u64, u64)>| -> Result<Vec<u8>> {
        let mut engine = Engine::from_safetensors(&args, &weights, "cpu")?;
        engine.configure_optimizer(&opt)?;
        engine.load_optimizer(&optimizer)?;
        if let Some((seed, micro_step)) = stream {
            engine.set_dropout_stream(seed, micro_step);
        }
        train(&mut engine, 2)?;
        files::to_vec(|out| engine.save_weights(out))
    };
    // Two micro-steps were taken before the save.
    assert!(resumed(Some((5, 2)))? == expected, "the resumed steps draw the uninterrupted run's masks");
    assert!(resumed(None)? != expected, "a loaded model's own masks are not the run's");
    assert!(resumed(Some((5, 0)))? != expected, "the masks of the run's first steps are not those of its next");
    Ok(())
}

#[test]
fn accumulate_defers_the_loss_until_it_is_read() -> Result<()> {
    for (dtype, device_note) in [(candle_core::DType::F32, "explicit step"), (candle_core::DType::F16, "graph")] {
        let args = tiny(true, 0.0, Gelu::Erf);
        let (x, y) = batch(&args, 2, 4);
        let (mut a, mut b) = (Engine::new(&args, 1, "cpu")?, Engine::new(&args, 1, "cpu")?);
        a.set_compute_dtype(dtype)?;
        b.set_compute_dtype(dtype)?;
        assert!(a.last_loss().is_err(), "{device_note}: no loss before the first micro-step");
        let expected = a.forward_backward(&x, &y, 2, 1.0)?;
        b.accumulate(&x, &y, 2, 1.0)?;
        assert_eq!(b.last_loss()?, expected, "{device_note}");
        assert_eq!(b.last_loss()?, expected, "{device_note}: reading twice gives the same loss");
    }
    Ok(())
}

#[test]
fn gradient_accumulation_averages_micro_batches() -> Result<()> {
    let args = tiny(false, 0.0, Gelu::Erf);
    let opt = OptimizerArgs { weight_decay: 0.0, beta1: 0.9, beta2: 0.99, grad_clip: 0.0 };
    let (x, y) = batch(&args, 4, 21);
    let half = x.len() / 2;
    let mut whole = Engine::new(&args, 3, "cpu")?;
    whole.configure_optimizer(&opt)?;
    whole.forward_backward(&x, &y, 4, 1.0)?;
    let mut accumulated = Engine::new(&args, 3, "cpu")?;
    accumulated.configure_optimizer(&opt)?;
    accumulated.forward_backward(&x[..half], &y[..half], 2, 0.5)?;
    accumulated.forward_backward(&x[half..], &y[half..], 2, 0.5)?;
    let (s1, s2) = (whole.step(1e-2)?, accumulated.step(1e-2)?);
    assert!((s1.grad_norm - s2.grad_norm).abs() < 1e-5 * s1.grad_norm, "{} vs {}", s1.grad_norm, s2.grad_norm);
    assert!((whole.eval_loss(&x, &y, 4)? - accumulated.eval_loss(&x, &y, 4)?).abs() < 1e-5);
    Ok(())
}

#[test]
fn training_reduces_the_loss() -> Result<()> {
    let args = tiny(false, 0.0, Gelu::Erf);
    let mut engine = Engine::new(&args, 1, "cpu")?;
    engine.configure_optimizer(&OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 })?;
    // A learnable pattern: each target is the input plus one.
    let x: Vec<u32> = (0..32).map(|i| (i % 10) as u32).collect();
    let y: Vec<i32> = x.iter().map(|&v| v as i32 + 1).collect();
    let before = engine.eval_loss(&x, &y, 4)?;
    for _ in 0..60 {
        engine.forward_backward(&x, &y, 4, 1.0)?;
        engine.step(1e-2)?;
    }
    let after = engine.eval_loss(&x, &y, 4)?;
    assert!(after < 0.2 * before, "loss {before} -> {after}");
    Ok(())
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() -> Result<()> {
    let args = tiny(true, 0.0, Gelu::Erf);
    let engine = Engine::new(&args, 5, "cpu")?;
    let sample = |seed, top_k| engine.generate(&[1, 2, 3], &SampleArgs { max_new_tokens: 20, temperature: 0.8, top_k, seed }).unwrap();
    assert_eq!(sample(1, None), sample(1, None));
    assert_ne!(sample(1, None), sample(2, None));
    let out = sample(1, None);
    assert_eq!(out.len(), 23);
    assert_eq!(&out[..3], &[1, 2, 3]);
    // Greedy by hand (context cropped to the block size), against top_k = 1.
    let mut greedy = vec![1u32, 2, 3];
    for _ in 0..20 {
        let start = greedy.len().saturating_sub(args.block_size);
        let idx = Tensor::new(&greedy[start..], &Device::Cpu)?.unsqueeze(0)?;
        let logits = engine.model().next_token_logits(&idx, None)?.squeeze(0)?;
        greedy.push(logits.argmax(0)?.to_scalar::<u32>()?);
    }
    assert_eq!(sample(1, Some(1)), greedy);
    assert_eq!(sample(2, Some(1)), greedy);
    Ok(())
}

/// nanoGPT's definitions on a hand-made vector: logits / temperature, every logit below the k-th
/// largest set to -inf (ties with it kept), softmax.
#[test]
fn temperature_and_top_k_follow_nanogpt() {
    let probabilities = |temperature: f64, top_k: Option<usize>| {
        let mut logits = [1.0f32, 2.0, 3.0, 4.0, 4.0];
        let total = nanogpt_core::sample::weights_in_place(&mut logits, temperature, top_k, &mut Vec::new());
        logits.map(|w| w as f64 / total)
    };
    let softmax = |scaled: &[f64]| {
        let sum: f64 = scaled.iter().map(|x| x.exp()).sum();
        scaled.iter().map(|x| x.exp() / sum).collect::<Vec<_>>()
    };
    let close = |got: [f64; 5], want: Vec<f64>| {
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    };
    // Temperature 2 halves the logits; top-2 keeps the two tied 4s.
    close(probabilities(2.0, Some(2)), vec![0.0, 0.0, 0.0, 0.5, 0.5]);
    // Top-3 keeps 3 and both 4s.
    let kept = softmax(&[1.5, 2.0, 2.0]);
    close(probabilities(2.0, Some(3)), vec![0.0, 0.0, kept[0], kept[1], kept[2]]);
    // No limit (or a limit above the vocabulary) at temperature 0.5 doubles them.
    close(probabilities(0.5, None), softmax(&[2.0, 4.0, 6.0, 8.0, 8.0]));
    close(probabilities(0.5, Some(200)), softmax(&[2.0, 4.0, 6.0, 8.0, 8.0]));
}

#[test]
fn top_k_keeps_only_the_k_largest() {
    let logits = [0.0f32, 5.0, 1.0, 4.0, 3.0];
    let mut rng = StdRng::seed_from_u64(0);
    let mut seen = std::collections::HashSet::new();
    let mut selection = Vec::new();
    for _ in 0..500 {
        seen.insert(nanogpt_core::sample::sample_token(&mut logits.clone(), 1.0, Some(2), &mut selection, &mut rng));
    }
    assert_eq!(seen, [1u32, 3].into_iter().collect());
}

#[test]
fn bad_batches_are_rejected_with_a_reason() -> Result<()> {
    let args = tiny(false, 0.0, Gelu::Erf);
    let engine = Engine::new(&args, 1, "cpu")?;
    let err = engine.eval_loss(&[1, 2, 99], &[1, 2, 3], 1).unwrap_err().to_string();
    assert!(err.contains("99") && err.contains("vocab_size"), "{err}");
    let err = engine.eval_loss(&[0; 24], &[0; 24], 1).unwrap_err().to_string();
    assert!(err.contains("block size"), "{err}");
    let bad = ModelArgs { n_head: 3, ..args };
    assert!(Engine::new(&bad, 1, "cpu").err().unwrap().to_string().contains("divisible"));
    Ok(())
}

#[test]
fn float16_training_tracks_float32_with_f32_master_weights() -> Result<()> {
    let args = tiny(true, 0.0, Gelu::Erf);
    let optimizer = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 };
    let (mut full, mut half) = (Engine::new(&args, 3, "cpu")?, Engine::new(&args, 3, "cpu")?);
    // candle's CPU matmul has f16 but no bf16: the mixed-precision path is exercised here with f16.
    half.set_compute_dtype(candle_core::DType::F16)?;
    assert_eq!(half.loss_scale(), 65536.0);
    full.configure_optimizer(&optimizer)?;
    half.configure_optimizer(&optimizer)?;
    let x: Vec<u32> = (0..32).map(|i| (i % 10) as u32).collect();
    let y: Vec<i32> = x.iter().map(|&v| v as i32 + 1).collect();
    let (mut first, mut last) = (0.0, 0.0);
    for i in 0..40 {
        let l_full = full.forward_backward(&x, &y, 4, 1.0)?;
        let l_half = half.forward_backward(&x, &y, 4, 1.0)?;
        assert!((l_full - l_half).abs() < 0.05 * l_full.max(0.2), "step {i}: f32 loss {l_full}, f16 loss {l_half}");
        full.step(1e-2)?;
        assert!(!half.step(1e-2)?.skipped);
        (first, last) = (if i == 0 { l_half } else { first }, l_half);
    }
    assert!(last < 0.5 * first, "f16 loss {first} -> {last}");
    for (name, var) in half.model().named_parameters() {
        assert_eq!(var.dtype(), candle_core::DType::F32, "{name}");
    }
    assert!(half.model().logits(&Tensor::new(&[[1u32, 2]], &Device::Cpu)?)?.dtype() == candle_core::DType::F32);
    Ok(())
}

#[test]
fn cpu_engine_accepts_only_float32() -> Result<()> {
    let mut engine = Engine::new(&tiny(false, 0.0, Gelu::Erf), 1, "cpu")?;
    engine.set_precision("float32")?;
    let err = engine.set_precision("bfloat16").unwrap_err().to_string();
    assert!(err.contains("bfloat16 needs a GPU"), "{err}");
    assert!(engine.set_precision("float64").unwrap_err().to_string().contains("float32, bfloat16 or float16"));
    Ok(())
}

#[test]
fn loss_scaling_skips_overflowing_steps_and_halves_the_scale() -> Result<()> {
    let (mut opt, matrix, vector) = adamw_fixture(1.0)?;
    let mut scaler = GradScaler::default();
    let before = matrix.as_tensor().to_vec2::<f32>()?;
    let overflow =
        vec![Tensor::new(&[[f32::INFINITY, 0.0], [0.0, 0.0]], &Device::Cpu)?, Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?];
    let stats = opt.step_scaled(&overflow, 1e-2, &mut scaler)?;
    assert!(stats.skipped && opt.steps_taken() == 0);
    assert_eq!(matrix.as_tensor().to_vec2::<f32>()?, before);
    assert_eq!(scaler.scale(), 32768.0);
    // Finite gradients are unscaled before clipping: the same update as unscaled gradients without a scaler.
    let grads = [Tensor::new(&[[0.5f32, -1.0], [2.0, 0.0]], &Device::Cpu)?, Tensor::new(&[1.0f32, -0.5], &Device::Cpu)?];
    let scaled: Vec<Tensor> = grads.iter().map(|g| g.affine(scaler.scale(), 0.0)).collect::<Result<_>>()?;
    let stats = opt.step_scaled(&scaled, 1e-2, &mut scaler)?;
    let (mut reference, ref_matrix, ref_vector) = adamw_fixture(1.0)?;
    let expected = reference.step(&grads, 1e-2)?;
    assert!(!stats.skipped && (stats.grad_norm - expected.grad_norm).abs() < 1e-6 && stats.clipped == expected.clipped);
    assert!(max_abs_diff(matrix.as_tensor(), ref_matrix.as_tensor()) < 1e-6);
    assert!(max_abs_diff(vector.as_tensor(), ref_vector.as_tensor()) < 1e-6);
    Ok(())
}

/// The CPU decoder (flat parameters, preallocated KV cache, cropped-window prefill) samples the same
/// tokens as the candle model's generation, within and past the block; batched, streamed and single
/// sequences agree.
#[test]
fn cpu_decoder_samples_what_the_candle_model_samples() -> Result<()> {
    let args = tiny(true, 0.0, Gelu::Erf);
    let mut engine = Engine::new(&args, 3, "cpu")?;
    let sample = SampleArgs { max_new_tokens: 3 * args.block_size, temperature: 0.8, top_k: Some(4), seed: 21 };
    let prompt = [1u32, 2, 3];
    let decoded = engine.generate(&prompt, &sample)?;
    let through_candle = nanogpt_core::sample::generate(engine.model(), &prompt, &sample)?;
    assert_eq!(decoded, through_candle);
    let batch = engine.generate_batch(&prompt, &[21, 22], &sample)?;
    assert_eq!(batch[0], decoded);
    engine.start_sampling(&prompt, &[21, 22], sample.temperature, sample.top_k)?;
    let mut streamed = vec![prompt.to_vec(), prompt.to_vec()];
    for _ in 0..sample.max_new_tokens {
        for (sequence, token) in streamed.iter_mut().zip(engine.next_tokens()?) {
            sequence.push(token);
        }
    }
    assert_eq!(streamed, batch);
    Ok(())
}

#[test]
fn devices_it_has_no_engine_for_are_refused_with_the_fix() -> Result<()> {
    let refusal = |name: &str| Engine::new(&tiny(false, 0.0, Gelu::Tanh), 0, name).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refusal("mps").starts_with("device `mps` (Apple's Metal) has no engine here; use --device=cpu"), "{}", refusal("mps"));
    assert!(refusal("tpu").starts_with("unknown device `tpu`: use cpu, cuda or cuda:N"), "{}", refusal("tpu"));
    // The names alone, as the front end checks them before it reads any data.
    assert_eq!(nanogpt_core::engine::device_ordinal("cpu")?, None);
    assert_eq!(nanogpt_core::engine::device_ordinal("cuda")?, Some(0));
    assert_eq!(nanogpt_core::engine::device_ordinal("cuda:3")?, Some(3));
    for name in ["gpu", "cuda:", "cuda:x", "mps"] {
        assert!(nanogpt_core::engine::device_ordinal(name).is_err(), "{name}");
    }
    Ok(())
}
