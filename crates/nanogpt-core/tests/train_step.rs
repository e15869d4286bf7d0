//! The explicit CPU training step against candle's autograd (the composite ops as reference) and
//! finite differences, gradient accumulation, and AdamW over the flat buffers against hand-computed values.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor};
use nanogpt_core::kernels::dropout::DropoutKey;
use nanogpt_core::model::{Gpt, Mode};
use nanogpt_core::ops::with_composite_ops;
use nanogpt_core::optim::{AdamW, FlatAdamW};
use nanogpt_core::train_step::{self, Activations, ParamLayout};
use nanogpt_core::{Gelu, ModelArgs, OptimizerArgs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn args(bias: bool, dropout: f64, gelu: Gelu) -> ModelArgs {
    ModelArgs { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 11, bias, dropout, gelu }
}

const CASES: [(bool, f64, Gelu); 4] = [(true, 0.0, Gelu::Erf), (false, 0.0, Gelu::Tanh), (true, 0.2, Gelu::Erf), (false, 0.3, Gelu::Tanh)];

fn batch(args: &ModelArgs, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = (0..b * t).map(|_| rng.random_range(0..args.vocab_size as u32)).collect();
    let y = (0..b * t).map(|_| rng.random_range(0..args.vocab_size as i32)).collect();
    (x, y)
}

fn flat_params(model: &Gpt) -> Result<(ParamLayout, Vec<f32>)> {
    let layout = ParamLayout::new(&model.args);
    let mut params = vec![0f32; layout.len];
    for (t, (_, var)) in layout.tensors.iter().zip(model.named_parameters()) {
        params[t.range.clone()].copy_from_slice(&var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((layout, params))
}

fn dropout_of(args: &ModelArgs, key: DropoutKey) -> Option<(DropoutKey, f32)> {
    (args.dropout > 0.0).then_some((key, args.dropout as f32))
}

/// Loss of the explicit step; with `grads`, its backward pass writes (or adds to) them.
#[allow(clippy::too_many_arguments)]
fn flat_step(
    args: &ModelArgs,
    layout: &ParamLayout,
    params: &[f32],
    x: &[u32],
    y: &[i32],
    b: usize,
    key: DropoutKey,
    grads: Option<(&mut [f32], bool)>,
) -> Result<f32> {
    let t = x.len() / b;
    let mut acts = Activations::new(args, b, t);
    let dropout = dropout_of(args, key);
    train_step::forward(args, layout, params, &mut acts, x, dropout);
    let loss = train_step::loss(args, &mut acts, y, grads.as_ref().map(|_| 1.0))?;
    if let Some((grads, accumulate)) = grads {
        train_step::backward(args, layout, params, grads, &mut acts, x, dropout, accumulate);
    }
    Ok(loss)
}

fn reference_gradients(model: &Gpt, x: &[u32], y: &[i32], b: usize, key: DropoutKey) -> Result<(f32, Vec<(String, Tensor)>)> {
    let t = x.len() / b;
    let xt = Tensor::from_slice(x, (b, t), &Device::Cpu)?;
    let yt = Tensor::from_slice(y, (b, t), &Device::Cpu)?.to_dtype(candle_core::DType::I64)?;
    let loss = model.loss(&xt, &yt, &Mode::Train(key))?;
    let mut store = loss.backward()?;
    let grads = model
        .named_parameters()
        .into_iter()
        .map(|(name, var)| (name.clone(), store.remove(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reached {name}"))))
        .collect();
    Ok((loss.to_scalar::<f32>()?, grads))
}

#[test]
fn layout_follows_the_models_named_parameters() -> Result<()> {
    for bias in [false, true] {
        let model = Gpt::new(&args(bias, 0.0, Gelu::Erf), 0, &Device::Cpu)?;
        let layout = ParamLayout::new(&model.args);
        let expected: Vec<(String, Vec<usize>)> = model.named_parameters().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
        let got: Vec<(String, Vec<usize>)> = layout.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        assert_eq!(got, expected);
        assert_eq!(layout.len, model.num_params(false));
    }
    Ok(())
}

#[test]
fn explicit_step_matches_candle_autograd() -> Result<()> {
    for (bias, dropout, gelu) in CASES {
        let args = args(bias, dropout, gelu);
        let model = Gpt::new(&args, 1, &Device::Cpu)?;
        let (layout, params) = flat_params(&model)?;
        // T shorter than the block size: the position embedding's unused rows get zero gradient.
        let (b, t) = (3, 6);
        let (x, y) = batch(&args, b, t, 2);
        let key = DropoutKey { seed: 9, step: 4 };
        let mut grads = vec![f32::NAN; layout.len];
        let loss = flat_step(&args, &layout, &params, &x, &y, b, key, Some((&mut grads, false)))?;
        let (composite_loss, composite) = with_composite_ops(|| reference_gradients(&model, &x, &y, b, key))?;
        let (fused_loss, fused) = reference_gradients(&model, &x, &y, b, key)?;
        let case = format!("bias={bias} dropout={dropout} gelu={gelu:?}");
        assert!(
            (loss - composite_loss).abs() < 1e-5 && (loss - fused_loss).abs() < 1e-5,
            "{case}: loss {loss} vs {composite_loss} / {fused_loss}"
        );
        for ((tensor, (name, c)), (_, f)) in layout.tensors.iter().zip(&composite).zip(&fused) {
            let c = c.flatten_all()?.to_vec1::<f32>()?;
            let f = f.flatten_all()?.to_vec1::<f32>()?;
            let ours = &grads[tensor.range.clone()];
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            for (reference, what) in [(&c, "composite"), (&f, "fused")] {
                let diff = ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-4 * scale, "{case}: {name} differs from {what} autograd by {diff} (scale {scale})");
            }
        }
    }
    Ok(())
}

#[test]
fn explicit_step_matches_finite_differences() -> Result<()> {
    for (bias, dropout, gelu) in CASES {
        let args = args(bias, dropout, gelu);
        let model = Gpt::new(&args, 7, &Device::Cpu)?;
        let (layout, params) = flat_params(&model)?;
        let (x, y) = batch(&args, 3, 8, 11);
        let key = DropoutKey { seed: 5, step: 0 };
        let mut grads = vec![0f32; layout.len];
        flat_step(&args, &layout, &params, &x, &y, 3, key, Some((&mut grads, false)))?;
        let mut rng = StdRng::seed_from_u64(3);
        let eps = 1e-3f32;
        for tensor in &layout.tensors {
            let range = tensor.range.clone();
            let direction: Vec<f32> = range.clone().map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let analytic: f64 = grads[range.clone()].iter().zip(&direction).map(|(g, d)| (g * d) as f64).sum();
            let shifted = |sign: f32| {
                let mut p = params.clone();
                p[range.clone()].iter_mut().zip(&direction).for_each(|(p, d)| *p += sign * eps * d);
                flat_step(&args, &layout, &p, &x, &y, 3, key, None).map(|l| l as f64)
            };
            let numeric = (shifted(1.0)? - shifted(-1.0)?) / (2.0 * eps as f64);
            let tolerance = 2e-3 + 2e-2 * analytic.abs();
            assert!((numeric - analytic).abs() <= tolerance, "{}: finite difference {numeric:.6e} vs gradient {analytic:.6e}", tensor.name);
            let norm: f32 = grads[range].iter().map(|g| g * g).sum::<f32>().sqrt();
            assert!(norm > 1e-4, "{}: gradient vanished (norm {norm:e})", tensor.name);
        }
    }
    Ok(())
}

#[test]
fn accumulating_two_micro_steps_adds_their_gradients() -> Result<()> {
    let args = args(true, 0.1, Gelu::Erf);
    let model = Gpt::new(&args, 4, &Device::Cpu)?;
    let (layout, params) = flat_params(&model)?;
    let (x1, y1) = batch(&args, 2, 8, 1);
    let (x2, y2) = batch(&args, 2, 8, 2);
    let (k1, k2) = (DropoutKey { seed: 3, step: 0 }, DropoutKey { seed: 3, step: 1 });
    let (mut g1, mut g2, mut sum) = (vec![0f32; layout.len], vec![0f32; layout.len], vec![f32::NAN; layout.len]);
    flat_step(&args, &layout, &params, &x1, &y1, 2, k1, Some((&mut g1, false)))?;
    flat_step(&args, &layout, &params, &x2, &y2, 2, k2, Some((&mut g2, false)))?;
    flat_step(&args, &layout, &params, &x1, &y1, 2, k1, Some((&mut sum, false)))?;
    flat_step(&args, &layout, &params, &x2, &y2, 2, k2, Some((&mut sum, true)))?;
    for ((s, a), b) in sum.iter().zip(&g1).zip(&g2) {
        assert!((s - (a + b)).abs() <= 1e-6 * (1.0 + s.abs()), "{s} vs {a} + {b}");
    }
    Ok(())
}

#[test]
fn batch_shards_on_several_threads_give_the_one_thread_step() -> Result<()> {
    let args = args(true, 0.2, Gelu::Erf);
    let model = Gpt::new(&args, 6, &Device::Cpu)?;
    let (layout, params) = flat_params(&model)?;
    let (x, y) = batch(&args, 5, 8, 4);
    let key = DropoutKey { seed: 2, step: 3 };
    let on_threads = |threads: usize, accumulate: bool, grads: &mut Vec<f32>| -> Result<(usize, f32)> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
        pool.install(|| {
            Ok((train_step::shard_count(&args, 5, 8), flat_step(&args, &layout, &params, &x, &y, 5, key, Some((grads, accumulate)))?))
        })
    };
    let (mut one, mut three) = (vec![f32::NAN; layout.len], vec![f32::NAN; layout.len]);
    let (shards, loss) = on_threads(1, false, &mut one)?;
    assert_eq!(shards, 1);
    // Three shards of 5 rows: 1, 2 and 2 rows; twice, the second adding to the first.
    let (shards, sharded_loss) = on_threads(3, false, &mut three)?;
    assert_eq!(shards, 3);
    assert!((loss - sharded_loss).abs() < 1e-6, "loss {loss} vs {sharded_loss}");
    for (tensor, (a, b)) in layout.tensors.iter().map(|t| (t, (&one[t.range.clone()], &three[t.range.clone()]))) {
        let diff = a.iter().zip(b).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-6 * (1.0 + a.iter().fold(0f32, |m, v| m.max(v.abs()))), "{}: sharded gradients differ by {diff}", tensor.name);
    }
    on_threads(3, true, &mut three)?;
    assert!(
        one.iter().zip(&three).all(|(a, b)| (2.0 * a - b).abs() <= 1e-5 * (1.0 + b.abs())),
        "accumulated sharded gradients are not twice one step's"
    );
    Ok(())
}

/// PyTorch's AdamW for one element, in f64, written out from its documentation.
#[allow(clippy::too_many_arguments)]
fn adamw_by_hand(p: f64, g: f64, m: f64, v: f64, t: i32, lr: f64, wd: f64, (b1, b2): (f64, f64)) -> (f64, f64, f64) {
    let m = b1 * m + (1.0 - b1) * g;
    let v = b2 * v + (1.0 - b2) * g * g;
    let m_hat = m / (1.0 - b1.powi(t));
    let v_hat = v / (1.0 - b2.powi(t));
    (p * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + 1e-8), m, v)
}

#[test]
fn flat_adamw_matches_hand_computed_values_and_clips_by_global_norm() -> Result<()> {
    let args = ModelArgs { n_layer: 1, n_head: 1, n_embd: 4, block_size: 2, vocab_size: 3, bias: true, dropout: 0.0, gelu: Gelu::Erf };
    let layout = ParamLayout::new(&args);
    let mut rng = StdRng::seed_from_u64(1);
    let params: Vec<f32> = (0..layout.len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let grads: Vec<Vec<f32>> = (0..2).map(|_| (0..layout.len).map(|_| rng.random_range(-0.5f32..0.5)).collect()).collect();
    for grad_clip in [0.0, 1.0] {
        let opt = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip };
        let mut adamw = FlatAdamW::new(&layout, opt.clone());
        let mut flat = params.clone();
        let (mut expected, mut m, mut v): (Vec<f64>, Vec<f64>, Vec<f64>) =
            (params.iter().map(|&p| p as f64).collect(), vec![0.0; layout.len], vec![0.0; layout.len]);
        for (step, g) in grads.iter().enumerate() {
            let lr = 1e-2 * (step + 1) as f64;
            let stats = adamw.step(&layout, &mut flat, g, lr);
            let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((stats.grad_norm - norm).abs() < 1e-5 * norm);
            let scale = if grad_clip > 0.0 && norm > grad_clip { grad_clip / (norm + 1e-6) } else { 1.0 };
            assert_eq!(stats.clipped, scale < 1.0);
            assert_eq!(stats.update_ratios.len(), layout.tensors.len());
            for t in &layout.tensors {
                let wd = if t.shape.len() >= 2 { 0.1 } else { 0.0 };
                for i in t.range.clone() {
                    (expected[i], m[i], v[i]) =
                        adamw_by_hand(expected[i], g[i] as f64 * scale, m[i], v[i], step as i32 + 1, lr, wd, (0.9, 0.99));
                }
            }
            for (i, (&got, &want)) in flat.iter().zip(&expected).enumerate() {
                assert!((got as f64 - want).abs() < 1e-6, "clip {grad_clip}, step {step}, element {i}: {got} vs {want}");
            }
        }
        assert!(grad_clip == 0.0 || grads.iter().any(|g| g.iter().map(|x| x * x).sum::<f32>().sqrt() > 1.0), "the clipping case must clip");
        // The per-tensor optimizer of the graph path agrees, and both save the same state.
        let model = Gpt::new(&args, 0, &Device::Cpu)?;
        let loaded: HashMap<String, Tensor> = layout
            .tensors
            .iter()
            .map(|t| Ok((t.name.clone(), Tensor::from_slice(&params[t.range.clone()], t.shape.as_slice(), &Device::Cpu)?)))
            .collect::<Result<_>>()?;
        model.load(&loaded)?;
        let mut per_tensor = AdamW::new(model.named_parameters().into_iter().map(|(n, v)| (n, v.clone())).collect(), opt)?;
        for (step, g) in grads.iter().enumerate() {
            let g: Vec<Tensor> = layout
                .tensors
                .iter()
                .map(|t| Tensor::from_slice(&g[t.range.clone()], t.shape.as_slice(), &Device::Cpu))
                .collect::<Result<_>>()?;
            per_tensor.step(&g, 1e-2 * (step + 1) as f64)?;
        }
        for (t, (_, var)) in layout.tensors.iter().zip(model.named_parameters()) {
            let theirs = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            assert!(theirs.iter().zip(&flat[t.range.clone()]).all(|(a, b)| (a - b).abs() < 1e-6), "{}", t.name);
        }
        let (a, b) = (adamw.state(&layout)?, per_tensor.state()?);
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let diff = (ta - tb)?.abs()?.flatten_all()?.max(0)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            assert!(diff < 1e-6, "{na}: {diff}");
        }
    }
    Ok(())
}
