//! The CPU training step, llm.c style: parameters, gradients and each AdamW moment are one f32
//! allocation apiece, every weight tensor a named range of it (nanoGPT's state-dict names, in
//! `Gpt::named_parameters` order); the activations of a (B, T) batch are allocated once and reused.
//! Forward and backward are written out layer by layer below, from the kernels in `kernels/`.
//!
//! Shapes: B batch rows, T positions, C = n_embd channels, NH heads, V vocab, L layers.

use std::ops::Range;

use candle_core::Result;
use rayon::prelude::*;

use crate::kernels::dropout::{DropoutKey, Mask, Site};
use crate::kernels::{attention, cross_entropy, embedding, gelu, layernorm, matmul};
use crate::model::{Gelu, ModelArgs};

/// One parameter tensor: its nanoGPT name, shape and place in the flat buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

impl ParamTensor {
    /// nanoGPT's optimizer groups: matmul weights and embeddings (rank >= 2) decay, biases and
    /// LayerNorm weights do not.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// A weight and its optional bias, which always follows it in the flat buffers.
#[derive(Clone, Debug)]
pub(crate) struct Affine {
    pub(crate) weight: Range<usize>,
    pub(crate) bias: Option<Range<usize>>,
}

impl Affine {
    /// Weight and bias slices of `buffer`.
    pub(crate) fn get<'a>(&self, buffer: &'a [f32]) -> (&'a [f32], Option<&'a [f32]>) {
        (&buffer[self.weight.clone()], self.bias.clone().map(|b| &buffer[b]))
    }

    /// Where the weight, or its bias when it has one, ends in the flat buffers.
    pub(crate) fn end(&self) -> usize {
        self.bias.as_ref().map_or(self.weight.end, |b| b.end)
    }

    /// Weight and bias slices of `buffer`, mutable together.
    fn get_mut<'a>(&self, buffer: &'a mut [f32]) -> (&'a mut [f32], Option<&'a mut [f32]>) {
        let (weight, bias) = buffer[self.weight.start..self.end()].split_at_mut(self.weight.len());
        (weight, self.bias.is_some().then_some(bias))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct LayerParams {
    pub(crate) ln_1: Affine,
    pub(crate) c_attn: Affine,
    pub(crate) attn_proj: Affine,
    pub(crate) ln_2: Affine,
    pub(crate) c_fc: Affine,
    pub(crate) mlp_proj: Affine,
}

impl LayerParams {
    /// The layer's parameters in the flat buffers: one contiguous range, `ln_1` first, `mlp_proj` last.
    pub(crate) fn range(&self) -> Range<usize> {
        self.ln_1.weight.start..self.mlp_proj.end()
    }
}

/// Where every parameter tensor lives in the flat buffers.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<ParamTensor>,
    pub len: usize,
    pub(crate) wte: Range<usize>,
    pub(crate) wpe: Range<usize>,
    pub(crate) layers: Vec<LayerParams>,
    pub(crate) ln_f: Affine,
}

impl ParamLayout {
    pub fn new(args: &ModelArgs) -> Self {
        let c = args.n_embd;
        let mut tensors = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| {
            let start = tensors.last().map_or(0, |t: &ParamTensor| t.range.end);
            let range = start..start + shape.iter().product::<usize>();
            tensors.push(ParamTensor { name, shape, range: range.clone() });
            range
        };
        let wte = push("transformer.wte.weight".into(), vec![args.vocab_size, c]);
        let wpe = push("transformer.wpe.weight".into(), vec![args.block_size, c]);
        let mut affine = |name: String, shape: Vec<usize>| Affine {
            weight: push(format!("{name}.weight"), shape.clone()),
            bias: args.bias.then(|| push(format!("{name}.bias"), vec![shape[0]])),
        };
        let layers = (0..args.n_layer)
            .map(|l| {
                let p = format!("transformer.h.{l}");
                LayerParams {
                    ln_1: affine(format!("{p}.ln_1"), vec![c]),
                    c_attn: affine(format!("{p}.attn.c_attn"), vec![3 * c, c]),
                    attn_proj: affine(format!("{p}.attn.c_proj"), vec![c, c]),
                    ln_2: affine(format!("{p}.ln_2"), vec![c]),
                    c_fc: affine(format!("{p}.mlp.c_fc"), vec![4 * c, c]),
                    mlp_proj: affine(format!("{p}.mlp.c_proj"), vec![c, 4 * c]),
                }
            })
            .collect();
        let ln_f = affine("transformer.ln_f".into(), vec![c]);
        let len = tensors.last().map_or(0, |t| t.range.end);
        Self { tensors, len, wte, wpe, layers, ln_f }
    }
}

