//! Generation on the CPU without a graph: nanoGPT's `generate` for a batch of sequences that
//! decode together, straight from the training step's flat parameters and kernels.
//!
//! The keys and values of every position are kept in a cache allocated once for the whole block,
//! and so is every other buffer, so that a token allocates nothing. A prompt goes through one
//! prefill pass over all its positions; each further token is one pass over one position that
//! attends to the cache. Once the text outgrows `block_size`, nanoGPT crops the context to its
//! last `block_size` tokens, which shifts every position: the cached keys no longer apply, so the
//! window is recomputed as one prefill pass.
//!
//! Such window passes are nearly all of a long generation's arithmetic, and two rearrangements of the
//! same sums take work out of them (see [`FirstLayerTables`] and [`last_window_attention`]): layer 0's
//! query, key and value come from per-token and per-position tables, and the last layer computes no key
//! or value rows, only the weighted sums its one query needs.
//!
//! Shapes: B sequences, T new positions per pass, C = n_embd, NH heads, V vocab, L layers.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::kernels::{attention, dot, embedding, exp, gelu, layernorm, madd, matmul, max, sum};
use crate::model::{Gelu, ModelArgs};
use crate::sample::{self, SampleArgs};
use crate::train_step::ParamLayout;

/// The model a generation runs: its architecture and the training step's flat parameters.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub args: &'a ModelArgs,
    pub layout: &'a ParamLayout,
    pub params: &'a [f32],
}

/// The forward pass of new positions against a KV cache, for B sequences of equal length.
struct Decoder {
    batch: usize,
    /// The weights the products run on, copied when the generation starts.
    weights: Transposed,
    /// Positions already in the cache, the same for every sequence.
    cached: usize,
    /// Every buffer, sequence-major so that a contiguous run of sequences owns one slice of each.
    buffers: Buffers,
}

/// The linear layers' weights transposed to (in, out) rows, and the token embedding (the output layer's weight) to
/// (C, V), made once per generation. In PyTorch's (out, in) layout gemm re-lays out a weight on every call, which
/// for a pass of a few rows costs more than the product: a copy of the weights is the cheaper trade.
struct Transposed {
    /// Per layer: c_attn (C, 3C), attn_proj (C, C), c_fc (C, 4C), mlp_proj (4C, C).
    layers: Vec<[Vec<f32>; 4]>,
    wte: Vec<f32>,
    first_layer: Option<FirstLayerTables>,
}

impl Transposed {
    fn new(model: Weights) -> Self {
        let Weights { args, layout, params } = model;
        let c = args.n_embd;
        let transpose = |weight: &[f32], rows: usize| {
            let cols = weight.len() / rows;
            let mut out = vec![0f32; weight.len()];
            for (r, row) in weight.chunks_exact(cols).enumerate() {
                row.iter().enumerate().for_each(|(k, &w)| out[k * rows + r] = w);
            }
            out
        };
        let layers: Vec<[Vec<f32>; 4]> = layout
            .layers
            .iter()
            .map(|lp| {
                [(&lp.c_attn, 3 * c), (&lp.attn_proj, c), (&lp.c_fc, 4 * c), (&lp.mlp_proj, c)]
                    .map(|(affine, rows)| transpose(affine.get(params).0, rows))
            })
            .collect();
        let first_layer = FirstLayerTables::new(model, &layers[0][0]);
        Self { layers, wte: transpose(&params[layout.wte.clone()], args.vocab_size), first_layer }
    }
}

/// Layer 0's query, key and value in a window pass, from tables instead of a product per position.
///
/// Its input row at position j with token s is x = wte[s] + wpe[j], and x's mean is the sum of the two rows'
/// means, so ln_1(x) = rstd(x) (w̃[s] + p̃[j]) γ + β, where w̃ and p̃ are the rows minus their own means. Through
/// c_attn (W, bias b) that is rstd(x) (w̃[s] γ W + p̃[j] γ W) + (β W + b): only rstd(x) needs the row itself.
/// Centring each row before the product, rather than subtracting mean(x) γ W after it, keeps the sum free of
/// cancellation. The tables cost V + block rows of the product once per generation, and each window pass of a
/// sequence saves block rows: they are made for vocabularies of at most four blocks, paid back within five tokens.
struct FirstLayerTables {
    /// (V, 3C) and (block, 3C): w̃[s] γ W and p̃[j] γ W.
    tokens: Vec<f32>,
    positions: Vec<f32>,
    /// (3C): β W + b.
    constant: Vec<f32>,
}

