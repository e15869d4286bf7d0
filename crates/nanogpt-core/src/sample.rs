//! Autoregressive sampling as nanoGPT's `generate`: temperature, optional top-k, a multinomial
//! draw, the context cropped to the last `block_size` tokens. This is the candle model's path (a
//! GPU, or mixed precision); the CPU engine decodes without a graph in `decode.rs`, with the same
//! sampling functions below. A KV cache makes each new token cost one position while the sequence
//! still fits in the block.

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{Gpt, KvCache};

#[derive(Clone, Debug)]
pub struct SampleArgs {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Keep only the `top_k` largest logits (ties with the k-th survive); None keeps all.
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// Refuses what nanoGPT's `generate` cannot sample from.
pub fn check(prompt: &[u32], vocab_size: usize, temperature: f64) -> Result<()> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt is empty: give at least one token to start from");
    }
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab_size) {
        candle_core::bail!("prompt token id {bad} is out of range for vocab_size {vocab_size}");
    }
    if temperature <= 0.0 {
        candle_core::bail!("temperature must be positive, got {temperature}");
    }
    Ok(())
}

/// The prompt followed by `max_new_tokens` sampled tokens: a `Sampler` run that many steps.
pub fn generate(model: &Gpt, prompt: &[u32], args: &SampleArgs) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(model, prompt, args.temperature, args.top_k, args.seed)?;
    for _ in 0..args.max_new_tokens {
        sampler.next_token(model)?;
    }
    Ok(sampler.tokens)
}

/// Generation one token at a time: the tokens so far, their KV cache and the random stream. The same
/// seed gives the same tokens as `generate`. The cache belongs to the model given to `new`: pass that
/// model to every `next_token`, and start a new sampler after changing its weights.
pub struct Sampler {
    tokens: Vec<u32>,
    cache: KvCache,
    rng: StdRng,
    temperature: f64,
    top_k: Option<usize>,
    /// The top-k selection's working copy of the logits.
    selection: Vec<f32>,
}

impl Sampler {
    pub fn new(model: &Gpt, prompt: &[u32], temperature: f64, top_k: Option<usize>, seed: u64) -> Result<Self> {
        check(prompt, model.args.vocab_size, temperature)?;
        Ok(Self {
            tokens: prompt.to_vec(),
            cache: KvCache::new(model.args.n_layer),
            rng: StdRng::seed_from_u64(seed),
            temperature,
            top_k,
            selection: Vec::with_capacity(model.args.vocab_size),
        })
    }

    /// The prompt and every token sampled so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Samples the next token, appends it and returns it.
    pub fn next_token(&mut self, model: &Gpt) -> Result<u32> {
        let block_size = model.args.block_size;
        let logits = if self.tokens.len() <= block_size {
            let unseen = &self.tokens[self.cache.len()..];
            let idx = Tensor::new(unseen, model.device())?.unsqueeze(0)?;
            model.next_token_logits(&idx, Some(&mut self.cache))?
        } else {
            // Cropping shifts every position, so cached keys and values no longer apply: recompute
            // the window, exactly as nanoGPT does at every step.
            let window = &self.tokens[self.tokens.len() - block_size..];
            let idx = Tensor::new(window, model.device())?.unsqueeze(0)?;
            model.next_token_logits(&idx, None)?
        };
        let mut logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        let token = sample_token(&mut logits, self.temperature, self.top_k, &mut self.selection, &mut self.rng);
        self.tokens.push(token);
        Ok(token)
    }
}

/// nanoGPT's sampling weights, in place: `logits / temperature`, every logit below the k-th largest
/// dropped (ties with it kept), then exp(logit - max), the softmax before its normalisation, whose
/// sum is returned. The k-th largest comes from a partial selection on `selection`, not a sort.
pub fn weights_in_place(logits: &mut [f32], temperature: f64, top_k: Option<usize>, selection: &mut Vec<f32>) -> f64 {
    let temperature = temperature as f32;
    logits.iter_mut().for_each(|l| *l /= temperature);
    let threshold = match top_k {
        Some(k) if k > 0 && k < logits.len() => {
            selection.clear();
            selection.extend_from_slice(logits);
            *selection.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
        }
        _ => f32::NEG_INFINITY,
    };
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f64;
    for l in logits.iter_mut() {
        *l = if *l < threshold { 0.0 } else { ((*l - max) as f64).exp() as f32 };
        total += *l as f64;
    }
    total
}

/// One multinomial draw from softmax(logits / temperature) after the top-k filter; `logits` is
/// overwritten with the unnormalised weights.
pub fn sample_token(logits: &mut [f32], temperature: f64, top_k: Option<usize>, selection: &mut Vec<f32>, rng: &mut StdRng) -> u32 {
    let total = weights_in_place(logits, temperature, top_k, selection);
    let mut draw = rng.random::<f64>() * total;
    for (i, &w) in logits.iter().enumerate() {
        if draw < w as f64 {
            return i as u32;
        }
        draw -= w as f64;
    }
    logits.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}
