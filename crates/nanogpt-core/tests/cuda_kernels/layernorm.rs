//! layernorm.cu against kernels/layernorm.rs: forward with and without bias, the residual add (with and
//! without its dropout) fused into LayerNorm, and backward with add_to_dinp either way, with and without bias.

use nanogpt_core::kernels::cuda::{layernorm, Precision};
use nanogpt_core::kernels::dropout::{DropoutKey, Mask, Site};
use nanogpt_core::kernels::layernorm as cpu;

use crate::gpu::{assert_close, gpu, random, tolerance, Buffer};

// Odd shapes: C not a multiple of 32; N not a multiple of the forward's 8 rows a block nor of the
// backward's 32 (3 blocks, the last one partly out of range).
const N: usize = 70;
const C: usize = 83;

/// With `misaligned_input`, the input starts one element past an aligned address, so that the kernel
/// cannot take rows in 16-byte packs.
fn check_forward(x: Precision, with_bias: bool, n: usize, c: usize, misaligned_input: bool) {
    let shift = misaligned_input as usize;
    let shifted_inp = Buffer::new(x, &random(shift + n * c, 2.0, 1));
    let inp_values = shifted_inp.values()[shift..].to_vec();
    let weight = Buffer::new(x, &random(c, 1.0, 2));
    let bias = Buffer::new(x, &random(c, 1.0, 3));
    let (out, mean, rstd) = (Buffer::new(x, &vec![0.0; n * c]), Buffer::f32(&vec![0.0; n]), Buffer::f32(&vec![0.0; n]));
    let bias_addr = with_bias.then(|| bias.addr());
    let inp_addr = shifted_inp.addr() + (shift * x.size_in_bytes()) as u64;
    layernorm::forward(gpu(), x, out.addr(), mean.addr(), rstd.addr(), inp_addr, weight.addr(), bias_addr, n, c).unwrap();

    let (mut want, mut want_mean, mut want_rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    let bias_values = bias.values();
    cpu::forward(&mut want, &mut want_mean, &mut want_rstd, &inp_values, &weight.values(), with_bias.then_some(&bias_values[..]));
    let what = format!("layernorm {x:?} bias={with_bias} n={n} c={c} misaligned_input={misaligned_input}");
    assert_close(&format!("{what}: out"), &out.values(), &want, tolerance(x));
    // The statistics are float in both precisions, of the same (rounded) inputs.
    assert_close(&format!("{what}: mean"), &mean.values(), &want_mean, 1e-5);
    assert_close(&format!("{what}: rstd"), &rstd.values(), &want_rstd, 1e-5);
}

fn check_residual_forward(x: Precision, mask: Option<Mask>, n: usize, c: usize) {
    let inp = Buffer::new(x, &random(n * c, 1.0, 4));
    let branch = Buffer::new(x, &random(n * c, 1.0, 5));
    let weight = Buffer::new(x, &random(c, 1.0, 6));
    let bias = Buffer::new(x, &random(c, 1.0, 7));
    let (residual, ln) = (Buffer::new(x, &vec![0.0; n * c]), Buffer::new(x, &vec![0.0; n * c]));
    let (mean, rstd) = (Buffer::f32(&vec![0.0; n]), Buffer::f32(&vec![0.0; n]));
    layernorm::residual_forward(
        gpu(),
        x,
        residual.addr(),
        ln.addr(),
        mean.addr(),
        rstd.addr(),
        inp.addr(),
        branch.addr(),
        weight.addr(),
        Some(bias.addr()),
        n,
        c,
        mask,
    )
    .unwrap();

    // The training step's CPU composition: the branch through its dropout, added to the residual stream.
    let mut dropped = branch.values();
    if let Some(mask) = mask {
        mask.apply(&mut dropped, 0);
    }
    let want_residual: Vec<f32> = inp.values().iter().zip(&dropped).map(|(r, d)| r + d).collect();
    // The LayerNorm is of the residual as stored in X.
    let stored_residual = Buffer::new(x, &want_residual).values();
    let (mut want, mut want_mean, mut want_rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    cpu::forward(&mut want, &mut want_mean, &mut want_rstd, &stored_residual, &weight.values(), Some(&bias.values()));
    let what = format!("residual_layernorm {x:?} dropout={} n={n} c={c}", mask.is_some());
    assert_close(&format!("{what}: residual"), &residual.values(), &want_residual, tolerance(x));
    assert_close(&format!("{what}: out"), &ln.values(), &want, tolerance(x));
    assert_close(&format!("{what}: mean"), &mean.values(), &want_mean, tolerance(x));
    assert_close(&format!("{what}: rstd"), &rstd.values(), &want_rstd, tolerance(x));
}

/// With `misaligned_weight`, the weight starts one element past an aligned address, so that the kernel
/// cannot take rows in 16-byte packs.
fn check_backward(x: Precision, with_bias: bool, add_to_dinp: bool, n: usize, c: usize, misaligned_weight: bool) {
    let inp = Buffer::new(x, &random(n * c, 2.0, 8));
    let shift = misaligned_weight as usize;
    let shifted_weight = Buffer::new(x, &random(shift + c, 1.0, 9));
    let weight_values = shifted_weight.values()[shift..].to_vec();
    let weight_addr = shifted_weight.addr() + (shift * x.size_in_bytes()) as u64;
    let dout = Buffer::new(x, &random(n * c, 1.0, 10));
    let dinp = Buffer::new(x, &random(n * c, 1.0, 11));
    let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
    cpu::forward(&mut vec![0.0; n * c], &mut mean, &mut rstd, &inp.values(), &weight_values, None);
    // Gradients already there (earlier micro-steps'), which the kernels add to.
    let (dweight, dbias) = (Buffer::f32(&random(c, 1.0, 12)), Buffer::f32(&random(c, 1.0, 13)));
    let (mut want_dinp, mut want_dweight, mut want_dbias) = (dinp.values(), dweight.values(), dbias.values());
    cpu::backward(
        &mut want_dinp,
        &mut want_dweight,
        with_bias.then_some(&mut want_dbias[..]),
        &dout.values(),
        &inp.values(),
        &mean,
        &rstd,
        &weight_values,
        add_to_dinp,
        true,
    );

    let scratch = Buffer::unwritten(Precision::F32, layernorm::backward_scratch_len(n, c));
    let (device_mean, device_rstd) = (Buffer::f32(&mean), Buffer::f32(&rstd));
    layernorm::backward(
        gpu(),
        x,
        dinp.addr(),
        dweight.addr(),
        with_bias.then(|| dbias.addr()),
        scratch.addr(),
        dout.addr(),
        inp.addr(),
        weight_addr,
        device_mean.addr(),
        device_rstd.addr(),
        n,
        c,
        add_to_dinp,
    )
    .unwrap();
    let what =
        format!("layernorm backward {x:?} bias={with_bias} add_to_dinp={add_to_dinp} n={n} c={c} misaligned_weight={misaligned_weight}");
    assert_close(&format!("{what}: dinp"), &dinp.values(), &want_dinp, tolerance(x));
    // Float sums of the same (rounded) inputs in both precisions.
    assert_close(&format!("{what}: dweight"), &dweight.values(), &want_dweight, 1e-5);
    assert_close(&format!("{what}: dbias"), &dbias.values(), &want_dbias, 1e-5);
}

#[test]
fn forward_matches_cpu_with_and_without_bias() {
    for x in [Precision::F32, Precision::Bf16] {
        for with_bias in [true, false] {
            check_forward(x, with_bias, N, C, false);
        }
    }
}

#[test]
fn forward_in_packs_matches_cpu() {
    // C a multiple of both packs (8 bf16, 4 floats): whole rows in 16-byte accesses, unless the input is
    // misaligned.
    for x in [Precision::F32, Precision::Bf16] {
        for with_bias in [true, false] {
            check_forward(x, with_bias, N, 96, false);
        }
        check_forward(x, true, N, 96, true);
    }
}

#[test]
fn forward_of_wide_rows_fits_fewer_rows_a_block() {
    // 2000 channels: 6 rows' floats fit in a block's 48 KiB of shared memory, not 8.
    check_forward(Precision::F32, true, 13, 2000, false);
}

#[test]
fn forward_refuses_rows_too_wide_for_shared_memory() {
    let err = layernorm::forward(gpu(), Precision::F32, 0, 0, 0, 0, 0, None, 1, 20_000).unwrap_err().to_string();
    assert!(err.contains("C = 20000"), "{err}");
}

#[test]
fn residual_forward_matches_cpu_with_and_without_dropout() {
    let mask = Mask::new(DropoutKey { seed: 3, step: 1 }, Site::AttentionResidual(2), 0.2);
    for x in [Precision::F32, Precision::Bf16] {
        for mask in [None, Some(mask)] {
            check_residual_forward(x, mask, N, C);
            // In 16-byte packs.
            check_residual_forward(x, mask, 33, 96);
        }
    }
}

#[test]
fn backward_matches_cpu() {
    for x in [Precision::F32, Precision::Bf16] {
        for with_bias in [true, false] {
            for add_to_dinp in [true, false] {
                check_backward(x, with_bias, add_to_dinp, N, C, false);
            }
        }
    }
}

#[test]
fn backward_in_packs_matches_cpu() {
    // C a multiple of both packs (8 bf16, 4 floats): whole rows in 16-byte accesses, unless the weight is
    // misaligned.
    for x in [Precision::F32, Precision::Bf16] {
        for misaligned_weight in [false, true] {
            check_backward(x, true, true, N, 96, misaligned_weight);
        }
        check_backward(x, false, false, 33, 96, false);
    }
}

#[test]
fn backward_of_wide_rows_takes_fewer_warps_a_block() {
    // 2000 channels: 3 warps' sums of dweight and dbias fit in a block's 48 KiB of shared memory, not 8.
    check_backward(Precision::Bf16, true, true, 40, 2000, false);
}

#[test]
fn backward_refuses_rows_too_wide_for_shared_memory() {
    let err = layernorm::backward(gpu(), Precision::F32, 0, 0, None, 0, 0, 0, 0, 0, 0, 1, 7000, false).unwrap_err().to_string();
    assert!(err.contains("C = 7000"), "{err}");
}