impl FirstLayerTables {
    /// The tables of layer 0, whose c_attn is given transposed, (C, 3C).
    fn new(model: Weights, c_attn: &[f32]) -> Option<Self> {
        let Weights { args, layout, params } = model;
        if !Self::made_for(args) {
            return None;
        }
        let c = args.n_embd;
        let (gamma, beta) = layout.layers[0].ln_1.get(params);
        let bias = layout.layers[0].c_attn.get(params).1;
        let through_c_attn = |rows: &[f32], bias: Option<&[f32]>| {
            let n = rows.len() / c;
            let mut out = vec![0f32; n * 3 * c];
            matmul::forward_transposed(&mut out, rows, c_attn, 3 * c, bias, n, c, 3 * c, false, 1);
            out
        };
        let centred_times_gamma = |table: &[f32]| {
            let mut rows = table.to_vec();
            for row in rows.chunks_exact_mut(c) {
                let mean = sum(row) / c as f32;
                row.iter_mut().zip(gamma).for_each(|(x, g)| *x = (*x - mean) * g);
            }
            through_c_attn(&rows, None)
        };
        Some(Self {
            tokens: centred_times_gamma(&params[layout.wte.clone()]),
            positions: centred_times_gamma(&params[layout.wpe.clone()]),
            constant: match (beta, bias) {
                (Some(beta), bias) => through_c_attn(beta, bias),
                (None, Some(bias)) => bias.to_vec(),
                (None, None) => vec![0f32; 3 * c],
            },
        })
    }

    fn made_for(args: &ModelArgs) -> bool {
        args.vocab_size <= 4 * args.block_size
    }

    /// f32 elements of the tables, when they are made.
    fn len(args: &ModelArgs) -> usize {
        if Self::made_for(args) {
            (args.vocab_size + args.block_size + 1) * 3 * args.n_embd
        } else {
            0
        }
    }

    /// `qkv` (B x T, 3C) for `tokens` at positions from `pos0`, given each row's `rstd` from ln_1.
    fn qkv(&self, qkv: &mut [f32], tokens: &[u32], rstd: &[f32], t: usize, pos0: usize) {
        let c3 = self.constant.len();
        for (row, (out, (&token, &rstd))) in qkv.chunks_exact_mut(c3).zip(tokens.iter().zip(rstd)).enumerate() {
            let (token, position) = (&self.tokens[token as usize * c3..][..c3], &self.positions[(pos0 + row % t) * c3..][..c3]);
            for (((out, w), p), d) in out.iter_mut().zip(token).zip(position).zip(&self.constant) {
                *out = madd(rstd, w + p, *d);
            }
        }
    }
}

/// Per-sequence buffers, sequence after sequence: `B x len` elements each, with `len` as listed.
struct Buffers {
    /// (L, block, C) keys and values.
    keys: Vec<f32>,
    values: Vec<f32>,
    /// (block, C) or (block, 3C) or (block, 4C): rows of the positions in a pass.
    residual: Vec<f32>,
    ln: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    /// (block): LayerNorm statistics.
    mean: Vec<f32>,
    rstd: Vec<f32>,
    /// The attention's working memory: its (block, block) matrices in a prefill, one row of them
    /// against the cache, or [`last_window_attention`]'s vectors.
    scores: Vec<f32>,
    /// (V): the next token's logits.
    logits: Vec<f32>,
}

/// The buffers of a run of sequences, as the one thread that decodes them sees them.
struct Shard<'a> {
    keys: &'a mut [f32],
    values: &'a mut [f32],
    residual: &'a mut [f32],
    ln: &'a mut [f32],
    qkv: &'a mut [f32],
    atty: &'a mut [f32],
    fch: &'a mut [f32],
    fch_gelu: &'a mut [f32],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
    scores: &'a mut [f32],
    logits: &'a mut [f32],
}

/// f32 elements per sequence of each buffer, in the order of [`Buffers`]' fields.
fn lengths_per_sequence(args: &ModelArgs) -> [usize; 12] {
    let (block, c) = (args.block_size, args.n_embd);
    let cache = args.n_layer * block * c;
    [
        cache,
        cache,
        block * c,
        block * c,
        block * 3 * c,
        block * c,
        block * 4 * c,
        block * 4 * c,
        block,
        block,
        attention::scratch_len(block).max(last_window_scratch_len(args)),
        args.vocab_size,
    ]
}

/// f32 elements the decoder of `batch` sequences allocates for its buffers.
pub fn buffer_len(args: &ModelArgs, batch: usize) -> usize {
    batch * lengths_per_sequence(args).iter().sum::<usize>()
}

