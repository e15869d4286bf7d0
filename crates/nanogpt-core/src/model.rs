//! The GPT-2 style language model, as nanoGPT's model.py: pre-LayerNorm blocks of causal
//! self-attention and a 4x MLP, learned position embeddings, and an output layer tied to the
//! token embedding. One struct per layer, each with a `forward`.

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::kernels::dropout::Site;
pub use crate::ops::Mode;
use crate::ops::{self, LayerCache};

/// The activation of the MLP. nanoGPT uses PyTorch's exact `nn.GELU()`; OpenAI's GPT-2 weights
/// were trained with the tanh approximation, so loading them needs `Tanh` to reproduce their outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum Gelu {
    #[default]
    Erf,
    Tanh,
}

/// The architecture, recorded in checkpoints as `model_args` (nanoGPT's GPTConfig).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct ModelArgs {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    pub bias: bool,
    pub dropout: f64,
    /// 'erf' (nanoGPT's nn.GELU) unless a checkpoint says otherwise; GPT-2 weights use 'tanh'.
    #[serde(default)]
    #[ts(optional, as = "Option<Gelu>")]
    pub gelu: Gelu,
}

impl ModelArgs {
    pub fn validate(&self) -> Result<()> {
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 || self.block_size == 0 || self.vocab_size == 0 {
            candle_core::bail!("n_layer, n_head, n_embd, block_size and vocab_size must all be positive");
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            candle_core::bail!(
                "n_embd ({}) must be divisible by n_head ({}); pick n_head among the divisors of n_embd",
                self.n_embd,
                self.n_head
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            candle_core::bail!("dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }
}

/// Draws nanoGPT's initial values from one seeded stream, so that a seed fixes the model on every engine.
/// Without a stream the weights are zeros: the model is about to be loaded, and drawing 1.5 billion
/// normals for GPT-2 XL only to overwrite them would take seconds.
struct Init {
    rng: Option<StdRng>,
    device: Device,
}

impl Init {
    fn normal(&mut self, shape: &[usize], std: f64) -> Result<Var> {
        let Some(rng) = self.rng.as_mut() else { return Var::zeros(shape, DType::F32, &self.device) };
        let normal = Normal::new(0f32, std as f32).expect("a positive standard deviation");
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| normal.sample(rng)).collect();
        Var::from_vec(values, shape, &self.device)
    }

    fn constant(&self, shape: &[usize], value: f32) -> Result<Var> {
        Var::from_tensor(&Tensor::full(value, shape, &self.device)?)
    }
}

pub struct Linear {
    /// PyTorch layout: (out_features, in_features).
    pub weight: Var,
    pub bias: Option<Var>,
}

impl Linear {
    fn new(init: &mut Init, fan_in: usize, fan_out: usize, bias: bool, std: f64) -> Result<Self> {
        Ok(Self { weight: init.normal(&[fan_out, fan_in], std)?, bias: if bias { Some(init.constant(&[fan_out], 0.0)?) } else { None } })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, self.weight.as_tensor(), self.bias.as_ref().map(Var::as_tensor))
    }
}

pub struct LayerNorm {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl LayerNorm {
    fn new(init: &Init, n: usize, bias: bool) -> Result<Self> {
        Ok(Self { weight: init.constant(&[n], 1.0)?, bias: if bias { Some(init.constant(&[n], 0.0)?) } else { None } })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, self.weight.as_tensor(), self.bias.as_ref().map(Var::as_tensor), 1e-5)
    }
}

/// Keys and values of the positions seen so far, per layer, so that generating one more token
/// costs one position's work instead of the whole context's.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self { layers: vec![None; n_layer] }
    }

    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct CausalSelfAttention {
    pub c_attn: Linear,
    pub c_proj: Linear,
    n_head: usize,
    dropout: f64,
    /// The block's index, which names its dropout sites.
    layer: usize,
}

impl CausalSelfAttention {
    pub fn forward(&self, x: &Tensor, mode: &Mode, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let qkv = self.c_attn.forward(x)?;
        let y = ops::causal_self_attention(&qkv, self.n_head, self.dropout, mode, cache, self.layer)?;
        mode.dropout(&self.c_proj.forward(&y)?, self.dropout, Site::AttentionResidual(self.layer))
    }
}

pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    gelu: Gelu,
    dropout: f64,
    layer: usize,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        let h = ops::gelu(&h, self.gelu == Gelu::Tanh)?;
        mode.dropout(&self.c_proj.forward(&h)?, self.dropout, Site::MlpResidual(self.layer))
    }
}

pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: CausalSelfAttention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn forward(&self, x: &Tensor, mode: &Mode, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, mode, cache)?)?;
        &x + self.mlp.forward(&self.ln_2.forward(&x)?, mode)?
    }
}

pub struct Gpt {
    pub args: ModelArgs,
    /// Token embedding, also the output layer (weight tying).
    pub wte: Var,
    pub wpe: Var,
    pub h: Vec<Block>,
    pub ln_f: LayerNorm,
    device: Device,
    /// The dtype activations are computed in; the parameters themselves always stay f32.
    compute_dtype: DType,
}

impl Gpt {
    /// A new model with nanoGPT's initialisation: N(0, 0.02) everywhere, the two residual
    /// projections of each block N(0, 0.02/sqrt(2 n_layer)), zero biases, LayerNorm (1, 0).
    pub fn new(args: &ModelArgs, seed: u64, device: &Device) -> Result<Self> {
        Self::build(args, Some(StdRng::seed_from_u64(seed)), device)
    }

    /// A model with zero weights, to be filled by [`Gpt::load`].
    pub fn empty(args: &ModelArgs, device: &Device) -> Result<Self> {
        Self::build(args, None, device)
    }

    fn build(args: &ModelArgs, rng: Option<StdRng>, device: &Device) -> Result<Self> {
        args.validate()?;
        let mut init = Init { rng, device: device.clone() };
        let (c, bias) = (args.n_embd, args.bias);
        let proj_std = 0.02 / (2.0 * args.n_layer as f64).sqrt();
        let wte = init.normal(&[args.vocab_size, c], 0.02)?;
        let wpe = init.normal(&[args.block_size, c], 0.02)?;
        let mut h = Vec::with_capacity(args.n_layer);
        for layer in 0..args.n_layer {
            h.push(Block {
                ln_1: LayerNorm::new(&init, c, bias)?,
                attn: CausalSelfAttention {
                    c_attn: Linear::new(&mut init, c, 3 * c, bias, 0.02)?,
                    c_proj: Linear::new(&mut init, c, c, bias, proj_std)?,
                    n_head: args.n_head,
                    dropout: args.dropout,
                    layer,
                },
                ln_2: LayerNorm::new(&init, c, bias)?,
                mlp: Mlp {
                    c_fc: Linear::new(&mut init, c, 4 * c, bias, 0.02)?,
                    c_proj: Linear::new(&mut init, 4 * c, c, bias, proj_std)?,
                    gelu: args.gelu,
                    dropout: args.dropout,
                    layer,
                },
            });
        }
        let ln_f = LayerNorm::new(&init, c, bias)?;
        Ok(Self { args: args.clone(), wte, wpe, h, ln_f, device: device.clone(), compute_dtype: DType::F32 })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Mixed precision: forward and backward run in `dtype` (f32, bf16 or f16) from the embedding
    /// sum on; the f32 weights are cast where they are used and receive f32 gradients.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// nanoGPT's `crop_block_size`: shrinks the context to `block_size` by keeping the first rows of the
    /// position embedding, e.g. to finetune GPT-2 (1024 positions) on shorter blocks.
    pub fn crop_block_size(&mut self, block_size: usize) -> Result<()> {
        if block_size == 0 || block_size > self.args.block_size {
            candle_core::bail!("cannot crop the block size to {block_size}: it must be between 1 and the model's {}", self.args.block_size);
        }
        self.wpe = Var::from_tensor(&self.wpe.as_tensor().narrow(0, 0, block_size)?.contiguous()?)?;
        self.args.block_size = block_size;
        Ok(())
    }

    /// Every parameter once, named as in nanoGPT's state dict (the tied `lm_head.weight` is `transformer.wte.weight`).
    pub fn named_parameters(&self) -> Vec<(String, &Var)> {
        let mut params = vec![("transformer.wte.weight".to_string(), &self.wte), ("transformer.wpe.weight".to_string(), &self.wpe)];
        let mut layers: Vec<(String, &Var, Option<&Var>)> = Vec::new();
        for (i, block) in self.h.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            layers.push((format!("{p}.ln_1"), &block.ln_1.weight, block.ln_1.bias.as_ref()));
            layers.push((format!("{p}.attn.c_attn"), &block.attn.c_attn.weight, block.attn.c_attn.bias.as_ref()));
            layers.push((format!("{p}.attn.c_proj"), &block.attn.c_proj.weight, block.attn.c_proj.bias.as_ref()));
            layers.push((format!("{p}.ln_2"), &block.ln_2.weight, block.ln_2.bias.as_ref()));
            layers.push((format!("{p}.mlp.c_fc"), &block.mlp.c_fc.weight, block.mlp.c_fc.bias.as_ref()));
            layers.push((format!("{p}.mlp.c_proj"), &block.mlp.c_proj.weight, block.mlp.c_proj.bias.as_ref()));
        }
        layers.push(("transformer.ln_f".to_string(), &self.ln_f.weight, self.ln_f.bias.as_ref()));
        for (layer, weight, bias) in layers {
            params.push((format!("{layer}.weight"), weight));
            if let Some(bias) = bias {
                params.push((format!("{layer}.bias"), bias));
            }
        }
        params
    }

