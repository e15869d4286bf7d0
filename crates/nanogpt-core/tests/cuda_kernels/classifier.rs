//! classifier.cu against kernels::cross_entropy, row by row.

use nanogpt_core::kernels::cross_entropy;
use nanogpt_core::kernels::cuda::{classifier, Precision};

use crate::gpu::{assert_close, device_i32, from_bf16, gpu, random, to_bf16, Buffer};

/// Targets of `n` rows over a vocabulary of `v`, every third row ignored (-1).
fn targets(n: usize, v: usize) -> Vec<i32> {
    (0..n).map(|row| if row % 3 == 1 { -1 } else { ((row * 7919 + 13) % v) as i32 }).collect()
}

/// The CPU kernel's loss of each row and its logits afterwards (the gradient with `grad_scale`).
fn cpu(logits: &[f32], targets: &[i32], v: usize, grad_scale: Option<f32>) -> (Vec<f32>, Vec<f32>) {
    let mut out = logits.to_vec();
    let losses = out.chunks_mut(v).zip(targets).map(|(row, &t)| cross_entropy::forward(row, &[t], v, grad_scale) as f32).collect();
    (losses, out)
}

/// The kernel's losses and logits afterwards for rows of `v` logits against the CPU kernel's, on
/// logits rounded to `x` first.
fn check(x: Precision, n: usize, v: usize, grad_scale: Option<f32>, misaligned: bool) {
    let logits = random(n * v, 4.0, v as u64);
    let logits = if x == Precision::Bf16 { from_bf16(&to_bf16(&logits)) } else { logits };
    let targets = targets(n, v);
    let (want_losses, want_logits) = cpu(&logits, &targets, v, grad_scale);
    // The logits start where their buffer does, 16-byte aligned as every allocation, or one element past
    // that (`misaligned`), so that the kernel takes its 128-bit path or its one-logit path.
    let start = misaligned as usize;
    let mut placed = vec![f32::NAN; start];
    placed.extend(&logits);
    let buffer = Buffer::new(x, &placed);
    assert!(buffer.addr().is_multiple_of(16), "{:#x}: an allocation that is not 16-byte aligned", buffer.addr());
    let (losses, device_targets) = (Buffer::unwritten(Precision::F32, n), device_i32(&targets));
    let start_addr = buffer.addr() + (start * x.size_in_bytes()) as u64;
    classifier::cross_entropy(gpu(), x, start_addr, losses.addr(), device_targets.addr, n, v, grad_scale).unwrap();
    let got_logits = buffer.values()[start..].to_vec();
    let tol = if x == Precision::Bf16 { 1e-2 } else { 1e-5 };
    let what = format!("{x:?}, v={v}, grad_scale={grad_scale:?}, misaligned={misaligned}");
    assert_close(&format!("losses ({what})"), &losses.values(), &want_losses, tol);
    assert_close(&format!("logits after ({what})"), &got_logits, &want_logits, tol);
}

// The gradient scales make its entries O(1), so that the tolerance is relative for them too. Rows of
// a multiple of 4 (f32) or 8 (bf16) logits take the 128-bit path unless misaligned.
#[test]
fn f32_rows_narrower_than_a_block_match_the_cpu() {
    check(Precision::F32, 7, 65, Some(65.0), false);
}

#[test]
fn f32_rows_of_one_odd_block_match_the_cpu() {
    check(Precision::F32, 5, 1000, Some(500.0), false);
}

#[test]
fn f32_rows_wider_than_a_block_match_the_cpu() {
    check(Precision::F32, 3, 4100, Some(4100.0), false);
    check(Precision::F32, 4, 2500, Some(2500.0), true);
}

#[test]
fn f32_forward_only_leaves_the_logits() {
    check(Precision::F32, 6, 300, None, false);
}

#[test]
fn bf16_losses_and_gradient_match_the_cpu_on_rounded_logits() {
    check(Precision::Bf16, 5, 1500, Some(1500.0), false);
    check(Precision::Bf16, 3, 8200, Some(8200.0), false);
    check(Precision::Bf16, 4, 1504, Some(1504.0), true);
}

#[test]
fn a_target_past_the_vocabulary_gives_a_nan_loss() {
    let (n, v) = (2, 40);
    let logits = Buffer::f32(&random(n * v, 1.0, 5));
    let targets = device_i32(&[3, v as i32]);
    let losses = Buffer::f32(&[0.0; 2]);
    classifier::cross_entropy(gpu(), Precision::F32, logits.addr(), losses.addr(), targets.addr, n, v, None).unwrap();
    let losses = losses.values();
    assert!(losses[0].is_finite() && losses[1].is_nan(), "{losses:?}");
}

#[test]
fn loss_sum_adds_every_row() {
    for n in [1, 700, 3000] {
        let losses = random(n, 10.0, n as u64).iter().map(|x| x.abs()).collect::<Vec<_>>();
        let total = Buffer::unwritten(Precision::F32, 1);
        let device_losses = Buffer::f32(&losses);
        classifier::loss_sum(gpu(), total.addr(), device_losses.addr(), n).unwrap();
        let want = losses.iter().map(|&x| x as f64).sum::<f64>() as f32;
        assert_close(&format!("sum of {n} losses"), &total.values(), &[want], 1e-5);
    }
}

#[test]
fn empty_launches_are_refused() {
    let err = classifier::cross_entropy(gpu(), Precision::F32, 0, 0, 0, 0, 10, None).unwrap_err();
    assert!(err.to_string().contains("0 rows of 10 logits"), "{err}");
    assert!(classifier::loss_sum(gpu(), 0, 0, 0).is_err());
}