/// f32 elements of the decoder's transposed copy of the weights, with layer 0's tables.
pub fn transposed_weights_len(args: &ModelArgs) -> usize {
    args.n_layer * 12 * args.n_embd * args.n_embd + args.vocab_size * args.n_embd + FirstLayerTables::len(args)
}

impl Decoder {
    fn new(model: Weights, batch: usize) -> Self {
        let [keys, values, residual, ln, qkv, atty, fch, fch_gelu, mean, rstd, scores, logits] =
            lengths_per_sequence(model.args).map(|len| vec![0f32; batch * len]);
        let buffers = Buffers { keys, values, residual, ln, qkv, atty, fch, fch_gelu, mean, rstd, scores, logits };
        Self { batch, weights: Transposed::new(model), cached: 0, buffers }
    }

    /// Runs `tokens` (B x T, the next T positions of every sequence) through the model, appending
    /// their keys and values to the cache, and leaves the logits of each sequence's last position
    /// in `logits`. With an empty cache this is the prefill of a prompt or window.
    ///
    /// A pass of at most [`matmul::FEW_ROWS`] rows in all (a new position of a few sequences) is one
    /// shard, on a thread of the pool, whose products split their columns between the threads: such
    /// products are bound by reading the weights, which one shard does once rather than once per thread.
    /// Longer passes split the sequences into one shard per thread, each decoded start to end on its
    /// own thread with single-threaded kernels: a pass is too short to share each small product between
    /// threads. A single sequence runs on the calling thread, where gemm's products use every thread.
    fn forward(&mut self, model: Weights, tokens: &[u32], t: usize) {
        let block = model.args.block_size;
        let pos0 = self.cached;
        assert!(
            tokens.len() == self.batch * t && pos0 + t <= block,
            "decode: {t} new positions after {pos0} do not fit the block of {block}"
        );
        let threads = rayon::current_num_threads();
        if tokens.len() <= matmul::FEW_ROWS && threads > 1 {
            let (shards, transposed) = self.shards(model.args, self.batch);
            rayon::scope(|_| shards.into_iter().for_each(|shard| shard.forward(model, transposed, tokens, t, pos0, threads)));
        } else {
            let per_shard = self.batch.div_ceil(threads.min(self.batch));
            let (shards, transposed) = self.shards(model.args, per_shard);
            if shards.len() == 1 {
                shards.into_iter().for_each(|shard| shard.forward(model, transposed, tokens, t, pos0, 1));
            } else {
                shards
                    .into_par_iter()
                    .zip(tokens.par_chunks(per_shard * t))
                    .for_each(|(shard, tokens)| shard.forward(model, transposed, tokens, t, pos0, 1));
            }
        }
        self.cached += t;
    }

    /// The buffers cut into runs of `per_shard` sequences (the last run may be shorter), and the weights they share.
    fn shards(&mut self, args: &ModelArgs, per_shard: usize) -> (Vec<Shard<'_>>, &Transposed) {
        let Buffers { keys, values, residual, ln, qkv, atty, fch, fch_gelu, mean, rstd, scores, logits } = &mut self.buffers;
        let buffers = [keys, values, residual, ln, qkv, atty, fch, fch_gelu, mean, rstd, scores, logits];
        let mut parts =
            buffers.into_iter().zip(lengths_per_sequence(args)).map(|(buf, len)| buf.chunks_mut(per_shard * len)).collect::<Vec<_>>();
        let shards = (0..self.batch.div_ceil(per_shard))
            .map(|_| {
                let [keys, values, residual, ln, qkv, atty, fch, fch_gelu, mean, rstd, scores, logits] =
                    std::array::from_fn(|i| parts[i].next().expect("every buffer has a part per shard"));
                Shard { keys, values, residual, ln, qkv, atty, fch, fch_gelu, mean, rstd, scores, logits }
            })
            .collect();
        (shards, &self.weights)
    }
}

