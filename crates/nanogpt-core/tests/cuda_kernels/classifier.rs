//! classifier.cu against kernels::cross_entropy, row by row.

use nanogpt_core::kernels::cross_entropy;
use nanogpt_core::kernels::cuda::{classifier, Precision};

use crate::gpu::{addr, assert_close, from_bf16, gpu, random, to_bf16};

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

/// `values` in a buffer where they start 16-byte aligned, or one element past that (`misaligned`), so
/// that a test takes the kernel's 128-bit path or its one-logit path; returns the buffer and the start.
fn placed<T: Copy + Default>(values: &[T], misaligned: bool) -> (Vec<T>, usize) {
    let mut buffer = vec![T::default(); values.len() + 16];
    let size = std::mem::size_of::<T>();
    let start = (0..16).find(|i| (addr(&buffer) as usize + i * size).is_multiple_of(16)).unwrap() + misaligned as usize;
    buffer[start..][..values.len()].copy_from_slice(values);
    (buffer, start)
}

/// The kernel's losses and logits afterwards for rows of `v` logits against the CPU kernel's, on
/// logits rounded to `x` first.
fn check(x: Precision, n: usize, v: usize, grad_scale: Option<f32>, misaligned: bool) {
    let logits = random(n * v, 4.0, v as u64);
    let logits = if x == Precision::Bf16 { from_bf16(&to_bf16(&logits)) } else { logits };
    let targets = targets(n, v);
    let (want_losses, want_logits) = cpu(&logits, &targets, v, grad_scale);
    let mut losses = vec![f32::NAN; n];
    let mut launch =
        |logits: u64| classifier::cross_entropy(gpu(), x, logits, addr(losses.as_mut_slice()), addr(&targets), n, v, grad_scale).unwrap();
    let got_logits = match x {
        Precision::F32 => {
            let (mut buffer, start) = placed(&logits, misaligned);
            launch(buffer[start..].as_mut_ptr() as u64);
            buffer[start..][..n * v].to_vec()
        }
        Precision::Bf16 => {
            let (mut buffer, start) = placed(&to_bf16(&logits), misaligned);
            launch(buffer[start..].as_mut_ptr() as u64);
            from_bf16(&buffer[start..][..n * v])
        }
    };
    let tol = if x == Precision::Bf16 { 1e-2 } else { 1e-5 };
    let what = format!("{x:?}, v={v}, grad_scale={grad_scale:?}, misaligned={misaligned}");
    assert_close(&format!("losses ({what})"), &losses, &want_losses, tol);
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
    let logits = random(n * v, 1.0, 5);
    let targets = [3, v as i32];
    let mut losses = vec![0f32; n];
    classifier::cross_entropy(gpu(), Precision::F32, addr(&logits), addr(losses.as_mut_slice()), addr(&targets), n, v, None).unwrap();
    assert!(losses[0].is_finite() && losses[1].is_nan(), "{losses:?}");
}

#[test]
fn loss_sum_adds_every_row() {
    for n in [1, 700, 3000] {
        let losses = random(n, 10.0, n as u64).iter().map(|x| x.abs()).collect::<Vec<_>>();
        let mut total = vec![f32::NAN];
        classifier::loss_sum(gpu(), addr(total.as_mut_slice()), addr(&losses), n).unwrap();
        let want = losses.iter().map(|&x| x as f64).sum::<f64>() as f32;
        assert_close(&format!("sum of {n} losses"), &total, &[want], 1e-5);
    }
}

#[test]
fn empty_launches_are_refused() {
    let err = classifier::cross_entropy(gpu(), Precision::F32, 0, 0, 0, 0, 10, None).unwrap_err();
    assert!(err.to_string().contains("0 rows of 10 logits"), "{err}");
    assert!(classifier::loss_sum(gpu(), 0, 0, 0).is_err());
}
