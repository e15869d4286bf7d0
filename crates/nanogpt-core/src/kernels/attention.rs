//! Causal self-attention from the fused q,k,v projection (B, T, 3C) to the merged heads (B, T, C),
//! with optional dropout on the attention weights. Each (batch row, head) is four small matrix
//! products and a row softmax, run on one thread (batch rows run in parallel). Probabilities and
//! dropout decisions are recomputed in the backward pass instead of being kept (the dropout mask is
//! a hash of the element's index, as in flash attention), so no (B, NH, T, T) buffer exists.
//!
//! The products run in blocks of [`CAUSAL_BLOCK`] rows, each over the columns at or before its last row:
//! the causal mask zeroes the rest, so the (T, T) products cost about half a square, not a whole one.

use rayon::prelude::*;

use super::dropout::Mask;
use super::{dot, exp, gemm, max, sum};

/// Rows per block of the causal products.
pub const CAUSAL_BLOCK: usize = 32;

/// A matrix view into a slice: element (r, c) sits at `ptr + r * row_stride + c * col_stride`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl View {
    fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self { ptr, row_stride: row_stride as isize, col_stride: 1 }
    }

    fn t(self) -> Self {
        Self { ptr: self.ptr, row_stride: self.col_stride, col_stride: self.row_stride }
    }

    /// The view from element (row, col) on.
    ///
    /// Safety: that element must lie inside the viewed memory.
    unsafe fn at(self, row: usize, col: usize) -> Self {
        Self { ptr: self.ptr.offset(row as isize * self.row_stride + col as isize * self.col_stride), ..self }
    }
}

/// The row blocks of a causal (T, T) product: (first row, rows).
fn row_blocks(t: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(block).map(move |i0| (i0, block.min(t - i0)))
}

/// dst (m x n, rows `dst_row_stride` apart) = scale * lhs (m x k) * rhs (k x n), on this thread only.
///
/// Safety: every view must address valid memory for its shape, and dst must not overlap lhs or rhs.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_into(dst: *mut f32, dst_row_stride: usize, m: usize, n: usize, k: usize, lhs: View, rhs: View, scale: f32) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        false,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        0.0,
        scale,
        gemm::Parallelism::None,
    );
}

/// The (T, T) attention matrices of one (batch row, head): the probabilities and, with dropout,
/// the weights actually applied to the values (the probabilities after it).
struct Scores<'a> {
    t: usize,
    block: usize,
    probs: &'a mut [f32],
    weights: &'a mut [f32],
    dropout: bool,
}

impl<'a> Scores<'a> {
    /// Over the first [`scratch_len`]`(t)` elements of `buffer`, in causal blocks of `block` rows.
    fn new(t: usize, block: usize, buffer: &'a mut [f32]) -> Self {
        let (probs, weights) = buffer[..scratch_len(t)].split_at_mut(t * t);
        Self { t, block, probs, weights, dropout: false }
    }

    /// probs = causal softmax(q kᵀ * scale), zero above the diagonal; with dropout, weights = probs
    /// after it (`first` is the mask index of this (batch row, head)'s element (0, 0)).
    fn compute(&mut self, q: View, k: View, hs: usize, scale: f32, dropout: Option<(Mask, usize)>) {
        let t = self.t;
        for (i0, rows) in row_blocks(t, self.block) {
            // SAFETY: q and k address t rows of hs elements inside one batch row's qkv slab; the block's
            // rows of probs, up to its last row's column, lie inside probs.
            unsafe { matmul_into(self.probs[i0 * t..].as_mut_ptr(), t, rows, i0 + rows, hs, q.at(i0, 0), k.t(), scale) };
        }
        for (i, row) in self.probs.chunks_exact_mut(t).enumerate() {
            let (seen, future) = row.split_at_mut(i + 1);
            future.fill(0.0);
            let max = max(seen);
            seen.iter_mut().for_each(|x| *x = exp(*x - max));
            let inv = 1.0 / sum(seen);
            seen.iter_mut().for_each(|x| *x *= inv);
        }
        self.dropout = dropout.is_some();
        if let Some((mask, first)) = dropout {
            self.weights.copy_from_slice(self.probs);
            mask.apply(self.weights, first);
        }
    }

    /// The weights applied to the values: the probabilities, after dropout if any.
    fn applied(&self) -> View {
        View::rows(if self.dropout { self.weights.as_ptr() } else { self.probs.as_ptr() }, self.t)
    }
}

