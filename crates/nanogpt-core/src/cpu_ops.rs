//! Fused CPU kernels, each a candle custom op with its backward, for the operations that candle
//! would otherwise run as many small passes: LayerNorm, causal attention, GELU and cross-entropy.
//! One pass over memory instead of five to ten per operation, and no intermediate tensors for
//! autograd to keep. Matrix products stay with candle (gemm). `ops.rs` picks these on CPU and
//! candle's composite ops elsewhere; the tests check that both give the same values and gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Runs `f` on the f32 contents of `t` (made contiguous first).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(&cpu.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()]),
        _ => candle_core::bail!("fused CPU kernels need CPU tensors"),
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("fused CPU kernels need contiguous inputs"),
    }
}

fn tensor(values: Vec<f32>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, shape, like.device())
}

/// Dot product with eight independent partial sums: a single running sum cannot be vectorised
/// (float addition is not associative) and waits on the adder's latency at every element.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Squared distance Σ(a-b)², with the same eight partial sums as `dot`.
#[inline(always)]
fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| (x - y) * (x - y)).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += (x[k] - y[k]) * (x[k] - y[k]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for x in chunks {
        for k in 0..8 {
            acc[k] += x[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

// ---------------------------------------------------------------------------------------------
// Linear layer y = x wᵀ + b over the last dimension, straight on gemm: no reshape, transpose or
// broadcast nodes for autograd to walk (each one costs a zero-filled gradient and an addition).

struct Linear;

impl Linear {
    fn out_shape(x: &Layout, w: &Layout) -> Result<(usize, usize, usize, Shape)> {
        let (&k, rows) = x.dims().split_last().ok_or_else(|| candle_core::Error::Msg("linear needs a non-scalar input".into()))?;
        let &[m, k_w] = w.dims() else { candle_core::bail!("linear weight must be 2-d, got {:?}", w.dims()) };
        if k != k_w {
            candle_core::bail!("linear: input width {k} does not match weight {:?}", w.dims());
        }
        let mut shape = rows.to_vec();
        shape.push(m);
        Ok((rows.iter().product(), m, k, Shape::from(shape)))
    }

    fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, m: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * m];
        if let Some(b) = bias {
            y.chunks_exact_mut(m).for_each(|row| row.copy_from_slice(b));
        }
        // SAFETY: x is n x k, w is m x k (read transposed), y is n x m, all contiguous and disjoint.
        unsafe {
            gemm::gemm(n, m, k, y.as_mut_ptr(), 1, m as isize, bias.is_some(), x.as_ptr(), 1, k as isize, w.as_ptr(), k as isize, 1, 1.0, 1.0, false, false, false, parallelism());
        }
        y
    }

    /// Gradients of x (dy w), w (dyᵀ x) and b (column sums of dy).
    fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (m, k) = w.dims2()?;
        let n = x.elem_count() / k;
        let (dx, dw, db) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(dy, |dy| {
                    let (mut dx, mut dw) = (vec![0f32; n * k], vec![0f32; m * k]);
                    // SAFETY: shapes as stated above; outputs are fresh buffers.
                    unsafe {
                        gemm::gemm(n, k, m, dx.as_mut_ptr(), 1, k as isize, false, dy.as_ptr(), 1, m as isize, w.as_ptr(), 1, k as isize, 0.0, 1.0, false, false, false, parallelism());
                        gemm::gemm(m, k, n, dw.as_mut_ptr(), 1, k as isize, false, dy.as_ptr(), m as isize, 1, x.as_ptr(), 1, k as isize, 0.0, 1.0, false, false, false, parallelism());
                    }
                    let db = with_bias.then(|| {
                        let mut db = vec![0f32; m];
                        dy.chunks_exact(m).for_each(|row| db.iter_mut().zip(row).for_each(|(d, g)| *d += g));
                        db
                    });
                    Ok((dx, dw, db))
                })
            })
        })?;
        let db = match db {
            Some(db) => Some(tensor(db, &[m], x)?),
            None => None,
        };
        Ok((tensor(dx, x.dims(), x)?, tensor(dw, &[m, k], x)?, db))
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear-no-bias"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m, k, shape) = Self::out_shape(xl, wl)?;
        let y = Self::forward(contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, None, n, m, k);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::backward(x, w, dy, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, m, k, shape) = Self::out_shape(xl, wl)?;
        let y = Self::forward(contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, Some(contiguous_f32(bs, bl)?), n, m, k);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = Self::backward(x, w, dy, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, Linear),
        None => x.apply_op2(&weight, Linear),
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension (eps inside the square root, as PyTorch).

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    for v in chunks {
        for k in 0..8 {
            acc[k] += (v[k] - mean) * (v[k] - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + tail) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| {
            let (mean, rstd) = row_stats(x, self.eps);
            for i in 0..c {
                y[i] = (x[i] - mean) * rstd * w[i] + b.map_or(0.0, |b| b[i]);
            }
        });
        y
    }

    /// Gradients of x, weight and bias (llm.c's layernorm_backward, statistics recomputed).
    fn backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = w.elem_count();
        let (dx, dw, db) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(dy, |dy| {
                    let mut dx = vec![0f32; x.len()];
                    let (dw, db) = dx
                        .par_chunks_mut(c)
                        .zip(x.par_chunks(c).zip(dy.par_chunks(c)))
                        .fold(
                            || (vec![0f32; c], vec![0f32; c]),
                            |(mut dw, mut db), (dx, (x, dy))| {
                                let (mean, rstd) = row_stats(x, self.eps);
                                let (mut dnorm_mean, mut dnorm_norm_mean) = (0f32, 0f32);
                                for i in 0..c {
                                    let norm = (x[i] - mean) * rstd;
                                    let dnorm = w[i] * dy[i];
                                    dnorm_mean += dnorm;
                                    dnorm_norm_mean += dnorm * norm;
                                    dw[i] += norm * dy[i];
                                    db[i] += dy[i];
                                }
                                dnorm_mean /= c as f32;
                                dnorm_norm_mean /= c as f32;
                                for i in 0..c {
                                    let norm = (x[i] - mean) * rstd;
                                    dx[i] = (w[i] * dy[i] - dnorm_mean - norm * dnorm_norm_mean) * rstd;
                                }
                                (dw, db)
                            },
                        )
                        .reduce(
                            || (vec![0f32; c], vec![0f32; c]),
                            |(mut dw, mut db), (dw2, db2)| {
                                dw.iter_mut().zip(dw2).for_each(|(a, b)| *a += b);
                                db.iter_mut().zip(db2).for_each(|(a, b)| *a += b);
                                (dw, db)
                            },
                        );
                    Ok((dx, dw, db))
                })
            })
        })?;
        Ok((tensor(dx, x.dims(), x)?, tensor(dw, &[c], x)?, tensor(db, &[c], x)?))
    }
}