/// The activations of one layer that the backward pass reads, each (B, T, width).
struct LayerActivations {
    ln_1: Vec<f32>,
    ln_1_mean: Vec<f32>,
    ln_1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    /// The attention's merged heads, before the output projection.
    atty: Vec<f32>,
    /// The residual stream after the attention block.
    residual_2: Vec<f32>,
    ln_2: Vec<f32>,
    ln_2_mean: Vec<f32>,
    ln_2_rstd: Vec<f32>,
    /// The MLP's hidden layer before and after GELU.
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    /// The residual stream after the MLP block: the next layer's input.
    residual_3: Vec<f32>,
}

/// The activations of a run of whole batch rows, `first_row` onwards: everything a step writes
/// for them besides parameters and gradients.
struct Shard {
    first_row: usize,
    rows: usize,
    /// The embedding output: the first layer's input.
    encoded: Vec<f32>,
    layers: Vec<LayerActivations>,
    ln_f: Vec<f32>,
    ln_f_mean: Vec<f32>,
    ln_f_rstd: Vec<f32>,
    /// (rows, T, V): the logits, overwritten by their gradient in training.
    logits: Vec<f32>,
    /// The gradient of the residual stream, carried down through the layers.
    dresidual: Vec<f32>,
    /// (rows, T, C) scratch: a dropped-out projection in the forward pass, a LayerNorm output's
    /// gradient or a projection's gradient in the backward pass.
    scratch: Vec<f32>,
    /// (rows, T, C): the gradient of the attention's merged heads.
    datty: Vec<f32>,
    dqkv: Vec<f32>,
    dfch: Vec<f32>,
}

/// Everything a (B, T) step writes besides parameters and their gradients, allocated once per shape.
///
/// The batch is split into shards of whole rows, one per thread: each thread runs its rows through
/// the whole forward and backward pass on its own, with no synchronisation until its parameter
/// gradients are added to the others' at the end. At small widths this keeps both cores of a
/// two-core machine busy where splitting every matrix product between them does not (each product
/// is too short to amortise handing work over). The shards after the first write their parameter
/// gradients to buffers of their own, so sharding costs one gradient buffer per extra thread;
/// [`shard_count`] keeps that within what the activations take.
pub struct Activations {
    b: usize,
    t: usize,
    shards: Vec<Shard>,
    /// The parameter gradients of shards 1.., allocated by the first backward pass.
    shard_grads: Vec<Vec<f32>>,
}

/// f32 elements of each activation buffer for (B, T), by purpose, from which both the allocation
/// and the memory estimate are made.
pub struct ActivationSizes {
    /// Kept from the forward pass for the backward pass (including the logits).
    pub forward: usize,
    /// Gradient buffers of the backward pass.
    pub backward: usize,
    /// The parameter gradients of the shards after the first (see [`Activations`]).
    pub shard_gradients: usize,
}

fn row_sizes(args: &ModelArgs, b: usize, t: usize) -> (usize, usize) {
    let (n, c) = (b * t, args.n_embd);
    // ln_1 + qkv + atty + residual_2 + ln_2 + fch + fch_gelu + residual_3, and four row statistics.
    let layer = n * (c + 3 * c + c + c + c + 4 * c + 4 * c + c) + 4 * n;
    let forward = n * c + args.n_layer * layer + n * c + 2 * n + n * args.vocab_size;
    let backward = n * c * 3 + n * 3 * c + n * 4 * c;
    (forward, backward)
}

/// How many shards a (B, T) batch runs as: one per thread, at most one per batch row, and no more
/// than keep the extra gradient buffers within the size of the activations.
pub fn shard_count(args: &ModelArgs, b: usize, t: usize) -> usize {
    let (forward, backward) = row_sizes(args, b, t);
    let params = ParamLayout::new(args).len.max(1);
    rayon::current_num_threads().min(b).min(1 + (forward + backward) / params).max(1)
}

pub fn activation_sizes(args: &ModelArgs, b: usize, t: usize) -> ActivationSizes {
    let (forward, backward) = row_sizes(args, b, t);
    let shard_gradients = (shard_count(args, b, t) - 1) * ParamLayout::new(args).len;
    ActivationSizes { forward, backward, shard_gradients }
}

