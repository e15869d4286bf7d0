//! The loss: cross-entropy of the logits fused with its softmax and gradient (`classifier.cu`), as
//! `kernels::cross_entropy`, and the sum of the per-row losses on the device.

use candle_core::Result;

use super::{Arg, Gpu, Precision};

/// Threads per block of a row: enough to stream a GPT-2 row (50304 logits) with ~50 loads per thread,
/// fewer for narrow rows so that no warp is idle.
fn row_threads(v: usize) -> u32 {
    v.next_multiple_of(32).min(1024) as u32
}

/// Per row of `logits` (n, v) of type `x`: `losses[row]` (f32, written) = log-sum-exp(row) -
/// row[target], 0 where the target is -1. With `grad_scale`, the row is then overwritten with the
/// gradient of `grad_scale` times that loss, (softmax - one_hot(target)) * grad_scale, zeros for
/// ignored rows; without it the logits are only read. `targets` (n, i32) lie in [-1, v); a target
/// of v or more gives a NaN loss. One block per row.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    gpu: &dyn Gpu,
    x: Precision,
    logits: u64,
    losses: u64,
    targets: u64,
    n: usize,
    v: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    if n == 0 || n > i32::MAX as usize || v == 0 || v > i32::MAX as usize {
        candle_core::bail!("cross_entropy: {n} rows of {v} logits; both must be 1 to 2^31-1");
    }
    let args = [
        Arg::Ptr(logits),
        Arg::Ptr(losses),
        Arg::Ptr(targets),
        Arg::I32(n as i32),
        Arg::I32(v as i32),
        Arg::F32(grad_scale.unwrap_or(0.0)),
        Arg::I32(grad_scale.is_some() as i32),
    ];
    gpu.launch(&x.kernel("cross_entropy"), [n as u32, 1, 1], [row_threads(v), 1, 1], 0, &args)
}

/// `total` (one f32, written) = the sum of `losses` (n f32), added in the same order every run: one
/// block, so that the host reads a single number, and only when it logs the loss.
pub fn loss_sum(gpu: &dyn Gpu, total: u64, losses: u64, n: usize) -> Result<()> {
    if n == 0 || n > i32::MAX as usize {
        candle_core::bail!("loss_sum: {n} losses; it sums 1 to 2^31-1");
    }
    gpu.launch("loss_sum", [1, 1, 1], [row_threads(n), 1, 1], 0, &[Arg::Ptr(total), Arg::Ptr(losses), Arg::I32(n as i32)])
}
