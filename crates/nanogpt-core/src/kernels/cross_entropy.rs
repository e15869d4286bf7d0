//! Cross-entropy of logits (N, V) against targets (-1 = ignored, as PyTorch's `ignore_index=-1`),
//! fused with its softmax: training overwrites the logits with their gradient, so no second
//! logits-sized buffer exists.

use rayon::prelude::*;

use super::{exp, max};

/// Log-sum-exp of one row.
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max(row);
    max + row.iter().map(|&x| exp(x - max)).sum::<f32>().ln()
}

/// How many targets count (are not -1).
pub fn counted(targets: &[i32]) -> usize {
    targets.iter().filter(|&&t| t >= 0).count()
}

/// The sum of the counted rows' losses. With `grad_scale`, each row of `logits` is replaced by the
/// gradient of `grad_scale` times its loss: (softmax - one_hot(target)) * grad_scale, zero for ignored rows.
pub fn forward(logits: &mut [f32], targets: &[i32], v: usize, grad_scale: Option<f32>) -> f64 {
    assert_eq!(logits.len(), targets.len() * v, "cross-entropy: logits and targets do not match");
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            if target < 0 {
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
                return 0.0;
            }
            let lse = log_sum_exp(row);
            let loss = (lse - row[target as usize]) as f64;
            if let Some(scale) = grad_scale {
                row.iter_mut().for_each(|x| *x = exp(*x - lse) * scale);
                row[target as usize] -= scale;
            }
            loss
        })
        .sum()
}