/// Elements of the working memory one batch row's attention needs: its two (T, T) matrices.
pub fn scratch_len(t: usize) -> usize {
    2 * t * t
}

/// `out` (B, T, C) from `qkv` (B, T, 3C): softmax(q kᵀ / sqrt(hs)) v per head, causal.
pub fn forward(out: &mut [f32], qkv: &[f32], t: usize, c: usize, n_head: usize, dropout: Option<Mask>) {
    forward_in_blocks(out, qkv, t, c, n_head, dropout, CAUSAL_BLOCK);
}

/// [`forward`] in causal blocks of `block` rows.
fn forward_in_blocks(out: &mut [f32], qkv: &[f32], t: usize, c: usize, n_head: usize, dropout: Option<Mask>, block: usize) {
    check(out, qkv, t, c, n_head);
    out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * 3 * c)).enumerate().for_each(|(row, (y, qkv))| {
        forward_row(y, qkv, &mut vec![0f32; scratch_len(t)], t, c, n_head, dropout.map(|m| (m, row)), block);
    });
}

/// [`forward`] without dropout, with each batch row's working memory taken from `scratch`
/// ([`scratch_len`] elements per row) rather than allocated: for callers that run it again and
/// again, as decoding does.
pub fn forward_in(out: &mut [f32], qkv: &[f32], t: usize, c: usize, n_head: usize, scratch: &mut [f32]) {
    check(out, qkv, t, c, n_head);
    let rows = out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * 3 * c));
    rows.zip(scratch.par_chunks_mut(scratch_len(t)))
        .for_each(|((y, qkv), scratch)| forward_row(y, qkv, scratch, t, c, n_head, None, CAUSAL_BLOCK));
}

fn check(out: &[f32], qkv: &[f32], t: usize, c: usize, n_head: usize) {
    assert!(
        qkv.len() == out.len() * 3 && out.len().is_multiple_of(t * c) && c.is_multiple_of(n_head),
        "attention: buffer sizes do not match"
    );
}

/// One batch row of [`forward`]; `dropout` holds the mask and the row's index.
#[allow(clippy::too_many_arguments)]
fn forward_row(
    y: &mut [f32],
    qkv: &[f32],
    scratch: &mut [f32],
    t: usize,
    c: usize,
    n_head: usize,
    dropout: Option<(Mask, usize)>,
    block: usize,
) {
    let (c3, hs) = (3 * c, c / n_head);
    let scale = 1.0 / (hs as f32).sqrt();
    let mut scores = Scores::new(t, block, scratch);
    for h in 0..n_head {
        let view = |offset: usize| View::rows(qkv[offset..].as_ptr(), c3);
        let mask = dropout.map(|(m, row)| (m, (row * n_head + h) * t * t));
        scores.compute(view(h * hs), view(c + h * hs), hs, scale, mask);
        let weights = scores.applied();
        for (i0, rows) in row_blocks(t, block) {
            // SAFETY: head h's columns of the block's rows of y lie inside this batch row's slab; the block's
            // weights reach only the values up to its last row.
            unsafe { matmul_into(y[i0 * c + h * hs..].as_mut_ptr(), c, rows, hs, i0 + rows, weights.at(i0, 0), view(2 * c + h * hs), 1.0) };
        }
    }
}

/// `dqkv` (written in full) from the gradient `dout` of the merged heads.
pub fn backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], t: usize, c: usize, n_head: usize, dropout: Option<Mask>) {
    backward_in_blocks(dqkv, dout, qkv, t, c, n_head, dropout, CAUSAL_BLOCK);
}

