//! Generation on a GPU: decode.rs's design on the kernels of `kernels/cuda`, for a batch of sequences
//! that decode together. The weights are uploaded once in the precision X ([`upload_weights`]) and
//! shared by generations; a KV cache for the whole block and every buffer a pass needs are allocated
//! once per generation, so that a token allocates nothing. A pass runs the model over the new
//! positions only, against the cache, and brings each sequence's last logits back to the host, where
//! decode.rs's [`Sequences`] samples them. Past `block_size` the window is recomputed as one prefill
//! pass, as on the CPU.
//!
//! Shapes: B sequences, T new positions per pass, C = n_embd, NH heads, V vocab, L layers.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{bail, Result};

use crate::decode::Sequences;
use crate::kernels::cuda::decode::{self, Cache};
use crate::kernels::cuda::{attention, encoder, gelu, layernorm, matmul, with_fix, DeviceBuffer, Gpu, Precision};
use crate::model::{Gelu, ModelArgs};
use crate::sample::SampleArgs;
use crate::train_step::{Affine, ParamLayout};

type SharedGpu = Arc<dyn Gpu + Send + Sync>;

/// The forward pass of new positions against a KV cache on a GPU, for B sequences of equal length.
pub struct CudaDecoder {
    gpu: SharedGpu,
    args: ModelArgs,
    layout: ParamLayout,
    x: Precision,
    /// The flat parameters of `layout`, of X ([`upload_weights`]).
    weights: Arc<DeviceBuffer>,
    batch: usize,
    /// Positions already in the cache, the same for every sequence.
    cached: usize,
    /// (B, L, block, C) keys and values.
    keys: DeviceBuffer,
    values: DeviceBuffer,
    /// (B, block) token ids, i32.
    tokens: DeviceBuffer,
    /// (B, block, width) rows of the positions in a pass, of X: the residual stream, a LayerNorm's
    /// output, the query-key-value projection, the attention's output, an output projection's branch,
    /// the MLP's hidden layer before and after GELU.
    residual: DeviceBuffer,
    ln: DeviceBuffer,
    qkv: DeviceBuffer,
    atty: DeviceBuffer,
    branch: DeviceBuffer,
    fch: DeviceBuffer,
    fch_gelu: DeviceBuffer,
    /// (B, block) LayerNorm statistics, and (B, NH, block) the flash attention's log-sum-exps, f32.
    mean: DeviceBuffer,
    rstd: DeviceBuffer,
    lse: DeviceBuffer,
    /// (B, C): each sequence's last row after the final LayerNorm; (B, V): its logits.
    last: DeviceBuffer,
    logits: DeviceBuffer,
    /// The logits on the host, as f32.
    host_logits: Vec<f32>,
}

impl CudaDecoder {
    /// A decoder of `batch` sequences over `weights` (of X, from [`upload_weights`]), with its cache and
    /// buffers allocated.
    pub fn new(gpu: SharedGpu, args: &ModelArgs, x: Precision, weights: Arc<DeviceBuffer>, batch: usize) -> Result<Self> {
        let layout = ParamLayout::new(args);
        if weights.bytes != layout.len * x.size_in_bytes() {
            bail!("the model has {} parameters of {x:?} but the weights hold {} bytes", layout.len, weights.bytes);
        }
        if batch == 0 {
            bail!("nothing to generate: give at least one seed (one per sequence)");
        }
        let (block, c, xs) = (args.block_size, args.n_embd, x.size_in_bytes());
        decode::check(gpu.as_ref(), c, args.n_head, block, batch)
            .map_err(|e| with_fix(&e, "or sample on candle's graph instead: NANOGPT_CUDA_STEP=graph"))?;
        let rows = batch * block;
        let buffer = |elements: usize, size: usize| DeviceBuffer::zeroed(&gpu, elements * size);
        let cache = batch * args.n_layer * block * c;
        Ok(Self {
            keys: buffer(cache, xs)?,
            values: buffer(cache, xs)?,
            tokens: buffer(rows, 4)?,
            residual: buffer(rows * c, xs)?,
            ln: buffer(rows * c, xs)?,
            qkv: buffer(rows * 3 * c, xs)?,
            atty: buffer(rows * c, xs)?,
            branch: buffer(rows * c, xs)?,
            fch: buffer(rows * 4 * c, xs)?,
            fch_gelu: buffer(rows * 4 * c, xs)?,
            mean: buffer(rows, 4)?,
            rstd: buffer(rows, 4)?,
            lse: buffer(rows * args.n_head, 4)?,
            last: buffer(batch * c, xs)?,
            logits: buffer(batch * args.vocab_size, xs)?,
            host_logits: vec![0.0; batch * args.vocab_size],
            weights,
            gpu,
            args: args.clone(),
            layout,
            x,
            batch,
            cached: 0,
        })
    }