impl Shard<'_> {
    /// [`Decoder::forward`] for this shard's sequences: `tokens` holds T positions of each. The products of at most
    /// [`matmul::FEW_ROWS`] rows split their columns between `threads` threads.
    fn forward(self, model: Weights, transposed: &Transposed, tokens: &[u32], t: usize, pos0: usize, threads: usize) {
        let Weights { args, layout, params } = model;
        let (c, nh, block, v) = (args.n_embd, args.n_head, args.block_size, args.vocab_size);
        let (b, n) = (tokens.len() / t, tokens.len());
        let p = |r: &std::ops::Range<usize>| &params[r.clone()];
        let (x, ln, qkv, atty) = (&mut self.residual[..n * c], &mut self.ln[..n * c], &mut self.qkv[..n * 3 * c], &mut self.atty[..n * c]);
        let (fch, fch_gelu) = (&mut self.fch[..n * 4 * c], &mut self.fch_gelu[..n * 4 * c]);
        let (mean, rstd) = (&mut self.mean[..n], &mut self.rstd[..n]);

        embedding::forward(x, tokens, p(&layout.wte), &p(&layout.wpe)[pos0 * c..], t, c, None);
        // A pass over a whole block recomputes a cropped window and is the last to use this cache (the next pass
        // crops the window again): it writes no keys or values, and its attention reads them from `qkv`.
        let window = t == block && t > 1;
        for (l, (lp, [c_attn, attn_proj, c_fc, mlp_proj])) in layout.layers.iter().zip(&transposed.layers).enumerate() {
            let (w, bias) = lp.ln_1.get(params);
            let qkv_bias = lp.c_attn.get(params).1;
            // After the last layer's keys and values, only each sequence's last position matters: its query alone
            // is computed, and its row alone goes on, through attention and the MLP.
            let rows = if l + 1 == args.n_layer && t > 1 {
                layernorm::forward(ln, mean, rstd, x, w, bias);
                if window {
                    last_window_attention(&mut atty[..b * c], self.scores, ln, c_attn, qkv_bias, t, nh, threads);
                } else {
                    // c_attn's (transposed) columns are the query, key and value weights in turn: (C, 3C).
                    let kv = &mut qkv[..n * 2 * c];
                    matmul::forward_transposed(kv, ln, &c_attn[c..], 3 * c, qkv_bias.map(|b| &b[c..]), n, c, 2 * c, false, threads);
                    for (row, kv) in kv.chunks_exact(2 * c).enumerate() {
                        let slot = (((row / t) * args.n_layer + l) * block + pos0 + row % t) * c;
                        self.keys[slot..slot + c].copy_from_slice(&kv[..c]);
                        self.values[slot..slot + c].copy_from_slice(&kv[c..]);
                    }
                    keep_last_rows(ln, t, c);
                    let (ln, q) = (&ln[..b * c], &mut qkv[..b * c]);
                    matmul::forward_transposed(q, ln, c_attn, 3 * c, qkv_bias.map(|b| &b[..c]), b, c, c, false, threads);
                    let cache = Cache { keys: self.keys, values: self.values, layer: l, n_layer: args.n_layer, block, c };
                    attend_to_cache(&mut atty[..b * c], self.scores, q, c, 1, &cache, pos0 + t - 1, nh, threads);
                }
                keep_last_rows(x, t, c);
                b
            } else {
                match &transposed.first_layer {
                    Some(tables) if window && l == 0 => {
                        x.chunks_exact(c).zip(rstd.iter_mut()).for_each(|(x, rstd)| *rstd = layernorm::row_stats(x).1);
                        tables.qkv(qkv, tokens, rstd, t, pos0);
                    }
                    _ => {
                        layernorm::forward(ln, mean, rstd, x, w, bias);
                        matmul::forward_transposed(qkv, ln, c_attn, 3 * c, qkv_bias, n, c, 3 * c, false, threads);
                    }
                }
                if !window {
                    for (row, qkv) in qkv.chunks_exact(3 * c).enumerate() {
                        let slot = (((row / t) * args.n_layer + l) * block + pos0 + row % t) * c;
                        self.keys[slot..slot + c].copy_from_slice(&qkv[c..2 * c]);
                        self.values[slot..slot + c].copy_from_slice(&qkv[2 * c..]);
                    }
                }
                if pos0 == 0 && t > 1 {
                    attention::forward_in(atty, qkv, t, c, nh, self.scores);
                } else {
                    let cache = Cache { keys: self.keys, values: self.values, layer: l, n_layer: args.n_layer, block, c };
                    attend_to_cache(atty, self.scores, qkv, 3 * c, t, &cache, pos0, nh, threads);
                }
                n
            };
            let (x, ln, atty) = (&mut x[..rows * c], &mut ln[..rows * c], &mut atty[..rows * c]);
            let (fch, fch_gelu) = (&mut fch[..rows * 4 * c], &mut fch_gelu[..rows * 4 * c]);
            let (mean, rstd) = (&mut mean[..rows], &mut rstd[..rows]);
            matmul::forward_transposed(x, atty, attn_proj, c, lp.attn_proj.get(params).1, rows, c, c, true, threads);
            let (w, bias) = lp.ln_2.get(params);
            layernorm::forward(ln, mean, rstd, x, w, bias);
            matmul::forward_transposed(fch, ln, c_fc, 4 * c, lp.c_fc.get(params).1, rows, c, 4 * c, false, threads);
            gelu::forward(fch_gelu, fch, args.gelu == Gelu::Tanh);
            matmul::forward_transposed(x, fch_gelu, mlp_proj, c, lp.mlp_proj.get(params).1, rows, 4 * c, c, true, threads);
        }
        // Each sequence's last position is now its row of x (T = 1, or the last layer kept only it).
        let (x, ln) = (&x[..b * c], &mut ln[..b * c]);
        let (w, bias) = layout.ln_f.get(params);
        layernorm::forward(ln, &mut mean[..b], &mut rstd[..b], x, w, bias);
        matmul::forward_transposed(&mut self.logits[..b * v], ln, &transposed.wte, v, None, b, c, v, false, threads);
    }
}

