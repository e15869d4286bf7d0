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
//! Shapes: B sequences, T new positions per pass, C = n_embd, NH heads, V vocab, L layers.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::kernels::{attention, dot, embedding, exp, gelu, layernorm, matmul};
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
    /// Positions already in the cache, the same for every sequence.
    cached: usize,
    /// (L, B, block, C) each.
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Per-position buffers for up to B x block rows.
    residual: Vec<f32>,
    ln: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    /// (B, block): one attention row per sequence.
    scores: Vec<f32>,
    /// (B, C): the last position of each sequence after the final LayerNorm.
    last: Vec<f32>,
    /// (B, V).
    logits: Vec<f32>,
}

/// f32 elements the decoder of `batch` sequences allocates.
pub fn buffer_len(args: &ModelArgs, batch: usize) -> usize {
    let (rows, c) = (batch * args.block_size, args.n_embd);
    let cache = 2 * args.n_layer * rows * c;
    let per_row = c + c + 2 + 3 * c + c + 4 * c + 4 * c + args.block_size;
    cache + rows * per_row + batch * (c + args.vocab_size)
}

impl Decoder {
    fn new(args: &ModelArgs, batch: usize) -> Self {
        let (rows, c) = (batch * args.block_size, args.n_embd);
        let z = |len: usize| vec![0f32; len];
        Self {
            batch,
            cached: 0,
            keys: z(args.n_layer * rows * c),
            values: z(args.n_layer * rows * c),
            residual: z(rows * c),
            ln: z(rows * c),
            mean: z(rows),
            rstd: z(rows),
            qkv: z(rows * 3 * c),
            atty: z(rows * c),
            fch: z(rows * 4 * c),
            fch_gelu: z(rows * 4 * c),
            scores: z(rows),
            last: z(batch * c),
            logits: z(batch * args.vocab_size),
        }
    }

    /// Runs `tokens` (B x T, the next T positions of every sequence) through the model, appending
    /// their keys and values to the cache, and leaves the logits of each sequence's last position
    /// in `self.logits`. With an empty cache this is the prefill of a prompt or window.
    fn forward(&mut self, model: Weights, tokens: &[u32], t: usize) {
        let Weights { args, layout, params } = model;
        let (b, c, nh, block) = (self.batch, args.n_embd, args.n_head, args.block_size);
        let (n, pos0) = (b * t, self.cached);
        assert!(tokens.len() == n && pos0 + t <= block, "decode: {t} new positions after {pos0} do not fit the block of {block}");
        let p = |r: &std::ops::Range<usize>| &params[r.clone()];
        let [x, ln, qkv, atty, fch, fch_gelu] =
            [&mut self.residual, &mut self.ln, &mut self.qkv, &mut self.atty, &mut self.fch, &mut self.fch_gelu].map(|buf| &mut buf[..]);
        let (x, ln, qkv, atty) = (&mut x[..n * c], &mut ln[..n * c], &mut qkv[..n * 3 * c], &mut atty[..n * c]);
        let (fch, fch_gelu) = (&mut fch[..n * 4 * c], &mut fch_gelu[..n * 4 * c]);
        let (mean, rstd) = (&mut self.mean[..n], &mut self.rstd[..n]);

        embedding::forward(x, tokens, p(&layout.wte), &p(&layout.wpe)[pos0 * c..], t, c, None);
        let layer_cache = b * block * c;
        for (l, lp) in layout.layers.iter().enumerate() {
            let (w, bias) = lp.ln_1.get(params);
            layernorm::forward(ln, mean, rstd, x, w, bias);
            let (w, bias) = lp.c_attn.get(params);
            matmul::forward(qkv, ln, w, bias, n, c, 3 * c, false);
            let keys = &mut self.keys[l * layer_cache..][..layer_cache];
            let values = &mut self.values[l * layer_cache..][..layer_cache];
            for (row, qkv_row) in qkv.chunks_exact(3 * c).enumerate() {
                let slot = ((row / t) * block + pos0 + row % t) * c;
                keys[slot..slot + c].copy_from_slice(&qkv_row[c..2 * c]);
                values[slot..slot + c].copy_from_slice(&qkv_row[2 * c..]);
            }
            if pos0 == 0 {
                attention::forward(atty, qkv, t, c, nh, None);
            } else {
                attend_to_cache(atty, &mut self.scores, qkv, keys, values, t, pos0, c, nh, block);
            }
            let (w, bias) = lp.attn_proj.get(params);
            matmul::forward(x, atty, w, bias, n, c, c, true);
            let (w, bias) = lp.ln_2.get(params);
            layernorm::forward(ln, mean, rstd, x, w, bias);
            let (w, bias) = lp.c_fc.get(params);
            matmul::forward(fch, ln, w, bias, n, c, 4 * c, false);
            gelu::forward(fch_gelu, fch, args.gelu == Gelu::Tanh);
            let (w, bias) = lp.mlp_proj.get(params);
            matmul::forward(x, fch_gelu, w, bias, n, 4 * c, c, true);
        }
        // Only the last position of each sequence predicts the next token.
        for (last, seq) in self.last.chunks_exact_mut(c).zip(x.chunks_exact(t * c)) {
            last.copy_from_slice(&seq[(t - 1) * c..]);
        }
        let (w, bias) = layout.ln_f.get(params);
        layernorm::forward(&mut ln[..b * c], &mut mean[..b], &mut rstd[..b], &self.last, w, bias);
        matmul::forward(&mut self.logits, &ln[..b * c], p(&layout.wte), None, b, c, args.vocab_size, false);
        self.cached += t;
    }
}

