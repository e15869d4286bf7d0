//! The model's building-block operations. On CPU they run as the fused kernels of `cpu_ops`;
//! elsewhere as candle ops that all record a backward pass (candle_nn's own fused `layer_norm` and
//! `softmax_last_dim` record none and would cut the gradients).

use candle_core::{DType, Result, Tensor, D};
use rand::rngs::StdRng;
use rand::Rng;

use crate::cpu_ops;

/// Whether a forward pass trains (dropout active, drawing from the given generator) or evaluates.
pub enum Mode<'a> {
    Train(&'a mut StdRng),
    Eval,
}

impl Mode<'_> {
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self {
            Mode::Train(rng) if p > 0.0 => dropout(x, p, rng),
            _ => Ok(x.clone()),
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
    let y = x.reshape(((), fan_in))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_shape)
}

/// LayerNorm over the last dimension with an optional bias (nanoGPT's `bias=False` drops it).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if fused(x) {
        return cpu_ops::layer_norm(x, weight, bias, eps);
    }
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
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
    mode: &mut Mode,
    cache: Option<&mut LayerCache>,
) -> Result<Tensor> {
    if cache.is_none() && fused(qkv) {
        let attention_dropout = match mode {
            Mode::Train(rng) if dropout > 0.0 => Some(cpu_ops::AttentionDropout { p: dropout as f32, seed: rng.random() }),
            _ => None,
        };
        return cpu_ops::causal_attention(qkv, n_head, attention_dropout);
    }
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let hs = c / n_head;
    let heads =
        |i: usize| -> Result<Tensor> { qkv.narrow(D::Minus1, i * c, c)?.reshape((b, t, n_head, hs))?.transpose(1, 2)?.contiguous() };
    let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?);
    if let Some(cache) = cache {
        if let Some((k_past, v_past)) = cache.as_ref() {
            k = Tensor::cat(&[k_past, &k], 2)?;
            v = Tensor::cat(&[v_past, &v], 2)?;
        }
        *cache = Some((k.clone(), v.clone()));
    }
    let att = causal_attention_weights(&q, &k, 1.0 / (hs as f64).sqrt())?;
    let att = mode.dropout(&att, dropout)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// Attention weights softmax(q kᵀ · scale) with causal masking, for queries that are the last
/// `q.dim(2)` of the `k.dim(2)` positions (all of them in training, fewer with a KV cache).
fn causal_attention_weights(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let (t_q, t_k) = (q.dim(2)?, k.dim(2)?);
    let offset = t_k - t_q;
    let mask: Vec<f32> = (0..t_q)
        .flat_map(|i| (0..t_k).map(move |j| if j <= i + offset { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t_q, t_k), q.device())?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&scores, D::Minus1)
}

/// Mean cross-entropy of `logits` (rows, vocab) against `targets` (rows); rows whose target is
/// -1 do not count, as PyTorch's `ignore_index=-1`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused(logits) {
        return cpu_ops::cross_entropy(logits, targets);
    }
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

/// Inverted dropout: zero each element with probability `p`, scale the rest by 1/(1-p).
fn dropout(x: &Tensor, p: f64, rng: &mut StdRng) -> Result<Tensor> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}