/// Moves each sequence's last row (of `t` rows of `c`) to the front of `rows`, in sequence order.
fn keep_last_rows(rows: &mut [f32], t: usize, c: usize) {
    for seq in 0..rows.len() / (t * c) {
        let last = seq * t + t - 1;
        rows.copy_within(last * c..(last + 1) * c, seq * c);
    }
}

/// f32 elements of [`last_window_attention`]'s working memory per sequence: the query, and per head the key weights
/// applied to it, the probabilities and the weighted sum of LayerNorm rows.
fn last_window_scratch_len(args: &ModelArgs) -> usize {
    args.n_embd + args.n_head * (2 * args.n_embd + args.block_size)
}

/// The last layer's attention in a window pass: `atty` (B, C), the output at each sequence's last position, from
/// `ln` (B x T, C), ln_1's rows, and c_attn transposed (C, 3C) with its bias. The other positions' keys and values
/// are never formed. Per head h, with q the last query, ℓ_j the rows, and W_k, b_k, W_v, b_v its part of c_attn:
/// - q·k_j = ℓ_j·(W_k q) + q·b_k, and the second term is the same for every j, which softmax ignores;
/// - Σ_j p_j v_j = (Σ_j p_j ℓ_j) W_v + b_v, as the probabilities p_j sum to one.
///
/// A position then costs 2 x NH x C multiply-adds instead of the 2 x C² of its key and value rows.
#[allow(clippy::too_many_arguments)]
fn last_window_attention(
    atty: &mut [f32],
    scratch: &mut [f32],
    ln: &[f32],
    c_attn: &[f32],
    bias: Option<&[f32]>,
    t: usize,
    nh: usize,
    threads: usize,
) {
    let c = (c_attn.len() / 3).isqrt(); // c_attn is (C, 3C)
    let (b, hs) = (atty.len() / c, c / nh);
    let scale = 1.0 / (hs as f32).sqrt();
    let per_sequence = scratch.len() / b;
    assert!(ln.len() == b * t * c && per_sequence >= c + nh * (2 * c + t), "decode: last_window_attention's buffer sizes do not match");
    for (seq, (y, scratch)) in atty.chunks_exact_mut(c).zip(scratch.chunks_exact_mut(per_sequence)).enumerate() {
        let rows = &ln[seq * t * c..][..t * c];
        let (q, rest) = scratch.split_at_mut(c);
        let (keys_q, rest) = rest.split_at_mut(nh * c);
        let (probs, rest) = rest.split_at_mut(nh * t);
        let weighted = &mut rest[..nh * c];
        matmul::forward_transposed(q, &rows[(t - 1) * c..], c_attn, 3 * c, bias.map(|b| &b[..c]), 1, c, c, false, threads);
        // Row i of c_attn holds, per head, W_k's and W_v's row i: (W_k q)[i] is one dot product per head.
        for (i, w) in c_attn.chunks_exact(3 * c).enumerate() {
            for h in 0..nh {
                keys_q[h * c + i] = dot(&w[c + h * hs..][..hs], &q[h * hs..][..hs]);
            }
        }
        for (j, row) in rows.chunks_exact(c).enumerate() {
            for (h, keys_q) in keys_q.chunks_exact(c).enumerate() {
                probs[h * t + j] = dot(row, keys_q) * scale;
            }
        }
        for probs in probs.chunks_exact_mut(t) {
            let max = max(probs);
            let mut total = 0f32;
            probs.iter_mut().for_each(|p| {
                *p = exp(*p - max);
                total += *p;
            });
            probs.iter_mut().for_each(|p| *p /= total);
        }
        weighted.fill(0.0);
        for (j, row) in rows.chunks_exact(c).enumerate() {
            for (h, weighted) in weighted.chunks_exact_mut(c).enumerate() {
                let p = probs[h * t + j];
                weighted.iter_mut().zip(row).for_each(|(z, l)| *z = madd(p, *l, *z));
            }
        }
        match bias {
            Some(bias) => y.copy_from_slice(&bias[2 * c..]),
            None => y.fill(0.0),
        }
        for (i, w) in c_attn.chunks_exact(3 * c).enumerate() {
            for (h, y) in y.chunks_exact_mut(hs).enumerate() {
                let z = weighted[h * c + i];
                y.iter_mut().zip(&w[2 * c + h * hs..][..hs]).for_each(|(y, w)| *y = madd(z, *w, *y));
            }
        }
    }
}

