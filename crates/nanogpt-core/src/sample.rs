//! Autoregressive sampling as nanoGPT's `generate`: temperature, optional top-k, a multinomial
//! draw, the context cropped to the last `block_size` tokens. A KV cache makes each new token
//! cost one position while the sequence still fits in the block.

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
}

impl Sampler {
    pub fn new(model: &Gpt, prompt: &[u32], temperature: f64, top_k: Option<usize>, seed: u64) -> Result<Self> {
        if prompt.is_empty() {
            candle_core::bail!("the prompt is empty: give at least one token to start from");
        }
        let vocab = model.args.vocab_size;
        if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("prompt token id {bad} is out of range for vocab_size {vocab}");
        }
        if temperature <= 0.0 {
            candle_core::bail!("temperature must be positive, got {temperature}");
        }
        Ok(Self {
            tokens: prompt.to_vec(),
            cache: KvCache::new(model.args.n_layer),
            rng: StdRng::seed_from_u64(seed),
            temperature,
            top_k,
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
        let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        let token = sample_token(&logits, self.temperature, self.top_k, &mut self.rng);
        self.tokens.push(token);
        Ok(token)
    }
}

/// One multinomial draw from softmax(logits / temperature) after the top-k filter.
pub fn sample_token(logits: &[f32], temperature: f64, top_k: Option<usize>, rng: &mut StdRng) -> u32 {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let threshold = match top_k {
        Some(k) if k > 0 && k < scaled.len() => {
            let mut sorted = scaled.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[k - 1]
        }
        _ => f64::NEG_INFINITY,
    };
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|&l| if l < threshold { 0.0 } else { (l - max).exp() }).collect();
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if draw < *w {
            return i as u32;
        }
        draw -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}
