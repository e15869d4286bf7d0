//! The training step on a GPU, llm.c style, layer by layer as `train_step.rs` does it on the CPU:
//! the same flat parameter layout ([`ParamLayout`]), with f32 master weights, gradients and AdamW
//! moments, and the activations of a (B, T) batch allocated once. The kernels are those of
//! `kernels/cuda` and the matrix products cuBLAS's, launched on a [`Gpu`]: a CUDA device, or the
//! emulator that the tests run it on.
//!
//! Activations and the weights the kernels read are of the [`Precision`] X. In f32 those weights are
//! the master weights themselves; in bf16 they are a copy that AdamW rewrites as it updates.
//! Parameter gradients are only ever added to: [`CudaTrainStep::zero_grads`] clears them before the
//! first micro-step of an optimizer step. Nothing here waits for the GPU except reading results back.
//!
//! Residual adds are fused into the LayerNorm that follows them: each block's output projection
//! writes its branch, and one kernel adds it (after dropout) to the residual stream and normalises
//! the sum for the next block, or for the final LayerNorm after the last layer.
//!
//! Shapes: B batch rows, T positions, C = n_embd channels, NH heads, V vocab, L layers.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{bail, Result};

use crate::kernels::adamw::AdamWUpdate;
use crate::kernels::cuda::adamw::{self, Clip, DeviceTensorTable, FlatBuffers, TensorTable, GRAD_NORM_PARTIALS};
use crate::kernels::cuda::{attention, bias, check_model, classifier, encoder, gelu, layernorm, matmul, DeviceBuffer, Gpu, Precision};
use crate::kernels::dropout::{DropoutKey, Mask, Site};
use crate::model::{Gelu, ModelArgs};
use crate::optim::OptimizerArgs;
use crate::train_step::{Affine, ParamLayout};

type SharedGpu = Arc<dyn Gpu + Send + Sync>;

/// The activations of one layer that the backward pass reads, each (B, T, width) of X unless noted.
struct LayerActivations {
    /// The first LayerNorm's output and row statistics (f32); for layers after the first, written by
    /// the previous layer's fused residual add.
    ln_1: DeviceBuffer,
    ln_1_mean: DeviceBuffer,
    ln_1_rstd: DeviceBuffer,
    qkv: DeviceBuffer,
    /// The attention's merged heads, and the log-sum-exp of each score row (B, NH, T, f32).
    atty: DeviceBuffer,
    lse: DeviceBuffer,
    /// The residual stream after the attention block, and the second LayerNorm of it.
    residual_2: DeviceBuffer,
    ln_2: DeviceBuffer,
    ln_2_mean: DeviceBuffer,
    ln_2_rstd: DeviceBuffer,
    /// The MLP's hidden layer before GELU.
    fch: DeviceBuffer,
    /// The residual stream after the MLP block: the next layer's input.
    residual_3: DeviceBuffer,
}

/// Everything a (B, T) step writes besides parameters and their gradients.
struct Activations {
    b: usize,
    t: usize,
    tokens: DeviceBuffer,
    targets: DeviceBuffer,
    encoded: DeviceBuffer,
    layers: Vec<LayerActivations>,
    ln_f: DeviceBuffer,
    ln_f_mean: DeviceBuffer,
    ln_f_rstd: DeviceBuffer,
    /// (B, T, V): the logits, overwritten by their gradient in training.
    logits: DeviceBuffer,
    /// Each row's loss (f32), and their sum.
    losses: DeviceBuffer,
    loss_sum: DeviceBuffer,
    /// (B, T, C): an output projection's branch in the forward pass, before the residual add.
    branch: DeviceBuffer,
    /// (B, T, 4C): one layer's GELU output, shared by all layers: the backward pass recomputes it from
    /// the layer's `fch`, in the GELU backward's pass, rather than keep a copy per layer (at GPT-2 124M,
    /// B=12, T=1024 in bf16, 830 MB fewer).
    fch_gelu: DeviceBuffer,
    /// The gradient of the residual stream, carried down through the layers.
    dresidual: DeviceBuffer,
    /// (B, T, C): a LayerNorm output's gradient, or a projection's gradient after dropout.
    scratch: DeviceBuffer,
    datty: DeviceBuffer,
    dqkv: DeviceBuffer,
    dfch: DeviceBuffer,
    /// f32 partial sums of the LayerNorm backward and of the linear layers' bias gradients (none without
    /// biases), and the attention backward's row dot products.
    layernorm_scratch: DeviceBuffer,
    bias_scratch: DeviceBuffer,
    attention_delta: DeviceBuffer,
}