/// The shard's KV cache as one layer's attention reads it: (B, L, block, C) keys and values.
struct Cache<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    layer: usize,
    n_layer: usize,
    block: usize,
    c: usize,
}

/// Causal attention of each sequence's `queries` new positions (rows of `q_width` in `qkv`, the query in the first
/// C of each) over `cache` up to each one's own position, `first` being that of each sequence's first query,
/// into `atty` (B x queries, C). Each (position, head) is one item, with `block` floats of `scores` for its weights;
/// with `threads` above one, the items are split between the threads of rayon's pool, on one of which this runs.
#[allow(clippy::too_many_arguments)]
fn attend_to_cache(
    atty: &mut [f32],
    scores: &mut [f32],
    qkv: &[f32],
    q_width: usize,
    queries: usize,
    cache: &Cache,
    first: usize,
    nh: usize,
    threads: usize,
) {
    let (c, block) = (cache.c, cache.block);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let item = |(index, (y, scores)): (usize, (&mut [f32], &mut [f32]))| {
        let (row, h) = (index / nh, index % nh);
        let (seq, seen) = (row / queries, first + row % queries + 1);
        let at = (seq * cache.n_layer + cache.layer) * block * c + h * hs;
        let (keys, values) = (&cache.keys[at..], &cache.values[at..]);
        let q = &qkv[row * q_width + h * hs..][..hs];
        let scores = &mut scores[..seen];
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &keys[j * c..][..hs]) * scale;
        }
        let max = max(scores);
        let mut total = 0f32;
        scores.iter_mut().for_each(|s| {
            *s = exp(*s - max);
            total += *s;
        });
        y.fill(0.0);
        for (j, &s) in scores.iter().enumerate() {
            let weight = s / total;
            y.iter_mut().zip(&values[j * c..][..hs]).for_each(|(y, v)| *y += weight * v);
        }
    };
    // atty's rows are the heads' outputs side by side: its hs-long chunks are the items in order.
    if threads > 1 {
        assert!(scores.len() >= atty.len() / hs * block, "decode: too little attention scratch for one row of weights per item");
        atty.par_chunks_mut(hs).zip(scores.par_chunks_mut(block)).enumerate().for_each(item);
    } else {
        atty.chunks_mut(hs).enumerate().for_each(|(index, y)| item((index, (y, &mut scores[..block]))));
    }
}

/// Sequences sampled together from one prompt, each with its own generator (seeded from its seed), so
/// that each equals what it would be alone: what to feed the next pass, and the sampling of its logits.
/// The passes themselves are a decoder's, on the CPU ([`Generation`]) or a GPU (decode_cuda.rs).
pub struct Sequences {
    /// (B, tokens so far): the prompt and what was sampled after it.
    tokens: Vec<Vec<u32>>,
    rngs: Vec<StdRng>,
    temperature: f64,
    top_k: Option<usize>,
    /// The top-k selection's working copy of a logits row.
    selection: Vec<f32>,
    /// The tokens fed to the next pass, and the tokens it sampled.
    feed: Vec<u32>,
    sampled: Vec<u32>,
}

impl Sequences {
    pub fn new(args: &ModelArgs, prompt: &[u32], seeds: &[u64], sample: &SampleArgs) -> candle_core::Result<Self> {
        sample::check(prompt, args.vocab_size, sample.temperature)?;
        if seeds.is_empty() {
            candle_core::bail!("nothing to generate: give at least one seed (one per sequence)");
        }
        Ok(Self {
            tokens: seeds.iter().map(|_| prompt.to_vec()).collect(),
            rngs: seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect(),
            temperature: sample.temperature,
            top_k: sample.top_k,
            selection: Vec::with_capacity(args.vocab_size),
            feed: Vec::with_capacity(seeds.len() * args.block_size),
            sampled: Vec::with_capacity(seeds.len()),
        })
    }