    /// The device address of a weight tensor, of X.
    fn weight(&self, range: &Range<usize>) -> u64 {
        self.weights.addr + (range.start * self.x.size_in_bytes()) as u64
    }

    fn affine(&self, affine: &Affine) -> (u64, Option<u64>) {
        (self.weight(&affine.weight), affine.bias.as_ref().map(|b| self.weight(b)))
    }

    /// Runs `tokens` (B x T, the next T positions of every sequence) through the model, appending their
    /// keys and values to the cache, and returns the logits of each sequence's last position (B x V).
    /// `restart` empties the cache first: the pass is then the prefill of a prompt or window.
    pub fn forward(&mut self, tokens: &[u32], t: usize, restart: bool) -> Result<&mut [f32]> {
        if restart {
            self.cached = 0;
        }
        let (block, c, nh, v) = (self.args.block_size, self.args.n_embd, self.args.n_head, self.args.vocab_size);
        let (pos0, b, n) = (self.cached, self.batch, self.batch * t);
        if t == 0 || tokens.len() != n || pos0 + t > block {
            bail!("decode: {} tokens are not {b} sequences of {t} new positions after {pos0} within the block of {block}", tokens.len());
        }
        if let Some(&bad) = tokens.iter().find(|&&tok| tok as usize >= v) {
            bail!("token id {bad} is outside the vocabulary of {v} tokens");
        }
        self.tokens.upload_i32(&tokens.iter().map(|&tok| tok as i32).collect::<Vec<_>>())?;
        let (gpu, x, layout) = (&*self.gpu, self.x, &self.layout);
        let cache = Cache { keys: self.keys.addr, values: self.values.addr, n_layer: self.args.n_layer, block, c };
        let (residual, ln, mean, rstd) = (self.residual.addr, self.ln.addr, self.mean.addr, self.rstd.addr);
        let tanh = self.args.gelu == Gelu::Tanh;
        // A prefill attends among its own positions only: the training step's flash attention does that at a
        // fraction of the cost of one block per query, which matters past block_size, where every token is one.
        // The engine's kernels, never cuDNN's: cuDNN builds a plan for each shape, and prompts come in every length.
        let prefill_by_flash_attention = pos0 == 0 && t > 1 && attention::HEAD_SIZES.contains(&(c / nh));
        let flash = attention::WithAttention { gpu, kernels: attention::AttentionKernels::Engine, warp_rows: gpu.attention_warp_rows() };

        // The new positions' rows of the position embedding start at pos0.
        let wpe = self.weight(&layout.wpe) + (pos0 * c * x.size_in_bytes()) as u64;
        encoder::forward(gpu, x, residual, self.tokens.addr, self.weight(&layout.wte), wpe, b, t, c, None)?;
        let (w, bias) = self.affine(&layout.layers[0].ln_1);
        layernorm::forward(gpu, x, ln, mean, rstd, residual, w, bias, n, c)?;
        for (l, lp) in layout.layers.iter().enumerate() {
            let (w, bias) = self.affine(&lp.c_attn);
            matmul::forward(gpu, x, self.qkv.addr, ln, w, bias, n, c, 3 * c)?;
            decode::append(gpu, x, &cache, l, self.qkv.addr, n, t, pos0)?;
            if prefill_by_flash_attention {
                attention::forward(&flash, x, self.atty.addr, self.lse.addr, self.qkv.addr, b, t, c, nh, None)?;
            } else {
                decode::attend(gpu, x, self.atty.addr, self.qkv.addr, &cache, l, b, t, pos0, nh)?;
            }
            let (w, bias) = self.affine(&lp.attn_proj);
            matmul::forward(gpu, x, self.branch.addr, self.atty.addr, w, bias, n, c, c)?;
            let (w, bias) = self.affine(&lp.ln_2);
            layernorm::residual_forward(gpu, x, residual, ln, mean, rstd, residual, self.branch.addr, w, bias, n, c, None)?;
            let (w, bias) = self.affine(&lp.c_fc);
            matmul::forward(gpu, x, self.fch.addr, ln, w, bias, n, c, 4 * c)?;
            gelu::forward(gpu, x, self.fch_gelu.addr, self.fch.addr, n * 4 * c, tanh)?;
            let (w, bias) = self.affine(&lp.mlp_proj);
            matmul::forward(gpu, x, self.branch.addr, self.fch_gelu.addr, w, bias, n, 4 * c, c)?;
            // The residual add, normalised for the next layer or, after the last, by the final LayerNorm.
            let next = layout.layers.get(l + 1).map_or(&layout.ln_f, |next| &next.ln_1);
            let (w, bias) = self.affine(next);
            layernorm::residual_forward(gpu, x, residual, ln, mean, rstd, residual, self.branch.addr, w, bias, n, c, None)?;
        }
        decode::last_rows(gpu, x, self.last.addr, ln, b, t, c)?;
        // The output layer is the token embedding (weight tying).
        matmul::forward(gpu, x, self.logits.addr, self.last.addr, self.weight(&layout.wte), None, b, c, v)?;
        self.cached += t;
        match x {
            Precision::F32 => self.host_logits = self.logits.download_f32()?,
            Precision::Bf16 => {
                let bytes = self.logits.download_bytes()?;
                for (value, pair) in self.host_logits.iter_mut().zip(bytes.chunks_exact(2)) {
                    *value = half::bf16::from_le_bytes([pair[0], pair[1]]).to_f32();
                }
            }
        }
        Ok(&mut self.host_logits)
    }
}