impl Activations {
    fn new(gpu: &SharedGpu, args: &ModelArgs, x: Precision, b: usize, t: usize) -> Result<Self> {
        let (n, c, nh) = (b * t, args.n_embd, args.n_head);
        let xs = |elements: usize| DeviceBuffer::zeroed(gpu, elements * x.size_in_bytes());
        let f32s = |elements: usize| DeviceBuffer::zeroed(gpu, elements * 4);
        let layers = (0..args.n_layer)
            .map(|_| {
                Ok(LayerActivations {
                    ln_1: xs(n * c)?,
                    ln_1_mean: f32s(n)?,
                    ln_1_rstd: f32s(n)?,
                    qkv: xs(n * 3 * c)?,
                    atty: xs(n * c)?,
                    lse: f32s(b * nh * t)?,
                    residual_2: xs(n * c)?,
                    ln_2: xs(n * c)?,
                    ln_2_mean: f32s(n)?,
                    ln_2_rstd: f32s(n)?,
                    fch: xs(n * 4 * c)?,
                    residual_3: xs(n * c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            b,
            t,
            tokens: DeviceBuffer::zeroed(gpu, n * 4)?,
            targets: DeviceBuffer::zeroed(gpu, n * 4)?,
            encoded: xs(n * c)?,
            layers,
            ln_f: xs(n * c)?,
            ln_f_mean: f32s(n)?,
            ln_f_rstd: f32s(n)?,
            logits: xs(n * args.vocab_size)?,
            losses: f32s(n)?,
            loss_sum: f32s(1)?,
            branch: xs(n * c)?,
            fch_gelu: xs(n * 4 * c)?,
            dresidual: xs(n * c)?,
            scratch: xs(n * c)?,
            datty: xs(n * c)?,
            dqkv: xs(n * 3 * c)?,
            dfch: xs(n * 4 * c)?,
            layernorm_scratch: f32s(layernorm::backward_scratch_len(n, c))?,
            bias_scratch: f32s(if args.bias { bias::backward_scratch_len(n, 4 * c) } else { 0 })?,
            attention_delta: f32s(b * nh * t)?,
        })
    }
}

/// A model's parameters, gradients and optimizer state on a GPU, and the activations of its last batch shape.
pub struct CudaTrainStep {
    gpu: SharedGpu,
    args: ModelArgs,
    layout: ParamLayout,
    x: Precision,
    /// f32 master weights, their gradients and AdamW's two moments: one flat buffer each, the moments
    /// for the `shard` of the weights that this step updates (all of them, or a ZeRO-1 rank's), allocated
    /// by the first optimizer step or resume, so that sampling and evaluation never hold them.
    params: DeviceBuffer,
    grads: DeviceBuffer,
    exp_avg: DeviceBuffer,
    exp_avg_sq: DeviceBuffer,
    shard: Range<usize>,
    /// The bf16 copy of the weights that the kernels read; None in f32, where they read `params`.
    weights_copy: Option<DeviceBuffer>,
    /// Which tensor each parameter belongs to and whether it decays (AdamW's groups), on the device,
    /// and the two buffers that hold it.
    tensor_table: DeviceTensorTable,
    _tensor_table_memory: [DeviceBuffer; 2],
    /// The squared global gradient norm of the last optimizer step, and its partial sums.
    grad_norm_squared: DeviceBuffer,
    grad_norm_partials: DeviceBuffer,
    optimizer_steps: u64,
    acts: Option<Activations>,
    /// How many targets of the last loss counted (were not -1).
    counted: usize,
}

/// The dropout mask of `site` when training with dropout.
fn mask(dropout: Option<(DropoutKey, f32)>, site: Site) -> Option<Mask> {
    dropout.map(|(key, p)| Mask::new(key, site, p))
}

impl CudaTrainStep {
    /// Uploads `params` (the flat f32 buffer of [`ParamLayout::new`]`(args)`) to `gpu`, with zeroed
    /// gradients and AdamW moments.
    pub fn new(gpu: SharedGpu, args: &ModelArgs, x: Precision, params: &[f32]) -> Result<Self> {
        check_model(&*gpu, args, x)?;
        let layout = ParamLayout::new(args);
        if params.len() != layout.len {
            bail!("the model has {} parameters but {} values were given", layout.len, params.len());
        }
        let bytes = layout.len * 4;
        let master = DeviceBuffer::zeroed(&gpu, bytes)?;
        let weights_copy = match x {
            Precision::F32 => None,
            Precision::Bf16 => Some(DeviceBuffer::zeroed(&gpu, layout.len * 2)?),
        };
        let table = TensorTable::new(&layout);
        let tensor_ends = DeviceBuffer::zeroed(&gpu, table.ends.len() * 8)?;
        gpu.upload(tensor_ends.addr, &table.ends.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>())?;
        let tensor_decays = DeviceBuffer::zeroed(&gpu, table.decays.len())?;
        gpu.upload(tensor_decays.addr, &table.decays)?;
        let step = Self {
            tensor_table: table.on_device(tensor_ends.addr, tensor_decays.addr),
            _tensor_table_memory: [tensor_ends, tensor_decays],
            grad_norm_squared: DeviceBuffer::zeroed(&gpu, 4)?,
            grad_norm_partials: DeviceBuffer::zeroed(&gpu, GRAD_NORM_PARTIALS * 4)?,
            optimizer_steps: 0,
            grads: DeviceBuffer::zeroed(&gpu, bytes)?,
            exp_avg: DeviceBuffer::zeroed(&gpu, 0)?,
            exp_avg_sq: DeviceBuffer::zeroed(&gpu, 0)?,
            shard: 0..layout.len,
            params: master,
            weights_copy,
            gpu,
            args: args.clone(),
            layout,
            x,
            acts: None,
            counted: 0,
        };
        step.load_params(params)?;
        Ok(step)
    }

    /// Replaces the weights (and their bf16 copy) by `params`, laid out as [`Self::layout`].
    pub fn load_params(&self, params: &[f32]) -> Result<()> {
        if params.len() != self.layout.len {
            bail!("the model has {} parameters but {} values were given", self.layout.len, params.len());
        }
        self.params.upload_f32(params)?;
        if let Some(copy) = &self.weights_copy {
            let rounded: Vec<u8> = params.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
            self.gpu.upload(copy.addr, &rounded)?;
        }
        Ok(())
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    pub fn precision(&self) -> Precision {
        self.x
    }

    /// The device address of a weight tensor as the kernels read it (of X).
    fn weight(&self, range: &Range<usize>) -> u64 {
        match &self.weights_copy {
            Some(copy) => copy.addr + (range.start * 2) as u64,
            None => self.params.addr + (range.start * 4) as u64,
        }
    }

    fn affine(&self, affine: &Affine) -> (u64, Option<u64>) {
        (self.weight(&affine.weight), affine.bias.as_ref().map(|b| self.weight(b)))
    }

    /// The device address of a tensor's gradient (f32).
    fn grad(&self, range: &Range<usize>) -> u64 {
        self.grads.addr + (range.start * 4) as u64
    }

    fn affine_grads(&self, affine: &Affine) -> (u64, Option<u64>) {
        (self.grad(&affine.weight), affine.bias.as_ref().map(|b| self.grad(b)))
    }

    /// Keeps AdamW's moments for `shard` of the weights only, and updates only those (ZeRO stage 1: each
    /// rank of a data-parallel run updates its own shard, and the ranks exchange the results); set before
    /// the first optimizer step.
    pub fn shard_optimizer(&mut self, shard: Range<usize>) -> Result<()> {
        if self.optimizer_steps > 0 {
            bail!("shard the optimizer before its first step");
        }
        if shard.start > shard.end || shard.end > self.layout.len {
            bail!("the shard {shard:?} is not within the model's {} parameters", self.layout.len);
        }
        self.shard = shard;
        Ok(())
    }

    /// Allocates AdamW's moments for the shard (zero), unless they are.
    fn allocate_moments(&mut self) -> Result<()> {
        let bytes = self.shard.len() * 4;
        if self.exp_avg.bytes != bytes {
            self.exp_avg = DeviceBuffer::zeroed(&self.gpu, bytes)?;
            self.exp_avg_sq = DeviceBuffer::zeroed(&self.gpu, bytes)?;
        }
        Ok(())
    }

    /// The weights whose AdamW moments this step keeps and updates.
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }

    /// Clears the parameter gradients, before the first micro-step of an optimizer step.
    pub fn zero_grads(&self) -> Result<()> {
        self.gpu.zero(self.grads.addr, self.grads.bytes)
    }

    /// The activations for a (b, t) batch, reallocated when the shape changes.
    fn ensure_activations(&mut self, b: usize, t: usize) -> Result<()> {
        if self.acts.as_ref().map(|a| (a.b, a.t)) != Some((b, t)) {
            self.acts = None;
            self.acts = Some(Activations::new(&self.gpu, &self.args, self.x, b, t)?);
        }
        Ok(())
    }

    /// The forward pass of `tokens` (B x T) to the logits. `dropout` is the key and probability of
    /// a training pass with dropout; None evaluates.
    pub fn forward(&mut self, tokens: &[u32], b: usize, t: usize, dropout: Option<(DropoutKey, f32)>) -> Result<()> {
        if tokens.len() != b * t || t > self.args.block_size {
            bail!("a batch of {} tokens is not {b} rows of {t} positions within block_size {}", tokens.len(), self.args.block_size);
        }
        if let Some(&bad) = tokens.iter().find(|&&tok| tok as usize >= self.args.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {} tokens: the data does not match the model", self.args.vocab_size);
        }
        self.ensure_activations(b, t)?;
        let acts = self.acts.as_ref().expect("allocated above");
        let ids: Vec<u8> = tokens.iter().flat_map(|&tok| (tok as i32).to_le_bytes()).collect();
        self.gpu.upload(acts.tokens.addr, &ids)?;

        let (gpu, x, layout) = (&*self.gpu, self.x, &self.layout);
        let (n, c, nh, v) = (b * t, self.args.n_embd, self.args.n_head, self.args.vocab_size);
        let tanh = self.args.gelu == Gelu::Tanh;
        encoder::forward(
            gpu,
            x,
            acts.encoded.addr,
            acts.tokens.addr,
            self.weight(&layout.wte),
            self.weight(&layout.wpe),
            b,
            t,
            c,
            mask(dropout, Site::Embedding),
        )?;
        let first = &acts.layers[0];
        let (w, bias) = self.affine(&layout.layers[0].ln_1);
        layernorm::forward(gpu, x, first.ln_1.addr, first.ln_1_mean.addr, first.ln_1_rstd.addr, acts.encoded.addr, w, bias, n, c)?;
        for (l, lp) in layout.layers.iter().enumerate() {
            let a = &acts.layers[l];
            let residual = if l == 0 { &acts.encoded } else { &acts.layers[l - 1].residual_3 };
            let (w, bias) = self.affine(&lp.c_attn);
            matmul::forward(gpu, x, a.qkv.addr, a.ln_1.addr, w, bias, n, c, 3 * c)?;
            attention::forward(gpu, x, a.atty.addr, a.lse.addr, a.qkv.addr, b, t, c, nh, mask(dropout, Site::Attention(l)))?;
            let (w, bias) = self.affine(&lp.attn_proj);
            matmul::forward(gpu, x, acts.branch.addr, a.atty.addr, w, bias, n, c, c)?;
            let (w, bias) = self.affine(&lp.ln_2);
            layernorm::residual_forward(
                gpu,
                x,
                a.residual_2.addr,
                a.ln_2.addr,
                a.ln_2_mean.addr,
                a.ln_2_rstd.addr,
                residual.addr,
                acts.branch.addr,
                w,
                bias,
                n,
                c,
                mask(dropout, Site::AttentionResidual(l)),
            )?;
            let (w, bias) = self.affine(&lp.c_fc);
            matmul::forward(gpu, x, a.fch.addr, a.ln_2.addr, w, bias, n, c, 4 * c)?;
            gelu::forward(gpu, x, acts.fch_gelu.addr, a.fch.addr, n * 4 * c, tanh)?;
            let (w, bias) = self.affine(&lp.mlp_proj);
            matmul::forward(gpu, x, acts.branch.addr, acts.fch_gelu.addr, w, bias, n, 4 * c, c)?;
            // The residual add, normalised for the next layer or, after the last, by the final LayerNorm.
            let (next_ln, (mean, rstd), (w, bias)) = match acts.layers.get(l + 1) {
                Some(next) => (&next.ln_1, (&next.ln_1_mean, &next.ln_1_rstd), self.affine(&layout.layers[l + 1].ln_1)),
                None => (&acts.ln_f, (&acts.ln_f_mean, &acts.ln_f_rstd), self.affine(&layout.ln_f)),
            };
            layernorm::residual_forward(
                gpu,
                x,
                a.residual_3.addr,
                next_ln.addr,
                mean.addr,
                rstd.addr,
                a.residual_2.addr,
                acts.branch.addr,
                w,
                bias,
                n,
                c,
                mask(dropout, Site::MlpResidual(l)),
            )?;
        }
        // The output layer is the token embedding (weight tying).
        matmul::forward(gpu, x, acts.logits.addr, acts.ln_f.addr, self.weight(&layout.wte), None, n, c, v)
    }

    /// The cross-entropy of the last forward pass's logits against `targets` (-1 = ignored), summed on
    /// the device; with `grad_scale`, the logits become the gradient of `grad_scale` times the mean
    /// loss. Read the loss with [`Self::read_loss`].
    pub fn loss(&mut self, targets: &[i32], grad_scale: Option<f64>) -> Result<()> {
        let acts = self.acts.as_ref().ok_or_else(|| candle_core::Error::Msg("loss before any forward pass".into()))?;
        let n = acts.b * acts.t;
        if targets.len() != n {
            bail!("{} targets for a batch of {n} positions", targets.len());
        }
        self.counted = targets.iter().filter(|&&t| t >= 0).count();
        if self.counted == 0 {
            bail!("every target is -1 (ignored): there is nothing to compute a loss on");
        }
        if let Some(&bad) = targets.iter().find(|&&t| t >= self.args.vocab_size as i32) {
            bail!("target id {bad} is outside the vocabulary of {} tokens: the data does not match the model", self.args.vocab_size);
        }
        let ids: Vec<u8> = targets.iter().flat_map(|t| t.to_le_bytes()).collect();
        self.gpu.upload(acts.targets.addr, &ids)?;
        let row_scale = grad_scale.map(|s| (s / self.counted as f64) as f32);
        let gpu = &*self.gpu;
        classifier::cross_entropy(gpu, self.x, acts.logits.addr, acts.losses.addr, acts.targets.addr, n, self.args.vocab_size, row_scale)?;
        classifier::loss_sum(gpu, acts.loss_sum.addr, acts.losses.addr, n)
    }

    /// The mean loss of the last [`Self::loss`]: waits for the GPU.
    pub fn read_loss(&self) -> Result<f32> {
        let acts = self.acts.as_ref().ok_or_else(|| candle_core::Error::Msg("no loss computed yet".into()))?;
        Ok(acts.loss_sum.download_f32()?[0] / self.counted as f32)
    }

    /// The backward pass from the logits' gradient (left by [`Self::loss`]) to the parameter
    /// gradients, which it adds to. `finished` receives the ranges of the flat buffers whose gradients
    /// are complete as soon as their last kernel is queued, the final LayerNorm's first, then each
    /// layer's from the last, then the embeddings': together they cover the buffers once. A
    /// data-parallel run starts averaging each over the ranks there, beside the rest of the backward pass.
    pub fn backward(&mut self, dropout: Option<(DropoutKey, f32)>, finished: &mut dyn FnMut(Range<usize>) -> Result<()>) -> Result<()> {
        let acts = self.acts.as_ref().ok_or_else(|| candle_core::Error::Msg("backward before any forward pass".into()))?;
        let (gpu, x, layout) = (&*self.gpu, self.x, &self.layout);
        let (b, t) = (acts.b, acts.t);
        let (n, c, nh, v) = (b * t, self.args.n_embd, self.args.n_head, self.args.vocab_size);
        let tanh = self.args.gelu == Gelu::Tanh;
        let (dresidual, scratch) = (acts.dresidual.addr, acts.scratch.addr);
        let (ln_scratch, bias_scratch) = (acts.layernorm_scratch.addr, acts.bias_scratch.addr);
        // The gradient of a block's output projection: the residual stream's, through the residual dropout.
        let through_dropout = |mask: Option<Mask>| -> Result<u64> {
            match mask {
                Some(mask) => bias::dropout(gpu, x, scratch, dresidual, n * c, mask).map(|_| scratch),
                None => Ok(dresidual),
            }
        };

        matmul::backward(
            gpu,
            x,
            Some(scratch),
            self.grad(&layout.wte),
            None,
            0,
            acts.logits.addr,
            acts.ln_f.addr,
            self.weight(&layout.wte),
            n,
            c,
            v,
        )?;
        let last = acts.layers.last().map_or(&acts.encoded, |a| &a.residual_3);
        let (w, _) = self.affine(&layout.ln_f);
        let (dw, db) = self.affine_grads(&layout.ln_f);
        layernorm::backward(
            gpu,
            x,
            dresidual,
            dw,
            db,
            ln_scratch,
            scratch,
            last.addr,
            w,
            acts.ln_f_mean.addr,
            acts.ln_f_rstd.addr,
            n,
            c,
            false,
        )?;
        finished(layout.ln_f.weight.start..layout.ln_f.end())?;

        for (l, lp) in layout.layers.iter().enumerate().rev() {
            let residual = if l == 0 { &acts.encoded } else { &acts.layers[l - 1].residual_3 };
            let a = &acts.layers[l];
            // MLP block: residual_3 = residual_2 + dropout(gelu(ln_2 W_fcᵀ) W_projᵀ).
            let dproj = through_dropout(mask(dropout, Site::MlpResidual(l)))?;
            let (dw, db) = self.affine_grads(&lp.mlp_proj);
            matmul::input_gradient(gpu, x, acts.dfch.addr, dproj, self.weight(&lp.mlp_proj.weight), n, 4 * c, c)?;
            gelu::backward(gpu, x, acts.dfch.addr, acts.fch_gelu.addr, a.fch.addr, acts.dfch.addr, n * 4 * c, tanh)?;
            matmul::weight_gradients(gpu, x, dw, db, bias_scratch, dproj, acts.fch_gelu.addr, n, 4 * c, c)?;
            let (dw, db) = self.affine_grads(&lp.c_fc);
            let w = self.weight(&lp.c_fc.weight);
            matmul::backward(gpu, x, Some(scratch), dw, db, bias_scratch, acts.dfch.addr, a.ln_2.addr, w, n, c, 4 * c)?;
            let (dw, db) = self.affine_grads(&lp.ln_2);
            let w = self.weight(&lp.ln_2.weight);
            layernorm::backward(
                gpu,
                x,
                dresidual,
                dw,
                db,
                ln_scratch,
                scratch,
                a.residual_2.addr,
                w,
                a.ln_2_mean.addr,
                a.ln_2_rstd.addr,
                n,
                c,
                true,
            )?;

            // Attention block: residual_2 = residual + dropout(attention(ln_1 W_attnᵀ) W_projᵀ).
            let dproj = through_dropout(mask(dropout, Site::AttentionResidual(l)))?;
            let (dw, db) = self.affine_grads(&lp.attn_proj);
            let w = self.weight(&lp.attn_proj.weight);
            matmul::backward(gpu, x, Some(acts.datty.addr), dw, db, bias_scratch, dproj, a.atty.addr, w, n, c, c)?;
            attention::backward(
                gpu,
                x,
                acts.dqkv.addr,
                acts.datty.addr,
                a.qkv.addr,
                a.atty.addr,
                a.lse.addr,
                acts.attention_delta.addr,
                b,
                t,
                c,
                nh,
                mask(dropout, Site::Attention(l)),
            )?;
            let (dw, db) = self.affine_grads(&lp.c_attn);
            let w = self.weight(&lp.c_attn.weight);
            matmul::backward(gpu, x, Some(scratch), dw, db, bias_scratch, acts.dqkv.addr, a.ln_1.addr, w, n, c, 3 * c)?;
            let (dw, db) = self.affine_grads(&lp.ln_1);
            let w = self.weight(&lp.ln_1.weight);
            layernorm::backward(
                gpu,
                x,
                dresidual,
                dw,
                db,
                ln_scratch,
                scratch,
                residual.addr,
                w,
                a.ln_1_mean.addr,
                a.ln_1_rstd.addr,
                n,
                c,
                true,
            )?;
            finished(lp.range())?;
        }
        encoder::backward(
            gpu,
            x,
            self.grad(&layout.wte),
            self.grad(&layout.wpe),
            dresidual,
            acts.tokens.addr,
            b,
            t,
            c,
            mask(dropout, Site::Embedding),
        )?;
        // The token embedding's gradient also has the output layer's (weight tying): it is complete only now.
        finished(layout.wte.start..layout.wpe.end)
    }

    /// One AdamW step at learning rate `lr` from the accumulated gradients, with nanoGPT's groups
    /// (only tensors of rank >= 2 decay) and global-norm clipping, all on the device: the norm is
    /// reduced there and the clip coefficient computed there, so the host does not wait. Only the
    /// step's [`Self::shard`] moves; `sum_over_ranks` receives the device address of the shard's squared
    /// gradient norm (one f32) to add the other shards' to, before the clip reads it. A shard leaves the
    /// compute copy of the weights to [`Self::params_written`], once the ranks have gathered the shards.
    pub fn optimizer_step(&mut self, args: &OptimizerArgs, lr: f64, sum_over_ranks: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        self.allocate_moments()?;
        let gpu = &*self.gpu;
        let shard = self.shard.clone();
        let norm_squared = self.grad_norm_squared.addr;
        match shard.len() {
            0 => gpu.zero(norm_squared, 4)?,
            len => adamw::grad_norm_squared(gpu, norm_squared, self.grad_norm_partials.addr, GRAD_NORM_PARTIALS, self.grad(&shard), len)?,
        }
        sum_over_ranks(norm_squared)?;
        self.optimizer_steps += 1;
        let (b1, b2, step) = (args.beta1, args.beta2, self.optimizer_steps as i32);
        let update = AdamWUpdate {
            lr,
            beta1: b1,
            beta2: b2,
            eps: crate::optim::EPS,
            weight_decay: args.weight_decay,
            grad_scale: 1.0,
            step_size: lr / (1.0 - b1.powi(step)),
            bias_correction2_sqrt: (1.0 - b2.powi(step)).sqrt(),
        };
        let buffers = FlatBuffers {
            params: self.params.addr,
            grads: self.grads.addr,
            exp_avg: self.exp_avg.addr,
            exp_avg_sq: self.exp_avg_sq.addr,
            // A shard's copy is rounded whole once the shards are gathered (`params_written`).
            params_copy: if shard.len() == self.layout.len { self.weights_copy.as_ref().map_or(0, |c| c.addr) } else { 0 },
            len: self.layout.len,
            shard,
        };
        let clip = (args.grad_clip > 0.0).then_some(Clip { grad_norm_squared: norm_squared, max_norm: args.grad_clip as f32 });
        adamw::update(gpu, self.x, &buffers, &self.tensor_table, &update, clip)
    }

    /// The device address of the f32 master weights, for a collective that brings the other ranks' shards.
    pub fn params_addr(&self) -> u64 {
        self.params.addr
    }

    /// Refreshes the compute copy of the weights once the master weights were written on the device
    /// (by the other ranks' shards).
    pub fn params_written(&self) -> Result<()> {
        match &self.weights_copy {
            Some(copy) => adamw::round_params_bf16(&*self.gpu, copy.addr, self.params.addr, self.layout.len),
            None => Ok(()),
        }
    }

    /// The global gradient norm the last optimizer step clipped by: waits for the GPU.
    pub fn read_grad_norm(&self) -> Result<f32> {
        Ok(self.grad_norm_squared.download_f32()?[0].sqrt())
    }

    /// The parameter gradients (f32, in [`ParamLayout`] order): waits for the GPU.
    pub fn read_grads(&self) -> Result<Vec<f32>> {
        self.grads.download_f32()
    }

    /// The device address of the flat f32 gradients, for a collective that reduces them in place.
    pub fn grads_addr(&self) -> u64 {
        self.grads.addr
    }

    /// Replaces the accumulated gradients, e.g. by their mean over the ranks of a data-parallel run.
    pub fn load_grads(&self, grads: &[f32]) -> Result<()> {
        if grads.len() != self.layout.len {
            bail!("the model has {} parameters but {} gradients were given", self.layout.len, grads.len());
        }
        self.grads.upload_f32(grads)
    }

    /// AdamW's two moments (of [`Self::shard`]) and the number of steps taken: waits for the GPU.
    pub fn read_optimizer_state(&self) -> Result<(Vec<f32>, Vec<f32>, u64)> {
        if self.exp_avg.bytes != self.shard.len() * 4 {
            return Ok((vec![0.0; self.shard.len()], vec![0.0; self.shard.len()], self.optimizer_steps));
        }
        Ok((self.exp_avg.download_f32()?, self.exp_avg_sq.download_f32()?, self.optimizer_steps))
    }

    /// Resumes AdamW from moments (of [`Self::shard`]) and a step count that [`Self::read_optimizer_state`] gave.
    pub fn load_optimizer_state(&mut self, exp_avg: &[f32], exp_avg_sq: &[f32], steps: u64) -> Result<()> {
        if exp_avg.len() != self.shard.len() || exp_avg_sq.len() != self.shard.len() {
            bail!("optimizer state for {} parameters given to a step that updates {}", exp_avg.len(), self.shard.len());
        }
        self.allocate_moments()?;
        self.exp_avg.upload_f32(exp_avg)?;
        self.exp_avg_sq.upload_f32(exp_avg_sq)?;
        self.optimizer_steps = steps;
        Ok(())
    }

    /// The f32 master weights: waits for the GPU.
    pub fn read_params(&self) -> Result<Vec<f32>> {
        self.params.download_f32()
    }

    /// The last forward pass's logits, as f32: waits for the GPU.
    pub fn read_logits(&self) -> Result<Vec<f32>> {
        let acts = self.acts.as_ref().ok_or_else(|| candle_core::Error::Msg("no forward pass yet".into()))?;
        match self.x {
            Precision::F32 => acts.logits.download_f32(),
            Precision::Bf16 => {
                let mut bytes = vec![0u8; acts.logits.bytes];
                self.gpu.download(acts.logits.addr, &mut bytes)?;
                Ok(bytes.chunks_exact(2).map(|h| half::bf16::from_le_bytes([h[0], h[1]]).to_f32()).collect())
            }
        }
    }
}