    /// What the next pass runs, given the positions its decoder has `cached`: the new positions of every
    /// sequence (B x T), T, and whether the cache must be emptied first. That is the last token alone while
    /// the text fits in `block`; otherwise the last `block` tokens, whose positions have all shifted.
    pub fn feed(&mut self, block: usize, cached: usize) -> (&[u32], usize, bool) {
        let len = self.tokens[0].len();
        self.feed.clear();
        if len > block || cached == 0 {
            let window = len.min(block);
            self.tokens.iter().for_each(|seq| self.feed.extend_from_slice(&seq[len - window..]));
            (&self.feed, window, true)
        } else {
            self.feed.extend(self.tokens.iter().map(|seq| seq[len - 1]));
            (&self.feed, 1, false)
        }
    }

    /// Samples each sequence's next token from its row of `logits` (B x V, modified in place by the
    /// temperature and top-k), appends it, and returns them.
    pub fn sample(&mut self, logits: &mut [f32], v: usize) -> &[u32] {
        self.sampled.clear();
        for ((logits, rng), seq) in logits.chunks_exact_mut(v).zip(&mut self.rngs).zip(&mut self.tokens) {
            let token = sample::sample_token(logits, self.temperature, self.top_k, &mut self.selection, rng);
            seq.push(token);
            self.sampled.push(token);
        }
        &self.sampled
    }

    /// The sequences so far, prompt included.
    pub fn sequences(&self) -> &[Vec<u32>] {
        &self.tokens
    }

    pub fn into_sequences(self) -> Vec<Vec<u32>> {
        self.tokens
    }
}

/// [`Sequences`] decoded on the CPU. It holds the transposed copy of the weights made when it starts, and
/// each step is given the weights themselves (embeddings, LayerNorms, biases), which must be those it started with.
pub struct Generation {
    decoder: Decoder,
    sequences: Sequences,
}

impl Generation {
    pub fn new(model: Weights, prompt: &[u32], seeds: &[u64], sample: &SampleArgs) -> candle_core::Result<Self> {
        let sequences = Sequences::new(model.args, prompt, seeds, sample)?;
        Ok(Self { decoder: Decoder::new(model, seeds.len()), sequences })
    }

    /// Samples the next token of every sequence and returns them.
    pub fn next_tokens(&mut self, model: Weights) -> &[u32] {
        let (feed, t, restart) = self.sequences.feed(model.args.block_size, self.decoder.cached);
        if restart {
            self.decoder.cached = 0;
        }
        self.decoder.forward(model, feed, t);
        self.sequences.sample(&mut self.decoder.buffers.logits, model.args.vocab_size)
    }

    /// The sequences so far, prompt included.
    pub fn sequences(&self) -> &[Vec<u32>] {
        self.sequences.sequences()
    }

    pub fn into_sequences(self) -> Vec<Vec<u32>> {
        self.sequences.into_sequences()
    }
}

