//! The model's building-block operations. On CPU they run as the fused kernels of `cpu_ops`;
//! elsewhere as candle ops that all record a backward pass (candle_nn's own fused `layer_norm` and
//! `softmax_last_dim` record none and would cut the gradients).
//!
//! Mixed precision: activations carry the compute dtype (f32, bf16 or f16) and every operation
//! casts its f32 parameters to that dtype where it uses them; `to_dtype` records a backward, so
//! gradients arrive on the f32 master weights in f32. LayerNorm statistics and the cross-entropy
//! are computed in f32 whatever the compute dtype, and the attention softmax accumulates in f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use crate::cpu_ops;
use crate::kernels::dropout::{DropoutKey, Mask, Site};

/// Whether a forward pass trains (dropout active, masks drawn for the given key) or evaluates.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Train(DropoutKey),
    Eval,
}

impl Mode {
    pub fn dropout(&self, x: &Tensor, p: f64, site: Site) -> Result<Tensor> {
        match self {
            Mode::Train(key) if p > 0.0 => dropout(x, p, Mask::new(*key, site, p as f32)),
            _ => Ok(x.clone()),
        }
    }

    /// The attention dropout mask of `layer`, when training with dropout.
    fn attention_mask(&self, p: f64, layer: usize) -> Option<Mask> {
        match self {
            Mode::Train(key) if p > 0.0 => Some(Mask::new(*key, Site::Attention(layer), p as f32)),
            _ => None,
        }
    }
}

/// Fused kernels exist for f32 on the CPU; `COMPOSITE_ONLY` lets tests compare both paths.
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !COMPOSITE_ONLY.with(|c| c.get())
}

thread_local! {
    static COMPOSITE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused CPU kernels switched off on this thread (the reference path for tests).
pub fn with_composite_ops<R>(f: impl FnOnce() -> R) -> R {
    COMPOSITE_ONLY.with(|c| c.set(true));
    let out = f();
    COMPOSITE_ONLY.with(|c| c.set(false));
    out
}

/// `x @ weight.T + bias` over the last dimension, weight in PyTorch's (out, in) layout.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if fused(x) {
        return cpu_ops::linear(x, weight, bias);
    }
    let (fan_out, fan_in) = weight.dims2()?;
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("linear needs at least one dimension") = fan_out;
    let weight = weight.to_dtype(x.dtype())?;
    // cuBLAS takes the transposed (out, in) weight as it is; only the activations need to be contiguous.
    let y = x.contiguous()?.reshape(((), fan_in))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
        None => y,
    };
    y.reshape(out_shape)
}

/// LayerNorm over the last dimension with an optional bias (nanoGPT's `bias=False` drops it).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if fused(x) {
        return cpu_ops::layer_norm(x, weight, bias, eps);
    }
    let x32 = x.to_dtype(DType::F32)?;
    let centered = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(weight)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.to_dtype(x.dtype())
}

pub fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    match (fused(x), tanh) {
        (true, _) => cpu_ops::gelu(x, tanh),
        (false, true) => x.gelu(),
        (false, false) => x.gelu_erf(),
    }
}

/// Keys and values of the positions already processed by one layer (for generation).
pub type LayerCache = Option<(Tensor, Tensor)>;

