//! bias.cu against kernels/matmul.rs's bias handling (a product with a zero weight leaves only the bias's
//! share) and kernels/dropout.rs's masks.

use nanogpt_core::kernels::cuda::{bias, Precision};
use nanogpt_core::kernels::dropout::{DropoutKey, Mask, Site};
use nanogpt_core::kernels::matmul;

use crate::gpu::{assert_close, gpu, random, tolerance, Buffer};

// Odd shapes: OC not a multiple of 32, N not a multiple of the row lanes.
const N: usize = 70;
const OC: usize = 83;

/// With `misaligned`, `out` starts one element past an aligned address, so that no pack is one 16-byte access.
fn check_add(x: Precision, oc: usize, misaligned: bool) {
    let shift = misaligned as usize;
    let out = Buffer::new(x, &random(shift + N * oc, 1.0, 1));
    let b = Buffer::new(x, &random(oc, 1.0, 2));
    let before = out.values();
    let mut want = before[shift..].to_vec();
    matmul::forward(&mut want, &vec![0.0; N], &vec![0.0; oc], Some(&b.values()), N, 1, oc, true);
    bias::add(gpu(), x, out.addr() + (shift * x.size_in_bytes()) as u64, b.addr(), N, oc).unwrap();
    let got = out.values();
    assert_eq!(got[..shift], before[..shift], "add_bias wrote before the start of out");
    assert_close(&format!("add_bias {x:?} oc={oc} misaligned={misaligned}"), &got[shift..], &want, tolerance(x));
}

#[test]
fn add_bias_matches_cpu() {
    for x in [Precision::F32, Precision::Bf16] {
        // Whole 16-byte packs within rows (96 columns), packs across rows (83), and no aligned pack at all.
        check_add(x, 96, false);
        check_add(x, OC, false);
        check_add(x, 96, true);
    }
}

/// With `misaligned`, dout starts one element past an aligned address, so that no pack is one 16-byte load.
fn check_backward(x: Precision, n: usize, oc: usize, misaligned: bool) {
    let shift = misaligned as usize;
    let dout = Buffer::new(x, &random(shift + n * oc, 1.0, 3));
    let dbias = Buffer::f32(&random(oc, 1.0, 4));
    let scratch = Buffer::unwritten(Precision::F32, bias::backward_scratch_len(n, oc));
    let mut want = dbias.values();
    let mut dweight = vec![0.0; oc];
    matmul::backward(None, &mut dweight, Some(&mut want), &dout.values()[shift..], &vec![0.0; n], &vec![0.0; oc], n, 1, oc, true);
    let dout_addr = dout.addr() + (shift * x.size_in_bytes()) as u64;
    bias::backward(gpu(), x, dbias.addr(), scratch.addr(), dout_addr, n, oc).unwrap();
    // Sums of floats in both precisions: only the order of the additions differs.
    assert_close(&format!("bias_backward {x:?} n={n} oc={oc} misaligned={misaligned}"), &dbias.values(), &want, 1e-5);
}

#[test]
fn bias_backward_adds_column_sums() {
    for x in [Precision::F32, Precision::Bf16] {
        // One chunk of rows and two (the second partial); columns past one block's 256 (bf16) or 128 (f32), in
        // whole packs (264) or not (OC), from an aligned start or not.
        check_backward(x, 50, OC, false);
        check_backward(x, N, OC, false);
        check_backward(x, 200, 264, false);
        check_backward(x, 200, 264, true);
    }
}

#[test]
fn dropout_apply_matches_mask_in_place_and_not() {
    let mask = Mask::new(DropoutKey { seed: 7, step: 3 }, Site::MlpResidual(1), 0.2);
    let n = 1037;
    for x in [Precision::F32, Precision::Bf16] {
        for in_place in [true, false] {
            let inp = Buffer::new(x, &random(n, 1.0, 5));
            let mut want = inp.values();
            mask.apply(&mut want, 0);
            let out = if in_place { None } else { Some(Buffer::new(x, &vec![0.0; n])) };
            let target = out.as_ref().unwrap_or(&inp);
            bias::dropout(gpu(), x, target.addr(), inp.addr(), n, mask).unwrap();
            let got = target.values();
            assert_close(&format!("dropout_apply {x:?} in_place={in_place}"), &got, &want, tolerance(x));
            let dropped = got.iter().filter(|&&v| v == 0.0).count();
            assert!(dropped > n / 10 && dropped < n * 3 / 10, "{dropped} of {n} dropped at p = 0.2");
        }
    }
}
