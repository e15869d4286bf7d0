//! adamw.cu against optim::FlatAdamW (which runs kernels::adamw on the CPU): the global norm, clipping
//! on and off, weight decay on the tensors of rank >= 2 only, the weights' compute copy, and ZeRO-1's
//! updates of one shard at a time.

use nanogpt_core::kernels::adamw::AdamWUpdate;
use nanogpt_core::kernels::cuda::adamw::{self, Clip, FlatBuffers, TensorTable, GRAD_NORM_PARTIALS};
use nanogpt_core::kernels::cuda::Precision;
use nanogpt_core::model::{Gelu, ModelArgs};
use nanogpt_core::optim::{FlatAdamW, OptimizerArgs};
use nanogpt_core::train_step::ParamLayout;

use crate::gpu::{assert_close, device_bytes, from_bf16, gpu, random, to_bf16, Buffer};

/// Asserts |got - want| <= tol * |want| + floor element-wise: `floor` is the rounding of terms that
/// cancel to a near-zero result.
#[track_caller]
fn assert_relative(what: &str, got: &[f32], want: &[f32], tol: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs() + floor, "{what}[{i}]: got {g}, want {w} (relative tolerance {tol}, floor {floor})");
    }
}

fn norm_squared_on_device(grads: &[f32], partial_count: usize) -> f32 {
    let (norm_squared, partials) = (Buffer::unwritten(Precision::F32, 1), Buffer::unwritten(Precision::F32, partial_count));
    let grads_buffer = Buffer::f32(grads);
    adamw::grad_norm_squared(gpu(), norm_squared.addr(), partials.addr(), partial_count, grads_buffer.addr(), grads.len()).unwrap();
    norm_squared.values()[0]
}

#[test]
fn grad_norm_squared_is_the_sum_of_squares_and_the_same_every_run() {
    // (n, partials): one block; a full H100 grid, partly used; a grid of 3 blocks that its threads
    // stride over (the emulator runs a block of 1024 threads in a fraction of a second: too slow to stride a full grid).
    for (n, partial_count) in [(1, GRAD_NORM_PARTIALS), (5000, GRAD_NORM_PARTIALS), (3 * 1024 * 4 + 17, 3)] {
        let grads = random(n, 1.0, n as u64);
        let want = grads.iter().map(|&g| g as f64 * g as f64).sum::<f64>() as f32;
        let got = norm_squared_on_device(&grads, partial_count);
        assert_close(&format!("norm squared of {n}"), &[got], &[want], 1e-5);
        assert_eq!(norm_squared_on_device(&grads, partial_count).to_bits(), got.to_bits(), "norm squared of {n} differs between runs");
    }
}

#[test]
fn empty_norms_are_refused() {
    let err = adamw::grad_norm_squared(gpu(), 0, 0, GRAD_NORM_PARTIALS, 0, 0).unwrap_err();
    assert!(err.to_string().contains("0 gradients"), "{err}");
    assert!(adamw::grad_norm_squared(gpu(), 0, 0, 0, 0, 10).is_err());
}

/// A model small enough for the emulator whose tensors decay (matmul weights, embeddings) and do not
/// (biases, LayerNorm weights), with lengths that are not multiples of the kernel's block.
fn layout() -> ParamLayout {
    let args = ModelArgs { n_layer: 2, n_head: 2, n_embd: 12, block_size: 7, vocab_size: 37, bias: true, dropout: 0.0, gelu: Gelu::Erf };
    ParamLayout::new(&args)
}

#[test]
fn the_tensor_table_marks_where_each_tensor_ends_and_whether_it_decays() {
    let layout = layout();
    let table = TensorTable::new(&layout);
    assert_eq!(table.ends.len(), layout.tensors.len());
    for (t, (&end, &decays)) in layout.tensors.iter().zip(table.ends.iter().zip(&table.decays)) {
        assert_eq!((end as usize, decays == 1), (t.range.end, t.shape.len() >= 2), "{}", t.name);
    }
    assert!(table.decays.contains(&0) && table.decays.contains(&1));
}