impl CustomOp2 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-no-bias"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, None);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, Some(contiguous_f32(bs, bl)?));
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, dy)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let op = LayerNorm { eps: eps as f32 };
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(weight, b, op),
        None => x.apply_op2(weight, op),
    }
}

// ---------------------------------------------------------------------------------------------
// GELU, exact (erf) or tanh approximation.

/// e^x to about 2e-7 relative error, branch-free so that loops over it vectorise
/// (libm's `expf` is a call per element).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The low mantissa bits of `shifted` hold n as an integer: 2^n without a float-to-int conversion.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    p * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// erf to about 1e-7 (Numerical Recipes' Chebyshev fit of erfc), enough for f32.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_9 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(poly);
    (1.0 - erfc).copysign(x)
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu {
    tanh: bool,
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * INV_SQRT_2))
}

#[inline(always)]
fn gelu_erf_derivative(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * INV_SQRT_2)) + x * exp(-0.5 * x * x) * INV_SQRT_2PI
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
}

#[inline(always)]
fn gelu_tanh_derivative(x: f32) -> f32 {
    let th = tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x));
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| match self.tanh {
            true => y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu_tanh(x)),
            false => y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu_erf(x)),
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(x, |x| {
            with_f32(dy, |dy| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(dy.par_chunks(4096))).for_each(|(dx, (x, dy))| {
                    let rows = dx.iter_mut().zip(x.iter().zip(dy));
                    match self.tanh {
                        true => rows.for_each(|(dx, (&x, &dy))| *dx = gelu_tanh_derivative(x) * dy),
                        false => rows.for_each(|(dx, (&x, &dy))| *dx = gelu_erf_derivative(x) * dy),
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, x.dims(), x)?))
    }
}