impl Shard {
    fn new(args: &ModelArgs, first_row: usize, rows: usize, t: usize) -> Self {
        let (n, c) = (rows * t, args.n_embd);
        let z = |len: usize| vec![0f32; len];
        let layers = (0..args.n_layer)
            .map(|_| LayerActivations {
                ln_1: z(n * c),
                ln_1_mean: z(n),
                ln_1_rstd: z(n),
                qkv: z(n * 3 * c),
                atty: z(n * c),
                residual_2: z(n * c),
                ln_2: z(n * c),
                ln_2_mean: z(n),
                ln_2_rstd: z(n),
                fch: z(n * 4 * c),
                fch_gelu: z(n * 4 * c),
                residual_3: z(n * c),
            })
            .collect();
        Self {
            first_row,
            rows,
            encoded: z(n * c),
            layers,
            ln_f: z(n * c),
            ln_f_mean: z(n),
            ln_f_rstd: z(n),
            logits: z(n * args.vocab_size),
            dresidual: z(n * c),
            scratch: z(n * c),
            datty: z(n * c),
            dqkv: z(n * 3 * c),
            dfch: z(n * 4 * c),
        }
    }
}

impl Activations {
    pub fn new(args: &ModelArgs, b: usize, t: usize) -> Self {
        let count = shard_count(args, b, t);
        let shards = (0..count)
            .map(|s| {
                let first_row = s * b / count;
                Shard::new(args, first_row, (s + 1) * b / count - first_row, t)
            })
            .collect();
        Self { b, t, shards, shard_grads: Vec::new() }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// The logits of the last position of the last batch row, from the last forward pass.
    pub fn last_logits(&self, v: usize) -> &[f32] {
        let logits = &self.shards.last().expect("at least one shard").logits;
        &logits[logits.len() - v..]
    }

    /// Runs `f` on every shard, in parallel when there are several. With one, `f` runs on the calling
    /// thread, and the kernels split their own work between threads instead.
    fn for_each_shard<R: Send>(&mut self, f: impl Fn(&mut Shard) -> R + Sync + Send) -> Vec<R> {
        match self.shards.as_mut_slice() {
            [only] => vec![f(only)],
            shards => shards.par_iter_mut().map(f).collect(),
        }
    }
}

/// The dropout mask of `site` when training with dropout, for a buffer whose first element is
/// element `offset` of the site's whole-batch tensor.
fn mask(dropout: Option<(DropoutKey, f32)>, site: Site, offset: usize) -> Option<Mask> {
    dropout.map(|(key, p)| Mask::new(key, site, p).starting_at(offset))
}

/// The gradient `grad` back through a dropout `mask`: `grad` itself without one, else its masked copy in `scratch`.
fn through_dropout<'a>(grad: &'a [f32], scratch: &'a mut [f32], mask: Option<Mask>) -> &'a [f32] {
    match mask {
        Some(m) => {
            scratch.copy_from_slice(grad);
            m.apply(scratch, 0);
            scratch
        }
        None => grad,
    }
}

/// `out = residual + dropout(inp Wᵀ + b)`: the residual add fused into the matmul when nothing is dropped.
#[allow(clippy::too_many_arguments)]
fn residual_linear(
    out: &mut [f32],
    scratch: &mut [f32],
    residual: &[f32],
    inp: &[f32],
    (w, b): (&[f32], Option<&[f32]>),
    n: usize,
    c: usize,
    oc: usize,
    mask: Option<Mask>,
) {
    match mask {
        None => {
            out.copy_from_slice(residual);
            matmul::forward(out, inp, w, b, n, c, oc, true);
        }
        Some(mask) => {
            matmul::forward(scratch, inp, w, b, n, c, oc, false);
            mask.apply(scratch, 0);
            out.iter_mut().zip(residual.iter().zip(scratch.iter())).for_each(|(o, (r, s))| *o = r + s);
        }
    }
}

/// The forward pass of `tokens` (B x T) to the logits in `acts`. `dropout` is the key and
/// probability of a training pass with dropout; None evaluates.
pub fn forward(
    args: &ModelArgs,
    layout: &ParamLayout,
    params: &[f32],
    acts: &mut Activations,
    tokens: &[u32],
    dropout: Option<(DropoutKey, f32)>,
) {
    let t = acts.t;
    acts.for_each_shard(|shard| shard.forward(args, layout, params, &tokens[shard.first_row * t..][..shard.rows * t], t, dropout));
}

/// Mean loss over the counted targets; with `grad_scale`, the logits become the gradient of
/// `grad_scale` times the mean loss.
pub fn loss(args: &ModelArgs, acts: &mut Activations, targets: &[i32], grad_scale: Option<f64>) -> Result<f32> {
    let counted = cross_entropy::counted(targets);
    if counted == 0 {
        candle_core::bail!("every target is -1 (ignored): there is nothing to compute a loss on");
    }
    let row_scale = grad_scale.map(|s| (s / counted as f64) as f32);
    let t = acts.t;
    let totals = acts.for_each_shard(|shard| {
        cross_entropy::forward(&mut shard.logits, &targets[shard.first_row * t..][..shard.rows * t], args.vocab_size, row_scale)
    });
    Ok((totals.iter().sum::<f64>() / counted as f64) as f32)
}

/// The backward pass from the logits' gradient (left in `acts` by [`loss`]) to the parameter
/// gradients `grads`: written when `accumulate` is false, added to otherwise.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    args: &ModelArgs,
    layout: &ParamLayout,
    params: &[f32],
    grads: &mut [f32],
    acts: &mut Activations,
    tokens: &[u32],
    dropout: Option<(DropoutKey, f32)>,
    accumulate: bool,
) {
    let t = acts.t;
    let tokens_of = |shard: &Shard| &tokens[shard.first_row * t..][..shard.rows * t];
    let (first, rest) = acts.shards.split_first_mut().expect("at least one shard");
    if rest.is_empty() {
        return first.backward(args, layout, params, grads, tokens_of(first), t, dropout, accumulate);
    }
    acts.shard_grads.resize_with(rest.len(), || vec![0f32; layout.len]);
    rayon::join(
        || first.backward(args, layout, params, grads, tokens_of(first), t, dropout, accumulate),
        || {
            rest.par_iter_mut()
                .zip(acts.shard_grads.par_iter_mut())
                .for_each(|(shard, own)| shard.backward(args, layout, params, own, tokens_of(shard), t, dropout, false))
        },
    );
    let others = &acts.shard_grads;
    grads.par_chunks_mut(BLOCK).enumerate().for_each(|(i, g)| {
        for other in others {
            g.iter_mut().zip(&other[i * BLOCK..]).for_each(|(g, o)| *g += o);
        }
    });
}