/// Three steps of FlatAdamW on the CPU and of the device kernels, compared after each step. The device
/// gets the gradients times `loss_scale` (a power of two) and removes it through `grad_scale`, before
/// clipping, as GradScaler.unscale_ does.
fn check_steps(x: Precision, with_copy: bool, grad_clip: f64, loss_scale: f32) {
    let layout = layout();
    let n = layout.len;
    let args = OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip };
    let mut cpu = FlatAdamW::new(&layout, args.clone());
    let mut cpu_params = random(n, 1.0, 1);

    let table = TensorTable::new(&layout);
    let ends = device_bytes(&table.ends.iter().flat_map(|e| e.to_ne_bytes()).collect::<Vec<u8>>());
    let decays = device_bytes(&table.decays);
    let device_table = table.on_device(ends.addr, decays.addr);
    let params = Buffer::f32(&cpu_params);
    let (exp_avg, exp_avg_sq) = (Buffer::f32(&vec![0.0; n]), Buffer::f32(&vec![0.0; n]));
    // Passed to the kernel only `with_copy`; NaN until written.
    let copy = Buffer::unwritten(x, n);
    let params_copy = if with_copy { copy.addr() } else { 0 };
    let (norm_squared, partials) = (Buffer::unwritten(Precision::F32, 1), Buffer::unwritten(Precision::F32, GRAD_NORM_PARTIALS));

    for t in 1..=3 {
        let lr = 1e-2 * t as f64;
        let grads = random(n, 1.0, 100 + t as u64);
        let stats = cpu.step(&layout, &mut cpu_params, &grads, lr);
        let scaled_grads = Buffer::f32(&grads.iter().map(|g| g * loss_scale).collect::<Vec<f32>>());

        let buffers = FlatBuffers {
            params: params.addr(),
            grads: scaled_grads.addr(),
            exp_avg: exp_avg.addr(),
            exp_avg_sq: exp_avg_sq.addr(),
            params_copy,
            len: n,
            shard: 0..n,
        };
        adamw::grad_norm_squared(gpu(), norm_squared.addr(), partials.addr(), GRAD_NORM_PARTIALS, buffers.grads, n).unwrap();
        let step = AdamWUpdate {
            lr,
            beta1: args.beta1,
            beta2: args.beta2,
            eps: 1e-8,
            weight_decay: args.weight_decay,
            grad_scale: 1.0 / loss_scale as f64,
            step_size: lr / (1.0 - args.beta1.powi(t)),
            bias_correction2_sqrt: (1.0 - args.beta2.powi(t)).sqrt(),
        };
        let clip = (grad_clip > 0.0).then(|| Clip { grad_norm_squared: norm_squared.addr(), max_norm: grad_clip as f32 });
        adamw::update(gpu(), x, &buffers, &device_table, &step, clip).unwrap();

        let what = format!("{x:?} step {t}, clip {grad_clip}");
        let clipped = grad_clip > 0.0 && stats.grad_norm > grad_clip;
        assert_eq!(clipped, grad_clip == 0.5, "{what}: the test means clipping to be active exactly at 0.5");
        assert_close(&format!("{what}: grad norm"), &[norm_squared.values()[0].sqrt() / loss_scale], &[stats.grad_norm as f32], 1e-5);
        let state = cpu.state(&layout).unwrap();
        let moment = |suffix: &str| -> Vec<f32> {
            let parts = state.iter().filter(|(name, _)| name.ends_with(suffix));
            parts.flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
        };
        // Parameters near zero are the difference of p * (1 - lr * wd) and an update of about lr.
        let got_params = params.values();
        assert_relative(&format!("{what}: params"), &got_params, &cpu_params, 1e-6, 1e-6 * lr as f32);
        // So are moments near zero, of beta1 * m and (1 - beta1) * g, with m and g of the buffer's scale.
        let want_avg = moment(".exp_avg");
        let avg_scale = want_avg.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_relative(&format!("{what}: exp_avg"), &exp_avg.values(), &want_avg, 1e-6, 1e-6 * avg_scale);
        assert_relative(&format!("{what}: exp_avg_sq"), &exp_avg_sq.values(), &moment(".exp_avg_sq"), 1e-6, 0.0);
        match (with_copy, x) {
            (false, _) => assert!(copy.values().iter().all(|v| v.is_nan()), "{what}: no copy was asked for"),
            (true, Precision::F32) => assert_eq!(copy.values(), got_params, "{what}: f32 copy"),
            (true, Precision::Bf16) => assert_eq!(copy.values(), from_bf16(&to_bf16(&got_params)), "{what}: bf16 copy"),
        }
    }
}

#[test]
fn f32_steps_without_clipping_match_flat_adamw() {
    check_steps(Precision::F32, false, 0.0, 1.0);
}

#[test]
fn f32_steps_with_inactive_clipping_and_a_copy_match_flat_adamw() {
    check_steps(Precision::F32, true, 1e3, 1.0);
}

#[test]
fn bf16_steps_with_active_clipping_match_flat_adamw_and_copy_the_rounded_params() {
    check_steps(Precision::Bf16, true, 0.5, 1.0);
}

#[test]
fn bf16_steps_without_a_copy_leave_it_absent() {
    check_steps(Precision::Bf16, false, 0.5, 1.0);
}

