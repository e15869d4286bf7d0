//! classifier.cu against kernels::cross_entropy, row by row.

use nanogpt_core::kernels::cross_entropy;
use nanogpt_core::kernels::cuda::{classifier, Precision};

use crate::gpu::{addr, assert_close, from_bf16, random, to_bf16, Emulated};

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

fn check_f32(n: usize, v: usize, grad_scale: Option<f32>) {
    let logits = random(n * v, 4.0, v as u64);
    let targets = targets(n, v);
    let (want_losses, want_logits) = cpu(&logits, &targets, v, grad_scale);
    let mut got_logits = logits.clone();
    let mut losses = vec![f32::NAN; n];
    classifier::cross_entropy(
        &Emulated,
        Precision::F32,
        addr(got_logits.as_mut_slice()),
        addr(losses.as_mut_slice()),
        addr(&targets),
        n,
        v,
        grad_scale,
    )
    .unwrap();
    assert_close(&format!("losses (v={v})"), &losses, &want_losses, 1e-5);
    assert_close(&format!("logits after (v={v}, grad_scale={grad_scale:?})"), &got_logits, &want_logits, 1e-5);
}

// The scale makes the gradient's entries O(1), so that the tolerance is relative for them too.
#[test]
fn f32_rows_narrower_than_a_block_match_the_cpu() {
    check_f32(7, 65, Some(65.0));
}

#[test]
fn f32_rows_of_one_odd_block_match_the_cpu() {
    check_f32(5, 1000, Some(500.0));
}

#[test]
fn f32_rows_wider_than_a_block_match_the_cpu() {
    check_f32(4, 2500, Some(2500.0));
}

#[test]
fn f32_forward_only_leaves_the_logits() {
    check_f32(6, 300, None);
}

#[test]
fn bf16_losses_and_gradient_match_the_cpu_on_rounded_logits() {
    let (n, v) = (5, 1500);
    let mut logits = to_bf16(&random(n * v, 4.0, 3));
    let targets = targets(n, v);
    let scale = v as f32;
    let (want_losses, want_logits) = cpu(&from_bf16(&logits), &targets, v, Some(scale));
    let mut losses = vec![f32::NAN; n];
    classifier::cross_entropy(
        &Emulated,
        Precision::Bf16,
        addr(logits.as_mut_slice()),
        addr(losses.as_mut_slice()),
        addr(&targets),
        n,
        v,
        Some(scale),
    )
    .unwrap();
    assert_close("bf16 losses", &losses, &want_losses, 1e-2);
    assert_close("bf16 gradient", &from_bf16(&logits), &want_logits, 1e-2);
}

#[test]
fn a_target_past_the_vocabulary_gives_a_nan_loss() {
    let (n, v) = (2, 40);
    let logits = random(n * v, 1.0, 5);
    let targets = [3, v as i32];
    let mut losses = vec![0f32; n];
    classifier::cross_entropy(&Emulated, Precision::F32, addr(&logits), addr(losses.as_mut_slice()), addr(&targets), n, v, None).unwrap();
    assert!(losses[0].is_finite() && losses[1].is_nan(), "{losses:?}");
}

#[test]
fn loss_sum_adds_every_row() {
    for n in [1, 700, 3000] {
        let losses = random(n, 10.0, n as u64).iter().map(|x| x.abs()).collect::<Vec<_>>();
        let mut total = [f32::NAN];
        classifier::loss_sum(&Emulated, addr(total.as_mut_slice()), addr(&losses), n).unwrap();
        let want = losses.iter().map(|&x| x as f64).sum::<f64>() as f32;
        assert_close(&format!("sum of {n} losses"), &total, &[want], 1e-5);
    }
}

#[test]
fn empty_launches_are_refused() {
    let err = classifier::cross_entropy(&Emulated, Precision::F32, 0, 0, 0, 0, 10, None).unwrap_err();
    assert!(err.to_string().contains("0 rows of 10 logits"), "{err}");
    assert!(classifier::loss_sum(&Emulated, 0, 0, 0).is_err());
}