/// `params` (a flat f32 buffer laid out by [`ParamLayout`]) on `gpu` as X, for [`CudaDecoder`]s to share.
pub fn upload_weights(gpu: &SharedGpu, x: Precision, params: &[f32]) -> Result<Arc<DeviceBuffer>> {
    use rayon::prelude::*;
    let weights = DeviceBuffer::zeroed(gpu, params.len() * x.size_in_bytes())?;
    match x {
        Precision::F32 => weights.upload_f32(params)?,
        Precision::Bf16 => {
            // Rounded on every core: GPT-2 XL has 1.6 billion values.
            let mut bytes = vec![0u8; params.len() * 2];
            bytes
                .par_chunks_mut(2)
                .zip(params.par_iter())
                .for_each(|(out, &v)| out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()));
            weights.upload_bytes(&bytes)?;
        }
    }
    Ok(Arc::new(weights))
}

/// [`Sequences`] decoded on a GPU.
pub struct CudaGeneration {
    decoder: CudaDecoder,
    sequences: Sequences,
}

impl CudaGeneration {
    /// Sequences (one per seed) from `prompt`, to be decoded on `gpu` in precision `x` over `weights`
    /// ([`upload_weights`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: SharedGpu,
        args: &ModelArgs,
        x: Precision,
        weights: Arc<DeviceBuffer>,
        prompt: &[u32],
        seeds: &[u64],
        sample: &SampleArgs,
    ) -> Result<Self> {
        let sequences = Sequences::new(args, prompt, seeds, sample)?;
        Ok(Self { decoder: CudaDecoder::new(gpu, args, x, weights, seeds.len())?, sequences })
    }

    /// Samples the next token of every sequence and returns them.
    pub fn next_tokens(&mut self) -> Result<&[u32]> {
        let v = self.decoder.args.vocab_size;
        let (feed, t, restart) = self.sequences.feed(self.decoder.args.block_size, self.decoder.cached);
        let logits = self.decoder.forward(feed, t, restart)?;
        Ok(self.sequences.sample(logits, v))
    }

    pub fn into_sequences(self) -> Vec<Vec<u32>> {
        self.sequences.into_sequences()
    }
}

/// One sequence per seed, each the prompt followed by `sample.max_new_tokens` more tokens, decoded
/// together on `gpu` in precision `x` from the flat f32 `params`: the sequences [`crate::decode::generate`]
/// gives on the CPU for the same seeds, up to the rounding of the GPU's arithmetic.
pub fn generate(
    gpu: SharedGpu,
    args: &ModelArgs,
    x: Precision,
    params: &[f32],
    prompt: &[u32],
    seeds: &[u64],
    sample: &SampleArgs,
) -> Result<Vec<Vec<u32>>> {
    let weights = upload_weights(&gpu, x, params)?;
    let mut generation = CudaGeneration::new(gpu, args, x, weights, prompt, seeds, sample)?;
    for _ in 0..sample.max_new_tokens {
        generation.next_tokens()?;
    }
    Ok(generation.into_sequences())
}