#[test]
fn a_loss_scale_is_removed_before_clipping() {
    check_steps(Precision::F32, false, 0.5, 1024.0);
}

#[test]
fn mismatched_buffers_shards_and_bad_clipping_are_refused() {
    let layout = layout();
    let table = TensorTable::new(&layout).on_device(0, 0);
    let step = AdamWUpdate {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_scale: 1.0,
        step_size: 1e-2,
        bias_correction2_sqrt: 0.2,
    };
    let buffers =
        FlatBuffers { params: 0, grads: 0, exp_avg: 0, exp_avg_sq: 0, params_copy: 0, len: layout.len - 1, shard: 0..layout.len - 1 };
    let err = adamw::update(gpu(), Precision::F32, &buffers, &table, &step, None).unwrap_err();
    assert!(err.to_string().contains("build both from one ParamLayout"), "{err}");
    let buffers = FlatBuffers { len: layout.len, shard: 3..layout.len + 1, ..buffers };
    let err = adamw::update(gpu(), Precision::F32, &buffers, &table, &step, None).unwrap_err();
    assert!(err.to_string().contains("take it from collective::shard"), "{err}");
    let buffers = FlatBuffers { shard: 0..layout.len, ..buffers };
    let clip = Some(Clip { grad_norm_squared: 0, max_norm: 0.0 });
    let err = adamw::update(gpu(), Precision::F32, &buffers, &table, &step, clip).unwrap_err();
    assert!(err.to_string().contains("pass a positive max norm"), "{err}");
}

/// The buffers' moments and compute copy after one bf16 update of `shards` in turn, each with moments of its
/// own (ZeRO-1's ranks), from the same weights, gradients and moments.
fn update_in_shards(layout: &ParamLayout, shards: &[std::ops::Range<usize>]) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = layout.len;
    let table = TensorTable::new(layout);
    let ends = device_bytes(&table.ends.iter().flat_map(|e| e.to_ne_bytes()).collect::<Vec<u8>>());
    let decays = device_bytes(&table.decays);
    let device_table = table.on_device(ends.addr, decays.addr);
    let (params, grads) = (Buffer::f32(&random(n, 1.0, 1)), Buffer::f32(&random(n, 1.0, 2)));
    let exp_avg = random(n, 0.1, 3);
    let exp_avg_sq: Vec<f32> = random(n, 0.1, 4).iter().map(|v| v.abs()).collect();
    let copy = Buffer::unwritten(Precision::Bf16, n);
    let step = AdamWUpdate {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_scale: 1.0,
        step_size: 1e-2 / (1.0 - 0.9f64.powi(3)),
        bias_correction2_sqrt: (1.0 - 0.95f64.powi(3)).sqrt(),
    };
    let (mut avg_out, mut avg_sq_out) = (Vec::new(), Vec::new());
    for shard in shards {
        let (avg, avg_sq) = (Buffer::f32(&exp_avg[shard.clone()]), Buffer::f32(&exp_avg_sq[shard.clone()]));
        let buffers = FlatBuffers {
            params: params.addr(),
            grads: grads.addr(),
            exp_avg: avg.addr(),
            exp_avg_sq: avg_sq.addr(),
            params_copy: copy.addr(),
            len: n,
            shard: shard.clone(),
        };
        adamw::update(gpu(), Precision::Bf16, &buffers, &device_table, &step, None).unwrap();
        avg_out.extend(avg.values());
        avg_sq_out.extend(avg_sq.values());
    }
    (params.values(), copy.values(), avg_out, avg_sq_out)
}

#[test]
fn updates_of_shards_in_turn_match_one_update_of_the_whole_buffers() {
    let layout = layout();
    let n = layout.len;
    let whole = update_in_shards(&layout, std::slice::from_ref(&(0..n)));
    // Boundaries inside tensors of both groups (a bias, then a matrix), and an empty shard, as the last ranks
    // of a small model get.
    let inside = |rank: usize| layout.tensors.iter().find(|t| t.shape.len() == rank && t.range.start > 0).unwrap().range.start + 3;
    let (first, second) = (inside(1).min(inside(2)), inside(1).max(inside(2)));
    let sharded = update_in_shards(&layout, &[0..first, first..second, second..n, n..n]);
    assert_eq!(whole, sharded, "each element's update must not depend on the shard it is in");
}

#[test]
fn the_compute_copy_is_the_rounded_weights() {
    let params = random(5000, 1.0, 9);
    let (weights, copy) = (Buffer::f32(&params), Buffer::unwritten(Precision::Bf16, params.len()));
    adamw::round_params_bf16(gpu(), copy.addr(), weights.addr(), params.len()).unwrap();
    assert_eq!(copy.values(), from_bf16(&to_bf16(&params)));
}