    /// nanoGPT's count: every parameter once; the position embedding is left out of the
    /// non-embedding count, the token embedding is not (it is also the output layer).
    pub fn num_params(&self, non_embedding: bool) -> usize {
        let total: usize = self.named_parameters().iter().map(|(_, v)| v.elem_count()).sum();
        if non_embedding {
            total - self.wpe.elem_count()
        } else {
            total
        }
    }

    /// Hidden states after the final LayerNorm for token ids `idx` (batch, time), whose first
    /// position sits at `pos0` (non-zero only when continuing from a KV cache).
    fn hidden(&self, idx: &Tensor, pos0: usize, mode: &Mode, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        if pos0 + t > self.args.block_size {
            candle_core::bail!("cannot forward a sequence of length {}: block size is only {}", pos0 + t, self.args.block_size);
        }
        let tok = self.wte.as_tensor().index_select(&idx.flatten_all()?, 0)?.reshape((b, t, self.args.n_embd))?;
        let pos = self.wpe.as_tensor().narrow(0, pos0, t)?;
        let mut x = mode.dropout(&tok.broadcast_add(&pos)?.to_dtype(self.compute_dtype)?, self.args.dropout, Site::Embedding)?;
        for (i, block) in self.h.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, mode, layer_cache)?;
        }
        self.ln_f.forward(&x)
    }

    fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, self.wte.as_tensor(), None)
    }

    /// Mean cross-entropy of the next-token predictions against `targets` (-1 = ignored).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, mode: &Mode) -> Result<Tensor> {
        let x = self.hidden(idx, 0, mode, None)?;
        let logits = self.lm_head(&x)?;
        ops::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
    }

    /// Logits at every position, in evaluation mode: (batch, time, vocab), f32.
    pub fn logits(&self, idx: &Tensor) -> Result<Tensor> {
        self.lm_head(&self.hidden(idx, 0, &Mode::Eval, None)?)?.to_dtype(DType::F32)
    }

    /// Logits of the last position only (batch, vocab), as nanoGPT's inference path; with a cache,
    /// `idx` holds only the tokens the cache has not seen yet.
    pub fn next_token_logits(&self, idx: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let pos0 = cache.as_ref().map_or(0, |c| c.len());
        let x = self.hidden(idx, pos0, &Mode::Eval, cache)?;
        let t = x.dim(1)?;
        self.lm_head(&x.i((.., t - 1, ..))?.contiguous()?)?.to_dtype(DType::F32)
    }

    /// Replaces every parameter from `tensors` (by nanoGPT name), checking names and shapes.
    pub fn load(&self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.named_parameters() {
            let Some(t) = tensors.get(&name) else {
                candle_core::bail!("the weights have no tensor `{name}`: they do not belong to this model_args")
            };
            if t.dims() != var.dims() {
                candle_core::bail!("tensor `{name}` has shape {:?}, the model expects {:?}", t.dims(), var.dims());
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kv_cache_holds_no_computation_graph() -> Result<()> {
        let args =
            ModelArgs { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 11, bias: true, dropout: 0.0, gelu: Gelu::Erf };
        let model = Gpt::new(&args, 3, &Device::Cpu)?;
        let mut cache = KvCache::new(args.n_layer);
        for tokens in [&[1u32, 2, 3][..], &[4], &[5]] {
            model.next_token_logits(&Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?, Some(&mut cache))?;
        }
        assert_eq!(cache.len(), 5);
        for (k, v) in cache.layers.iter().flatten() {
            assert!(!k.track_op() && !v.track_op(), "cached keys and values keep the graph that made them");
        }
        Ok(())
    }
}