/// Causal attention of T new positions per sequence (queries in `qkv`, rows (B, T, 3C)) over the
/// `pos0 + T` cached positions, into `atty` (B, T, C); sequences run in parallel.
#[allow(clippy::too_many_arguments)]
fn attend_to_cache(
    atty: &mut [f32],
    scores: &mut [f32],
    qkv: &[f32],
    keys: &[f32],
    values: &[f32],
    t: usize,
    pos0: usize,
    c: usize,
    nh: usize,
    block: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    atty.par_chunks_mut(t * c).zip(scores.par_chunks_mut(block)).enumerate().for_each(|(seq, (out, scores))| {
        let (keys, values) = (&keys[seq * block * c..][..block * c], &values[seq * block * c..][..block * c]);
        for i in 0..t {
            let q_row = &qkv[(seq * t + i) * 3 * c..][..c];
            let seen = pos0 + i + 1;
            for h in 0..nh {
                let q = &q_row[h * hs..][..hs];
                let scores = &mut scores[..seen];
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = dot(q, &keys[j * c + h * hs..][..hs]) * scale;
                }
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0f32;
                scores.iter_mut().for_each(|s| {
                    *s = exp(*s - max);
                    total += *s;
                });
                let y = &mut out[i * c + h * hs..][..hs];
                y.fill(0.0);
                for (j, &s) in scores.iter().enumerate() {
                    let weight = s / total;
                    y.iter_mut().zip(&values[j * c + h * hs..][..hs]).for_each(|(y, v)| *y += weight * v);
                }
            }
        }
    });
}

/// Sequences sampled together from one prompt, each with its own generator (seeded from its
/// seed), so that each equals what it would be alone. It holds no model: each step is given the
/// weights, which must be those it started with.
pub struct Generation {
    decoder: Decoder,
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

impl Generation {
    pub fn new(args: &ModelArgs, prompt: &[u32], seeds: &[u64], sample: &SampleArgs) -> candle_core::Result<Self> {
        sample::check(prompt, args.vocab_size, sample.temperature)?;
        if seeds.is_empty() {
            candle_core::bail!("nothing to generate: give at least one seed (one per sequence)");
        }
        Ok(Self {
            decoder: Decoder::new(args, seeds.len()),
            tokens: seeds.iter().map(|_| prompt.to_vec()).collect(),
            rngs: seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect(),
            temperature: sample.temperature,
            top_k: sample.top_k,
            selection: Vec::with_capacity(args.vocab_size),
            feed: Vec::with_capacity(seeds.len() * args.block_size),
            sampled: Vec::with_capacity(seeds.len()),
        })
    }

    /// Samples the next token of every sequence and returns them.
    pub fn next_tokens(&mut self, model: Weights) -> &[u32] {
        let block = model.args.block_size;
        let len = self.tokens[0].len();
        self.feed.clear();
        if len > block || self.decoder.cached == 0 {
            let window = len.min(block);
            self.tokens.iter().for_each(|seq| self.feed.extend_from_slice(&seq[len - window..]));
            self.decoder.cached = 0;
            self.decoder.forward(model, &self.feed, window);
        } else {
            self.feed.extend(self.tokens.iter().map(|seq| seq[len - 1]));
            self.decoder.forward(model, &self.feed, 1);
        }
        let v = model.args.vocab_size;
        self.sampled.clear();
        for ((logits, rng), seq) in self.decoder.logits.chunks_exact_mut(v).zip(&mut self.rngs).zip(&mut self.tokens) {
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

/// One sequence per seed, each the prompt followed by `max_new_tokens` more tokens.
pub fn generate(model: Weights, prompt: &[u32], seeds: &[u64], sample: &SampleArgs) -> candle_core::Result<Vec<Vec<u32>>> {
    let mut generation = Generation::new(model.args, prompt, seeds, sample)?;
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

    fn model(gelu: Gelu, bias: bool) -> (ModelArgs, ParamLayout, Vec<f32>) {
        let args = ModelArgs { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 11, bias, dropout: 0.0, gelu };
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
        for (gelu, bias) in [(Gelu::Erf, true), (Gelu::Tanh, false)] {
            let (args, layout, params) = model(gelu, bias);
            let tokens: Vec<u32> = (0..args.block_size as u32).map(|i| (i * 7 + 3) % 11).collect();
            let model = Weights { args: &args, layout: &layout, params: &params };
            let mut decoder = Decoder::new(&args, 1);
            decoder.forward(model, &tokens[..3], 3);
            for len in 3..=tokens.len() {
                if len > 3 {
                    decoder.forward(model, &tokens[len - 1..len], 1);
                }
                let expected = recomputed(&args, &layout, &params, &tokens[..len]);
                for (a, b) in decoder.logits.iter().zip(&expected) {
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
        let batched = generate(model, &[4, 5], &seeds, &sample).unwrap();
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
        let mut generation = Generation::new(&args, &[1], &[1, 2], &sample).unwrap();
        generation.next_tokens(model);
        let before = generation.decoder.keys.capacity() + generation.decoder.residual.capacity() + generation.feed.capacity();
        for _ in 0..3 * args.block_size {
            generation.next_tokens(model);
        }
        let after = generation.decoder.keys.capacity() + generation.decoder.residual.capacity() + generation.feed.capacity();
        assert_eq!(before, after);
        assert_eq!(generation.sequences()[0].len(), 2 + 3 * args.block_size);
    }
}