pub fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu { tanh })
}

// ---------------------------------------------------------------------------------------------
// Causal self-attention from the fused q,k,v projection (B, T, 3C) to the merged heads (B, T, C),
// with optional dropout on the attention weights. Each (batch row, head) is four small matrix
// products and a row softmax; probabilities and dropout decisions are recomputed in the backward
// pass instead of being kept (the dropout mask is a hash of the position, as in flash attention),
// so autograd holds no (B, H, T, T) tensor.

#[derive(Clone, Copy)]
pub struct AttentionDropout {
    pub p: f32,
    pub seed: u64,
}

impl AttentionDropout {
    /// 1/(1-p) where the weight of query `i` on key `j` in head `bh` is kept, else 0.
    #[inline(always)]
    fn scale(&self, bh: usize, i: usize, j: usize, t: usize) -> f32 {
        let mut z = self.seed ^ (((bh * t + i) * t + j) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let uniform = (z >> 40) as f32 / (1u64 << 24) as f32;
        if uniform < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

struct CausalAttention {
    n_head: usize,
    dropout: Option<AttentionDropout>,
}

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

/// dst (m x n, rows `dst_row_stride` apart) = scale * lhs (m x k) * rhs (k x n), on this thread
/// only: the callers already run one batch row per thread.
///
/// Safety: every view must address valid memory for its shape, and dst must not overlap lhs or rhs.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_into(dst: *mut f32, dst_row_stride: usize, m: usize, n: usize, k: usize, lhs: View, rhs: View, scale: f32) {
    gemm::gemm(
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
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The (T, T) attention matrices of one (batch row, head): the probabilities and the weights
/// actually applied to the values (the probabilities after dropout).
struct Scores {
    t: usize,
    probs: Vec<f32>,
    weights: Vec<f32>,
}

impl Scores {
    fn new(t: usize) -> Self {
        Self { t, probs: vec![0f32; t * t], weights: vec![0f32; t * t] }
    }

    /// probs = causal softmax(q kᵀ * scale); weights = probs after dropout.
    fn compute(&mut self, q: View, k: View, hs: usize, scale: f32, dropout: Option<(AttentionDropout, usize)>) {
        let t = self.t;
        // SAFETY: q and k address t rows of hs elements inside one batch row's qkv slab.
        unsafe { matmul_into(self.probs.as_mut_ptr(), t, t, t, hs, q, k.t(), scale) };
        for (i, row) in self.probs.chunks_exact_mut(t).enumerate() {
            let (seen, future) = row.split_at_mut(i + 1);
            future.fill(0.0);
            let max = seen.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            seen.iter_mut().for_each(|x| *x = exp(*x - max));
            let inv = 1.0 / sum(seen);
            seen.iter_mut().for_each(|x| *x *= inv);
        }
        match dropout {
            Some((d, bh)) => {
                for (i, (w, p)) in self.weights.chunks_exact_mut(t).zip(self.probs.chunks_exact(t)).enumerate() {
                    for j in 0..t {
                        w[j] = if j <= i { p[j] * d.scale(bh, i, j, t) } else { 0.0 };
                    }
                }
            }
            None => self.weights.copy_from_slice(&self.probs),
        }
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s, l)?;
        let &[b, t, c3] = l.dims() else { candle_core::bail!("attention expects (batch, time, 3*n_embd)") };
        let (c, nh) = (c3 / 3, self.n_head);
        let hs = c / nh;
        let scale = 1.0 / (hs as f32).sqrt();
        let mut y = vec![0f32; b * t * c];
        y.par_chunks_mut(t * c).zip(qkv.par_chunks(t * c3)).enumerate().for_each(|(row, (y, qkv))| {
            let mut scores = Scores::new(t);
            for h in 0..nh {
                let view = |offset: usize| View::rows(qkv[offset..].as_ptr(), c3);
                scores.compute(view(h * hs), view(c + h * hs), hs, scale, self.dropout.map(|d| (d, row * nh + h)));
                let weights = View::rows(scores.weights.as_ptr(), t);
                // SAFETY: head h's columns of y's t rows lie inside this batch row's slab.
                unsafe { matmul_into(y[h * hs..].as_mut_ptr(), c, t, hs, t, weights, view(2 * c + h * hs), 1.0) };
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, t, c))))
    }

    fn bwd(&self, qkv_t: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (_, t, c3) = qkv_t.dims3()?;
        let (c, nh) = (c3 / 3, self.n_head);
        let hs = c / nh;
        let scale = 1.0 / (hs as f32).sqrt();
        let dqkv = with_f32(qkv_t, |qkv| {
            with_f32(dy, |dy| {
                let mut dqkv = vec![0f32; qkv.len()];
                dqkv.par_chunks_mut(t * c3).zip(qkv.par_chunks(t * c3).zip(dy.par_chunks(t * c))).enumerate().for_each(
                    |(row, (dqkv, (qkv, dy)))| {
                        let mut scores = Scores::new(t);
                        let mut grad = vec![0f32; t * t];
                        for h in 0..nh {
                            let (q, k, v) = (h * hs, c + h * hs, 2 * c + h * hs);
                            let view = |offset: usize| View::rows(qkv[offset..].as_ptr(), c3);
                            let dy_h = View::rows(dy[h * hs..].as_ptr(), c);
                            let bh = row * nh + h;
                            scores.compute(view(q), view(k), hs, scale, self.dropout.map(|d| (d, bh)));
                            let weights = View::rows(scores.weights.as_ptr(), t);
                            // SAFETY: the views stay inside this batch row's qkv, dy and score buffers,
                            // and each destination is its own head slice of dqkv, or `grad`.
                            unsafe {
                                // dV = Wᵀ dY, and the gradient of the applied weights dW = dY Vᵀ.
                                matmul_into(dqkv[v..].as_mut_ptr(), c3, t, hs, t, weights.t(), dy_h, 1.0);
                                matmul_into(grad.as_mut_ptr(), t, t, t, hs, dy_h, view(v).t(), 1.0);
                            }
                            // Back through dropout and the softmax: dS = P * (dP - rowsum(P * dP)) * scale.
                            for (i, (g, p)) in grad.chunks_exact_mut(t).zip(scores.probs.chunks_exact(t)).enumerate() {
                                if let Some(d) = self.dropout {
                                    (0..=i).for_each(|j| g[j] *= d.scale(bh, i, j, t));
                                }
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
                    },
                );
                Ok(dqkv)
            })
        })?;
        Ok(Some(tensor(dqkv, qkv_t.dims(), qkv_t)?))
    }
}

pub fn causal_attention(qkv: &Tensor, n_head: usize, dropout: Option<AttentionDropout>) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(CausalAttention { n_head, dropout })
}

// ---------------------------------------------------------------------------------------------
// Mean cross-entropy of logits (N, V) against i64 targets (N), -1 ignored.

struct CrossEntropy;

impl CrossEntropy {
    /// Per-row log-sum-exp, and how many rows count.
    fn log_sum_exp(logits: &[f32], v: usize) -> Vec<f32> {
        logits
            .par_chunks(v)
            .map(|row| {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                max + row.iter().map(|&x| exp(x - max)).sum::<f32>().ln()
            })
            .collect()
    }
}

fn targets_of(s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::I64(t), Some((a, b))) => Ok(t[a..b].to_vec()),
        _ => candle_core::bail!("cross-entropy targets must be contiguous i64"),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(ls, ll)?;
        let targets = targets_of(ts, tl)?;
        let v = ll.dims()[1];
        let lse = Self::log_sum_exp(logits, v);
        let (mut total, mut counted) = (0f64, 0usize);
        for (i, &t) in targets.iter().enumerate() {
            if t >= 0 {
                total += (lse[i] - logits[i * v + t as usize]) as f64;
                counted += 1;
            }
        }
        if counted == 0 {
            candle_core::bail!("every target is -1 (ignored): there is nothing to compute a loss on");
        }
        Ok((CpuStorage::F32(vec![(total / counted as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits_t: &Tensor, targets_t: &Tensor, _loss: &Tensor, dloss: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let v = logits_t.dim(1)?;
        let targets = targets_t.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let counted = targets.iter().filter(|&&t| t >= 0).count().max(1);
        let scale = dloss.to_dtype(DType::F32)?.to_scalar::<f32>()? / counted as f32;
        let dlogits = with_f32(logits_t, |logits| {
            let lse = Self::log_sum_exp(logits, v);
            let mut d = vec![0f32; logits.len()];
            d.par_chunks_mut(v).zip(logits.par_chunks(v)).enumerate().for_each(|(i, (d, row))| {
                let t = targets[i];
                if t < 0 {
                    return;
                }
                for (k, (d, x)) in d.iter_mut().zip(row).enumerate() {
                    let p = exp(x - lse[i]);
                    *d = (p - if k as i64 == t { 1.0 } else { 0.0 }) * scale;
                }
            });
            Ok(d)
        })?;
        Ok((Some(tensor(dlogits, logits_t.dims(), logits_t)?), None))
    }
}

pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&targets.to_dtype(DType::I64)?.contiguous()?, CrossEntropy)
}

// ---------------------------------------------------------------------------------------------
// AdamW: one pass over parameter, gradient and both moments instead of a dozen tensor ops.

pub struct AdamWUpdate {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Multiplies the gradient first (global-norm clipping).
    pub grad_scale: f64,
    pub step_size: f64,
    pub bias_correction2_sqrt: f64,
}

impl AdamWUpdate {
    /// The new parameter and moments (PyTorch's AdamW arithmetic element by element) and ‖Δp‖/‖p‖.
    pub fn apply(&self, param: &Tensor, grad: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor) -> Result<(Tensor, Tensor, Tensor, f64)> {
        let n = param.elem_count();
        let (mut p, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let (change, size) = with_f32(param, |p0| {
            with_f32(grad, |g| {
                with_f32(exp_avg, |m0| {
                    with_f32(exp_avg_sq, |v0| {
                        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
                        let decay = (1.0 - self.lr * self.weight_decay) as f32;
                        let (scale, step, bc2, eps) =
                            (self.grad_scale as f32, self.step_size as f32, self.bias_correction2_sqrt as f32, self.eps as f32);
                        for i in 0..n {
                            let gi = g[i] * scale;
                            m[i] = b1 * m0[i] + (1.0 - b1) * gi;
                            v[i] = b2 * v0[i] + (1.0 - b2) * gi * gi;
                            p[i] = p0[i] * decay - step * m[i] / (v[i].sqrt() / bc2 + eps);
                        }
                        Ok((squared_distance(&p, p0) as f64, dot(p0, p0) as f64))
                    })
                })
            })
        })?;
        let shape = param.dims();
        let ratio = crate::optim::ratio(change, size);
        Ok((tensor(p, shape, param)?, tensor(m, shape, param)?, tensor(v, shape, param)?, ratio))
    }
}