/// One sequence per seed, each the prompt followed by `max_new_tokens` more tokens.
pub fn generate(model: Weights, prompt: &[u32], seeds: &[u64], sample: &SampleArgs) -> candle_core::Result<Vec<Vec<u32>>> {
    let mut generation = Generation::new(model, prompt, seeds, sample)?;
    for _ in 0..sample.max_new_tokens {
        generation.next_tokens(model);
    }
    Ok(generation.into_sequences())
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::train_step::{self, Activations};

    fn small(gelu: Gelu, bias: bool) -> ModelArgs {
        ModelArgs { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 11, bias, dropout: 0.0, gelu }
    }

    fn model(gelu: Gelu, bias: bool) -> (ModelArgs, ParamLayout, Vec<f32>) {
        model_of(small(gelu, bias))
    }

    fn model_of(args: ModelArgs) -> (ModelArgs, ParamLayout, Vec<f32>) {
        let layout = ParamLayout::new(&args);
        let mut rng = StdRng::seed_from_u64(5);
        let params = (0..layout.len).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        (args, layout, params)
    }

    /// The last position's logits from a full forward pass over `tokens` (one sequence, no cache).
    fn recomputed(args: &ModelArgs, layout: &ParamLayout, params: &[f32], tokens: &[u32]) -> Vec<f32> {
        let mut acts = Activations::new(args, 1, tokens.len());
        train_step::forward(args, layout, params, &mut acts, tokens, None);
        acts.last_logits(args.vocab_size).to_vec()
    }

    #[test]
    fn cached_logits_equal_a_full_recompute_at_every_position() {
        // Window passes take layer 0's products from tables for a small vocabulary only: 11 tokens against a block
        // of 8 (both biases, then neither), then 40 tokens (a product per position). One layer is both the first
        // and the last.
        let models = [
            small(Gelu::Erf, true),
            small(Gelu::Tanh, false),
            ModelArgs { vocab_size: 40, ..small(Gelu::Erf, true) },
            ModelArgs { n_layer: 1, ..small(Gelu::Erf, true) },
        ];
        for args in models {
            let (args, layout, params) = model_of(args);
            let block = args.block_size;
            assert_eq!(FirstLayerTables::made_for(&args), args.vocab_size == 11);
            let tokens: Vec<u32> = (0..3 * block as u32).map(|i| (i * 7 + 3) % args.vocab_size as u32).collect();
            let model = Weights { args: &args, layout: &layout, params: &params };
            let mut decoder = Decoder::new(model, 1);
            decoder.forward(model, &tokens[..3], 3);
            for len in 3..=tokens.len() {
                // Within the block, one new position against the cache; past it, the cropped window's prefill,
                // which starts the cache again as generation does.
                let context = &tokens[len.saturating_sub(block)..len];
                if len > block {
                    decoder.cached = 0;
                    decoder.forward(model, context, block);
                } else if len > 3 {
                    decoder.forward(model, &tokens[len - 1..len], 1);
                }
                let expected = recomputed(&args, &layout, &params, context);
                for (a, b) in decoder.buffers.logits.iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-5, "position {len}: cached {a} vs recomputed {b}");
                }
            }
        }
    }

    #[test]
    fn greedy_decoding_past_the_block_crops_the_context_as_nanogpt() {
        let (args, layout, params) = model(Gelu::Erf, true);
        let prompt = [1u32, 2, 3];
        let sample = SampleArgs { max_new_tokens: 3 * args.block_size, temperature: 1.0, top_k: Some(1), seed: 0 };
        let model = Weights { args: &args, layout: &layout, params: &params };
        let decoded = generate(model, &prompt, &[0], &sample).unwrap().remove(0);
        // nanoGPT's loop: every token from a full pass over the last block_size tokens.
        let mut expected = prompt.to_vec();
        while expected.len() < prompt.len() + sample.max_new_tokens {
            let window = &expected[expected.len().saturating_sub(args.block_size)..];
            let logits = recomputed(&args, &layout, &params, window);
            let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            expected.push(best as u32);
        }
        assert_eq!(decoded, expected);
    }

    #[test]
    fn batched_sequences_equal_sequential_ones() {
        let (args, layout, params) = model(Gelu::Erf, true);
        let sample = SampleArgs { max_new_tokens: 2 * args.block_size + 3, temperature: 0.9, top_k: Some(5), seed: 0 };
        let seeds = [11u64, 12, 13];
        let model = Weights { args: &args, layout: &layout, params: &params };
        // Two threads make two shards (two sequences and one) on any machine.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let batched = pool.install(|| generate(model, &[4, 5], &seeds, &sample)).unwrap();
        for (seed, together) in seeds.iter().zip(&batched) {
            let alone = generate(model, &[4, 5], &[*seed], &sample).unwrap().remove(0);
            assert_eq!(together, &alone, "seed {seed}");
        }
        assert_ne!(batched[0], batched[1], "different seeds should give different samples");
    }

    #[test]
    fn generation_never_grows_its_buffers() {
        let (args, layout, params) = model(Gelu::Erf, false);
        let sample = SampleArgs { max_new_tokens: 0, temperature: 1.0, top_k: None, seed: 0 };
        let model = Weights { args: &args, layout: &layout, params: &params };
        let mut generation = Generation::new(model, &[1], &[1, 2], &sample).unwrap();
        generation.next_tokens(model);
        let before = generation.decoder.buffers.keys.capacity()
            + generation.decoder.buffers.residual.capacity()
            + generation.sequences.feed.capacity();
        for _ in 0..3 * args.block_size {
            generation.next_tokens(model);
        }
        let after = generation.decoder.buffers.keys.capacity()
            + generation.decoder.buffers.residual.capacity()
            + generation.sequences.feed.capacity();
        assert_eq!(before, after);
        assert_eq!(generation.sequences()[0].len(), 2 + 3 * args.block_size);
    }
}