/// Elements per parallel task of the gradient sum.
const BLOCK: usize = 1 << 14;

impl Shard {
    fn forward(
        &mut self,
        args: &ModelArgs,
        layout: &ParamLayout,
        params: &[f32],
        tokens: &[u32],
        t: usize,
        dropout: Option<(DropoutKey, f32)>,
    ) {
        let (n, c, nh, v) = (self.rows * t, args.n_embd, args.n_head, args.vocab_size);
        let tanh = args.gelu == Gelu::Tanh;
        let p = |r: &Range<usize>| &params[r.clone()];
        // Offsets of this shard's first element in the whole batch's (B, T, C) and (B, NH, T, T) tensors.
        let (rows_at, scores_at) = (self.first_row * t * c, self.first_row * nh * t * t);
        embedding::forward(&mut self.encoded, tokens, p(&layout.wte), p(&layout.wpe), t, c, mask(dropout, Site::Embedding, rows_at));
        for (l, lp) in layout.layers.iter().enumerate() {
            let (before, rest) = self.layers.split_at_mut(l);
            let residual = before.last().map_or(&self.encoded, |prev| &prev.residual_3);
            let a = &mut rest[0];
            let (w, bias) = lp.ln_1.get(params);
            layernorm::forward(&mut a.ln_1, &mut a.ln_1_mean, &mut a.ln_1_rstd, residual, w, bias);
            let (w, bias) = lp.c_attn.get(params);
            matmul::forward(&mut a.qkv, &a.ln_1, w, bias, n, c, 3 * c, false);
            attention::forward(&mut a.atty, &a.qkv, t, c, nh, mask(dropout, Site::Attention(l), scores_at));
            residual_linear(
                &mut a.residual_2,
                &mut self.scratch,
                residual,
                &a.atty,
                lp.attn_proj.get(params),
                n,
                c,
                c,
                mask(dropout, Site::AttentionResidual(l), rows_at),
            );
            let (w, bias) = lp.ln_2.get(params);
            layernorm::forward(&mut a.ln_2, &mut a.ln_2_mean, &mut a.ln_2_rstd, &a.residual_2, w, bias);
            let (w, bias) = lp.c_fc.get(params);
            matmul::forward(&mut a.fch, &a.ln_2, w, bias, n, c, 4 * c, false);
            gelu::forward(&mut a.fch_gelu, &a.fch, tanh);
            residual_linear(
                &mut a.residual_3,
                &mut self.scratch,
                &a.residual_2,
                &a.fch_gelu,
                lp.mlp_proj.get(params),
                n,
                4 * c,
                c,
                mask(dropout, Site::MlpResidual(l), rows_at),
            );
        }
        let residual = self.layers.last().map_or(&self.encoded, |a| &a.residual_3);
        let (w, bias) = layout.ln_f.get(params);
        layernorm::forward(&mut self.ln_f, &mut self.ln_f_mean, &mut self.ln_f_rstd, residual, w, bias);
        // The output layer is the token embedding (weight tying).
        matmul::forward(&mut self.logits, &self.ln_f, p(&layout.wte), None, n, c, v, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        args: &ModelArgs,
        layout: &ParamLayout,
        params: &[f32],
        grads: &mut [f32],
        tokens: &[u32],
        t: usize,
        dropout: Option<(DropoutKey, f32)>,
        accumulate: bool,
    ) {
        let (n, c, nh, v) = (self.rows * t, args.n_embd, args.n_head, args.vocab_size);
        let tanh = args.gelu == Gelu::Tanh;
        let (rows_at, scores_at) = (self.first_row * t * c, self.first_row * nh * t * t);
        let Shard { encoded, layers, ln_f, ln_f_mean, ln_f_rstd, logits, dresidual, scratch, datty, dqkv, dfch, .. } = self;

        matmul::backward(
            Some(scratch),
            &mut grads[layout.wte.clone()],
            None,
            logits,
            ln_f,
            &params[layout.wte.clone()],
            n,
            c,
            v,
            accumulate,
        );
        let last = layers.last().map_or(&*encoded, |a| &a.residual_3);
        let (dw, db) = layout.ln_f.get_mut(grads);
        layernorm::backward(dresidual, dw, db, scratch, last, ln_f_mean, ln_f_rstd, layout.ln_f.get(params).0, false, accumulate);

        for (l, lp) in layout.layers.iter().enumerate().rev() {
            let residual = if l == 0 { &*encoded } else { &layers[l - 1].residual_3 };
            let a = &layers[l];
            // MLP block: residual_3 = residual_2 + dropout(gelu(ln_2 W_fcᵀ) W_projᵀ).
            let dproj = through_dropout(dresidual, scratch, mask(dropout, Site::MlpResidual(l), rows_at));
            let (dw, db) = lp.mlp_proj.get_mut(grads);
            matmul::backward(Some(dfch), dw, db, dproj, &a.fch_gelu, lp.mlp_proj.get(params).0, n, 4 * c, c, accumulate);
            gelu::backward(dfch, &a.fch, tanh);
            let (dw, db) = lp.c_fc.get_mut(grads);
            matmul::backward(Some(scratch), dw, db, dfch, &a.ln_2, lp.c_fc.get(params).0, n, c, 4 * c, accumulate);
            let (dw, db) = lp.ln_2.get_mut(grads);
            layernorm::backward(
                dresidual,
                dw,
                db,
                scratch,
                &a.residual_2,
                &a.ln_2_mean,
                &a.ln_2_rstd,
                lp.ln_2.get(params).0,
                true,
                accumulate,
            );

            // Attention block: residual_2 = residual + dropout(attention(ln_1 W_attnᵀ) W_projᵀ).
            let dproj = through_dropout(dresidual, scratch, mask(dropout, Site::AttentionResidual(l), rows_at));
            let (dw, db) = lp.attn_proj.get_mut(grads);
            matmul::backward(Some(datty), dw, db, dproj, &a.atty, lp.attn_proj.get(params).0, n, c, c, accumulate);
            attention::backward(dqkv, datty, &a.qkv, t, c, nh, mask(dropout, Site::Attention(l), scores_at));
            let (dw, db) = lp.c_attn.get_mut(grads);
            matmul::backward(Some(scratch), dw, db, dqkv, &a.ln_1, lp.c_attn.get(params).0, n, c, 3 * c, accumulate);
            let (dw, db) = lp.ln_1.get_mut(grads);
            layernorm::backward(dresidual, dw, db, scratch, residual, &a.ln_1_mean, &a.ln_1_rstd, lp.ln_1.get(params).0, true, accumulate);
        }

        let (dwte, dwpe) = grads[layout.wte.start..layout.wpe.end].split_at_mut(layout.wte.len());
        embedding::backward(dwte, dwpe, dresidual, tokens, t, c, mask(dropout, Site::Embedding, rows_at), accumulate);
    }
}
