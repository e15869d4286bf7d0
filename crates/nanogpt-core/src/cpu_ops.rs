//! The training step's CPU kernels (`kernels/`) as candle custom ops with their backward, so that the
//! candle model (`model.rs`, used for sampling and as the autograd reference) runs the same arithmetic
//! on the CPU. `ops.rs` picks these on CPU and candle's composite ops elsewhere; the tests check that
//! both give the same values and gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use crate::kernels::dropout::Mask;
use crate::kernels::{attention, cross_entropy, gelu, layernorm, matmul};

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

// ---------------------------------------------------------------------------------------------
// Linear layer y = x wᵀ + b over the last dimension.

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

    fn forward(xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (n, m, k, shape) = Self::out_shape(xl, wl)?;
        let mut y = vec![0f32; n * m];
        matmul::forward(&mut y, contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, bias, n, k, m, false);
        Ok((CpuStorage::F32(y), shape))
    }

    /// Gradients of x, w and b.
    fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (m, k) = w.dims2()?;
        let n = x.elem_count() / k;
        let (mut dx, mut dw, mut db) = (vec![0f32; n * k], vec![0f32; m * k], vec![0f32; if with_bias { m } else { 0 }]);
        with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(dy, |dy| {
                    matmul::backward(Some(&mut dx), &mut dw, with_bias.then_some(&mut db[..]), dy, x, w, n, k, m, false);
                    Ok(())
                })
            })
        })?;
        let db = if with_bias { Some(tensor(db, &[m], x)?) } else { None };
        Ok((tensor(dx, x.dims(), x)?, tensor(dw, &[m, k], x)?, db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear-no-bias"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        Self::forward(xs, xl, ws, wl, None)
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
        Self::forward(xs, xl, ws, wl, Some(contiguous_f32(bs, bl)?))
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
// LayerNorm over the last dimension (eps 1e-5, as nanoGPT's).

struct LayerNorm;

impl LayerNorm {
    fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let rows = x.len() / w.len();
        let (mut y, mut mean, mut rstd) = (vec![0f32; x.len()], vec![0f32; rows], vec![0f32; rows]);
        layernorm::forward(&mut y, &mut mean, &mut rstd, x, w, b);
        y
    }

    /// Gradients of x, weight and bias, the row statistics recomputed.
    fn backward(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = w.elem_count();
        let mut dx = vec![0f32; x.elem_count()];
        let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
        with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(dy, |dy| {
                    let (mean, rstd): (Vec<f32>, Vec<f32>) = x.chunks_exact(c).map(layernorm::row_stats).unzip();
                    layernorm::backward(&mut dx, &mut dw, Some(&mut db), dy, x, &mean, &rstd, w, false, false);
                    Ok(())
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
        let y = Self::forward(contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, None);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::backward(x, w, dy)?;
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
        let y = Self::forward(contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, Some(contiguous_f32(bs, bl)?));
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
        let (dx, dw, db) = Self::backward(x, w, dy)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm with the kernels' eps (1e-5); `eps` must be that value.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if eps as f32 != layernorm::EPS {
        candle_core::bail!("the CPU LayerNorm kernel has eps {}; got {eps}", layernorm::EPS);
    }
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(weight, b, LayerNorm),
        None => x.apply_op2(weight, LayerNorm),
    }
}

// ---------------------------------------------------------------------------------------------
// GELU, exact (erf) or tanh approximation.

struct Gelu {
    tanh: bool,
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let mut y = vec![0f32; x.len()];
        gelu::forward(&mut y, x, self.tanh);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = dy.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        with_f32(x, |x| {
            gelu::backward(&mut dx, x, self.tanh);
            Ok(())
        })?;
        Ok(Some(tensor(dx, x.dims(), x)?))
    }
}

pub fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu { tanh })
}

// ---------------------------------------------------------------------------------------------
// Causal self-attention from the fused q,k,v projection (B, T, 3C) to the merged heads (B, T, C).

struct CausalAttention {
    n_head: usize,
    dropout: Option<Mask>,
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s, l)?;
        let &[b, t, c3] = l.dims() else { candle_core::bail!("attention expects (batch, time, 3*n_embd)") };
        let c = c3 / 3;
        let mut y = vec![0f32; b * t * c];
        attention::forward(&mut y, qkv, t, c, self.n_head, self.dropout);
        Ok((CpuStorage::F32(y), Shape::from((b, t, c))))
    }

    fn bwd(&self, qkv_t: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (_, t, c3) = qkv_t.dims3()?;
        let mut dqkv = vec![0f32; qkv_t.elem_count()];
        with_f32(qkv_t, |qkv| {
            with_f32(dy, |dy| {
                attention::backward(&mut dqkv, dy, qkv, t, c3 / 3, self.n_head, self.dropout);
                Ok(())
            })
        })?;
        Ok(Some(tensor(dqkv, qkv_t.dims(), qkv_t)?))
    }
}

pub fn causal_attention(qkv: &Tensor, n_head: usize, dropout: Option<Mask>) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(CausalAttention { n_head, dropout })
}

// ---------------------------------------------------------------------------------------------
// Mean cross-entropy of logits (N, V) against targets (N), -1 ignored.

struct CrossEntropy;

fn targets_of(t: &Tensor) -> Result<Vec<i32>> {
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|t| t as i32).collect())
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut logits = contiguous_f32(ls, ll)?.to_vec();
        let targets: Vec<i32> = match (ts, tl.contiguous_offsets()) {
            (CpuStorage::I64(t), Some((a, b))) => t[a..b].iter().map(|&t| t as i32).collect(),
            _ => candle_core::bail!("cross-entropy targets must be contiguous i64"),
        };
        let counted = cross_entropy::counted(&targets);
        if counted == 0 {
            candle_core::bail!("every target is -1 (ignored): there is nothing to compute a loss on");
        }
        let total = cross_entropy::forward(&mut logits, &targets, ll.dims()[1], None);
        Ok((CpuStorage::F32(vec![(total / counted as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits_t: &Tensor, targets_t: &Tensor, _loss: &Tensor, dloss: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let targets = targets_of(targets_t)?;
        let scale = dloss.to_dtype(DType::F32)?.to_scalar::<f32>()? / cross_entropy::counted(&targets).max(1) as f32;
        let mut dlogits = logits_t.flatten_all()?.to_vec1::<f32>()?;
        cross_entropy::forward(&mut dlogits, &targets, logits_t.dim(1)?, Some(scale));
        Ok((Some(tensor(dlogits, logits_t.dims(), logits_t)?), None))
    }
}

pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&targets.to_dtype(DType::I64)?.contiguous()?, CrossEntropy)
}