/// [`backward`] in causal blocks of `block` rows.
#[allow(clippy::too_many_arguments)]
fn backward_in_blocks(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], t: usize, c: usize, n_head: usize, dropout: Option<Mask>, block: usize) {
    let (c3, hs) = (3 * c, c / n_head);
    assert!(
        qkv.len() == dout.len() * 3 && dqkv.len() == qkv.len() && dout.len().is_multiple_of(t * c),
        "attention backward: buffer sizes do not match"
    );
    let scale = 1.0 / (hs as f32).sqrt();
    dqkv.par_chunks_mut(t * c3).zip(qkv.par_chunks(t * c3).zip(dout.par_chunks(t * c))).enumerate().for_each(|(row, (dqkv, (qkv, dy)))| {
        let mut buffer = vec![0f32; scratch_len(t)];
        let mut scores = Scores::new(t, block, &mut buffer);
        let mut grad = vec![0f32; t * t];
        for h in 0..n_head {
            let (q, k, v) = (h * hs, c + h * hs, 2 * c + h * hs);
            let view = |offset: usize| View::rows(qkv[offset..].as_ptr(), c3);
            let dy_h = View::rows(dy[h * hs..].as_ptr(), c);
            let first = (row * n_head + h) * t * t;
            scores.compute(view(q), view(k), hs, scale, dropout.map(|m| (m, first)));
            let weights = scores.applied();
            // The products below take, for each block of rows, only what the causal mask leaves: rows of dV and dK
            // gather from the rows at or after them; rows of dW and dQ from the columns at or before them.
            // SAFETY: the views stay inside this batch row's qkv, dy and score buffers, and each destination is
            // its own head slice of dqkv, or `grad`.
            for (i0, rows) in row_blocks(t, block) {
                unsafe {
                    // dV = Wᵀ dY, and the gradient of the applied weights dW = dY Vᵀ.
                    matmul_into(dqkv[i0 * c3 + v..].as_mut_ptr(), c3, rows, hs, t - i0, weights.t().at(i0, i0), dy_h.at(i0, 0), 1.0);
                    matmul_into(grad[i0 * t..].as_mut_ptr(), t, rows, i0 + rows, hs, dy_h.at(i0, 0), view(v).t(), 1.0);
                }
            }
            if let Some(mask) = dropout {
                mask.apply(&mut grad, first);
            }
            // Back through the softmax: dS = P * (dP - rowsum(P * dP)) * scale.
            for (i, (g, p)) in grad.chunks_exact_mut(t).zip(scores.probs.chunks_exact(t)).enumerate() {
                let p_dot_g = dot(&p[..=i], &g[..=i]);
                for j in 0..t {
                    g[j] = if j <= i { p[j] * (g[j] - p_dot_g) * scale } else { 0.0 };
                }
            }
            let ds = View::rows(grad.as_ptr(), t);
            for (i0, rows) in row_blocks(t, block) {
                // SAFETY: as above.
                unsafe {
                    // dQ = dS K, dK = dSᵀ Q.
                    matmul_into(dqkv[i0 * c3 + q..].as_mut_ptr(), c3, rows, hs, i0 + rows, ds.at(i0, 0), view(k), 1.0);
                    matmul_into(dqkv[i0 * c3 + k..].as_mut_ptr(), c3, rows, hs, t - i0, ds.t().at(i0, i0), view(q).at(i0, 0), 1.0);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of a few rows, over a length that ends in a partial block, against one block of all rows (the whole
    /// square), forward and backward, with and without dropout: the causal blocks skip only what the mask zeroes.
    /// (The whole square is checked against candle's autograd and finite differences in tests/train_step.rs.)
    #[test]
    fn causal_blocks_give_the_whole_square() {
        let (b, t, c, n_head) = (2, 23, 12, 3);
        let values =
            |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| (((i * 7 + seed * 13) % 29) as f32 / 14.0 - 1.0) * 0.7).collect() };
        let (qkv, dout) = (values(b * t * 3 * c, 1), values(b * t * c, 2));
        for dropout in [
            None,
            Some(Mask::new(crate::kernels::dropout::DropoutKey { seed: 3, step: 1 }, crate::kernels::dropout::Site::Attention(0), 0.25)),
        ] {
            let run = |block: usize| {
                let (mut out, mut dqkv) = (vec![f32::NAN; b * t * c], vec![f32::NAN; b * t * 3 * c]);
                forward_in_blocks(&mut out, &qkv, t, c, n_head, dropout, block);
                backward_in_blocks(&mut dqkv, &dout, &qkv, t, c, n_head, dropout, block);
                (out, dqkv)
            };
            let (whole_out, whole_dqkv) = run(t);
            for block in [1, 5, 8] {
                let (out, dqkv) = run(block);
                for (what, got, want) in [("out", &out, &whole_out), ("dqkv", &dqkv, &whole_dqkv)] {
                    let diff = got
                        .iter()
                        .zip(want.iter())
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()).max(if a.is_nan() { f32::INFINITY } else { 0.0 }));
                    assert!(diff <= 1e-5, "{what} in blocks of {block} (dropout {}): differs by {diff}", dropout.is_some());
                }
            }
        }
    }
}