/// Multi-head causal self-attention from the fused q,k,v projection (B, T, 3C) to the merged
/// heads (B, T, C), dropout on the attention weights in training. With a cache, the new keys and
/// values are appended to it and the queries attend to every cached position as well.
pub fn causal_self_attention(
    qkv: &Tensor,
    n_head: usize,
    dropout: f64,
    mode: &Mode,
    cache: Option<&mut LayerCache>,
    layer: usize,
) -> Result<Tensor> {
    if cache.is_none() && fused(qkv) {
        return cpu_ops::causal_attention(qkv, n_head, mode.attention_mask(dropout, layer));
    }
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let hs = c / n_head;
    let heads =
        |i: usize| -> Result<Tensor> { qkv.narrow(D::Minus1, i * c, c)?.reshape((b, t, n_head, hs))?.transpose(1, 2)?.contiguous() };
    // Scaling q (T x hs per head) is cheaper than scaling the T x T scores, and keeps one fewer of those for backward.
    let q = (heads(0)? * (1.0 / (hs as f64).sqrt()))?;
    let (mut k, mut v) = (heads(1)?, heads(2)?);
    if let Some(cache) = cache {
        if let Some((k_past, v_past)) = cache.as_ref() {
            k = Tensor::cat(&[k_past, &k], 2)?;
            v = Tensor::cat(&[v_past, &v], 2)?;
        }
        // Detached: the cache outlives this step, and with the graph attached every cached key would keep
        // alive the whole history of its computation, on a GPU each step's bf16 copies of the weights too.
        *cache = Some((k.detach(), v.detach()));
    }
    let att = causal_attention_weights(&q, &k)?;
    let att = mode.dropout(&att, dropout, Site::Attention(layer))?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// Attention weights softmax(q kᵀ) with causal masking, for queries that are the last `q.dim(2)`
/// of the `k.dim(2)` positions (all of them in training, fewer with a KV cache), in q's dtype.
fn causal_attention_weights(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let (t_q, t_k) = (q.dim(2)?, k.dim(2)?);
    let scores = q.matmul(&k.t()?)?;
    let shape = scores.shape().clone();
    let allowed = causal_mask(t_q, t_k, q.device())?.broadcast_as(&shape)?;
    let masked = Tensor::new(f32::NEG_INFINITY, q.device())?.to_dtype(q.dtype())?.broadcast_as(&shape)?;
    // The mask and the softmax run outside the autograd graph: candle would keep a gradient the size
    // of the scores for the constant -inf operand. The backward needs no mask: masked weights are 0,
    // so the softmax backward gives their scores no gradient.
    let weights = candle_nn::ops::softmax_last_dim(&allowed.where_cond(&scores.detach(), &masked)?)?;
    scores.apply_op2(&weights, SoftmaxWithGrad)
}

/// 1 where query row i (the `t_k - t_q + i`-th position) may attend to key j, else 0; built on
/// the device so that no T x T buffer crosses from the host at every layer.
fn causal_mask(t_q: usize, t_k: usize, device: &candle_core::Device) -> Result<Tensor> {
    let offset = (t_k - t_q) as u32;
    let rows = Tensor::arange(offset, offset + t_q as u32, device)?.reshape((t_q, 1))?;
    let cols = Tensor::arange(0u32, t_k as u32, device)?.reshape((1, t_k))?;
    cols.broadcast_le(&rows)
}

/// Softmax weights `y` computed from scores `x` by candle_nn's fused kernel (one pass, f32
/// accumulation for f16/bf16), which records no backward: this op passes `y` on and gives `x` the
/// softmax's gradient dx = y ⊙ (dy − Σ dy ⊙ y), computed in f32. For backward it keeps the scores
/// and the weights in the compute dtype, where the composite softmax keeps four f32 tensors of
/// the same T x T size per layer.
struct SoftmaxWithGrad;

impl CustomOp2 for SoftmaxWithGrad {
    fn name(&self) -> &'static str {
        "softmax-with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, y: &CpuStorage, y_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(y_layout)?, y_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        y_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((y.try_clone(y_layout)?, y_layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (y, g) = (res.to_dtype(DType::F32)?, grad_res.to_dtype(DType::F32)?);
        let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let dx = (y * g.broadcast_sub(&dot)?)?.to_dtype(res.dtype())?;
        Ok((Some(dx), None))
    }
}

/// Mean cross-entropy of `logits` (rows, vocab) against `targets` (rows); rows whose target is
/// -1 do not count, as PyTorch's `ignore_index=-1`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused(logits) {
        return cpu_ops::cross_entropy(logits, targets);
    }
    let logits = &logits.to_dtype(DType::F32)?;
    let vocab = logits.dim(1)?;
    let targets = targets.to_dtype(DType::I64)?;
    let counted = targets.ge(0i64)?.to_dtype(DType::F32)?;
    let n_counted = counted.sum_all()?.to_scalar::<f32>()?;
    if n_counted == 0.0 {
        candle_core::bail!("every target is -1 (ignored): there is nothing to compute a loss on");
    }
    let safe_targets = targets.clamp(0i64, vocab as i64 - 1)?.unsqueeze(1)?;
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&safe_targets, 1)?.squeeze(1)?;
    (picked * counted)?.sum_all()?.affine(-1.0 / n_counted as f64, 0.0)
}

/// Inverted dropout: zero each element with probability `p`, scale the rest by 1/(1-p). On the CPU
/// the decisions are `mask`'s (element i of the contiguous tensor is the mask's element i), the same
/// as the training step's; on a GPU they are drawn there (by the device's generator, seeded with the
/// engine), since computing and uploading hundreds of millions of values per step from the host
/// would cost more than the step itself.
fn dropout(x: &Tensor, p: f64, mask: Mask) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let mask = if x.device().is_cpu() {
        let scales: Vec<f32> = (0..x.elem_count()).map(|i| mask.scale(i)).collect();
        Tensor::from_vec(scales, x.shape(), x.device())?
    } else {
        Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(p)?.to_dtype(DType::F32)?.affine(keep, 0.0)?
    };
    x * mask.to_dtype(x.dtype())?
}
