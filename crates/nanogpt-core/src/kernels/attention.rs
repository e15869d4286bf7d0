//! Causal self-attention from the fused q,k,v projection (B, T, 3C) to the merged heads (B, T, C),
//! with optional dropout on the attention weights. Each (batch row, head) is four small matrix
//! products and a row softmax, run on one thread (batch rows run in parallel). Probabilities and
//! dropout decisions are recomputed in the backward pass instead of being kept (the dropout mask is
//! a hash of the element's index, as in flash attention), so no (B, NH, T, T) buffer exists.

use rayon::prelude::*;

use super::dropout::Mask;
use super::{dot, exp, gemm, max, sum};

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

/// The (T, T) attention matrices of one (batch row, head): the probabilities and the weights
/// actually applied to the values (the probabilities after dropout).
struct Scores<'a> {
    t: usize,
    probs: &'a mut [f32],
    weights: &'a mut [f32],
}

impl<'a> Scores<'a> {
    /// Over the first [`scratch_len`]`(t)` elements of `buffer`.
    fn new(t: usize, buffer: &'a mut [f32]) -> Self {
        let (probs, weights) = buffer[..scratch_len(t)].split_at_mut(t * t);
        Self { t, probs, weights }
    }

    /// probs = causal softmax(q kᵀ * scale); weights = probs after dropout (`first` is the mask
    /// index of this (batch row, head)'s element (0, 0)).
    fn compute(&mut self, q: View, k: View, hs: usize, scale: f32, dropout: Option<(Mask, usize)>) {
        let t = self.t;
        // SAFETY: q and k address t rows of hs elements inside one batch row's qkv slab.
        unsafe { matmul_into(self.probs.as_mut_ptr(), t, t, t, hs, q, k.t(), scale) };
        for (i, row) in self.probs.chunks_exact_mut(t).enumerate() {
            let (seen, future) = row.split_at_mut(i + 1);
            future.fill(0.0);
            let max = max(seen);
            seen.iter_mut().for_each(|x| *x = exp(*x - max));
            let inv = 1.0 / sum(seen);
            seen.iter_mut().for_each(|x| *x *= inv);
        }
        self.weights.copy_from_slice(self.probs);
        if let Some((mask, first)) = dropout {
            mask.apply(self.weights, first);
        }
    }
}

/// Elements of the working memory one batch row's attention needs: its two (T, T) matrices.
pub fn scratch_len(t: usize) -> usize {
    2 * t * t
}

/// `out` (B, T, C) from `qkv` (B, T, 3C): softmax(q kᵀ / sqrt(hs)) v per head, causal.
pub fn forward(out: &mut [f32], qkv: &[f32], t: usize, c: usize, n_head: usize, dropout: Option<Mask>) {
    check(out, qkv, t, c, n_head);
    out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * 3 * c)).enumerate().for_each(|(row, (y, qkv))| {
        forward_row(y, qkv, &mut vec![0f32; scratch_len(t)], t, c, n_head, dropout.map(|m| (m, row)));
    });
}

/// [`forward`] without dropout, with each batch row's working memory taken from `scratch`
/// ([`scratch_len`] elements per row) rather than allocated: for callers that run it again and
/// again, as decoding does.
pub fn forward_in(out: &mut [f32], qkv: &[f32], t: usize, c: usize, n_head: usize, scratch: &mut [f32]) {
    check(out, qkv, t, c, n_head);
    let rows = out.par_chunks_mut(t * c).zip(qkv.par_chunks(t * 3 * c));
    rows.zip(scratch.par_chunks_mut(scratch_len(t))).for_each(|((y, qkv), scratch)| forward_row(y, qkv, scratch, t, c, n_head, None));
}

fn check(out: &[f32], qkv: &[f32], t: usize, c: usize, n_head: usize) {
    assert!(
        qkv.len() == out.len() * 3 && out.len().is_multiple_of(t * c) && c.is_multiple_of(n_head),
        "attention: buffer sizes do not match"
    );
}

/// One batch row of [`forward`]; `dropout` holds the mask and the row's index.
#[allow(clippy::too_many_arguments)]
fn forward_row(y: &mut [f32], qkv: &[f32], scratch: &mut [f32], t: usize, c: usize, n_head: usize, dropout: Option<(Mask, usize)>) {
    let (c3, hs) = (3 * c, c / n_head);
    let scale = 1.0 / (hs as f32).sqrt();
    let mut scores = Scores::new(t, scratch);
    for h in 0..n_head {
        let view = |offset: usize| View::rows(qkv[offset..].as_ptr(), c3);
        let mask = dropout.map(|(m, row)| (m, (row * n_head + h) * t * t));
        scores.compute(view(h * hs), view(c + h * hs), hs, scale, mask);
        let weights = View::rows(scores.weights.as_ptr(), t);
        // SAFETY: head h's columns of y's t rows lie inside this batch row's slab.
        unsafe { matmul_into(y[h * hs..].as_mut_ptr(), c, t, hs, t, weights, view(2 * c + h * hs), 1.0) };
    }
}

/// `dqkv` (written in full) from the gradient `dout` of the merged heads.
pub fn backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], t: usize, c: usize, n_head: usize, dropout: Option<Mask>) {
    let (c3, hs) = (3 * c, c / n_head);
    assert!(
        qkv.len() == dout.len() * 3 && dqkv.len() == qkv.len() && dout.len().is_multiple_of(t * c),
        "attention backward: buffer sizes do not match"
    );
    let scale = 1.0 / (hs as f32).sqrt();
    dqkv.par_chunks_mut(t * c3).zip(qkv.par_chunks(t * c3).zip(dout.par_chunks(t * c))).enumerate().for_each(|(row, (dqkv, (qkv, dy)))| {
        let mut buffer = vec![0f32; scratch_len(t)];
        let mut scores = Scores::new(t, &mut buffer);
        let mut grad = vec![0f32; t * t];
        for h in 0..n_head {
            let (q, k, v) = (h * hs, c + h * hs, 2 * c + h * hs);
            let view = |offset: usize| View::rows(qkv[offset..].as_ptr(), c3);
            let dy_h = View::rows(dy[h * hs..].as_ptr(), c);
            let first = (row * n_head + h) * t * t;
            scores.compute(view(q), view(k), hs, scale, dropout.map(|m| (m, first)));
            let weights = View::rows(scores.weights.as_ptr(), t);
            // SAFETY: the views stay inside this batch row's qkv, dy and score buffers, and each
            // destination is its own head slice of dqkv, or `grad`.
            unsafe {
                // dV = Wᵀ dY, and the gradient of the applied weights dW = dY Vᵀ.
                matmul_into(dqkv[v..].as_mut_ptr(), c3, t, hs, t, weights.t(), dy_h, 1.0);
                matmul_into(grad.as_mut_ptr(), t, t, t, hs, dy_h, view(v).t(), 1.0);
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
            // SAFETY: as above.
            unsafe {
                // dQ = dS K, dK = dSᵀ Q.
                matmul_into(dqkv[q..].as_mut_ptr(), c3, t, hs, t, ds, view(k), 1.0);
                matmul_into(dqkv[k..].as_mut_ptr(), c3, t, hs, t, ds.t(), view(q), 1.0);
            }
        }
    });
}
