//! Generation on a GPU (decode_cuda.rs) against the CPU: each pass's logits against a full forward pass of
//! the CPU training step over the same context, before the block is full and past it (where every pass is
//! a prefill of the shifted window), and whole generations against the CPU decoder's for the same seeds.

use nanogpt_core::decode::{self, Weights};
use nanogpt_core::decode_cuda::{self, CudaDecoder};
use nanogpt_core::kernels::cuda::{Gpu, Precision};
use nanogpt_core::model::{Gelu, ModelArgs};
use nanogpt_core::sample::SampleArgs;
use nanogpt_core::train_step::{self, Activations, ParamLayout};

use std::sync::Arc;

use crate::gpu::{assert_close, gpu_with_shared_limit, on_cuda_device, random, shared_gpu};

fn model(bias: bool, gelu: Gelu) -> (ModelArgs, Vec<f32>) {
    let args = ModelArgs { n_layer: 2, n_head: 2, n_embd: 32, block_size: 8, vocab_size: 19, bias, dropout: 0.0, gelu };
    let params = random(ParamLayout::new(&args).len, 0.3, 21);
    (args, params)
}

/// The last position's logits from the CPU step's full forward pass over `tokens` (one sequence).
fn recomputed(args: &ModelArgs, params: &[f32], tokens: &[u32]) -> Vec<f32> {
    let layout = ParamLayout::new(args);
    let mut acts = Activations::new(args, 1, tokens.len());
    train_step::forward(args, &layout, params, &mut acts, tokens, None);
    acts.last_logits(args.vocab_size).to_vec()
}

#[test]
fn cached_logits_equal_a_full_recompute_before_and_past_the_block() {
    for (x, tolerance) in [(Precision::F32, if on_cuda_device() { 2e-3 } else { 1e-5 }), (Precision::Bf16, 5e-2)] {
        for (bias, gelu) in [(true, Gelu::Erf), (false, Gelu::Tanh)] {
            let (args, params) = model(bias, gelu);
            let block = args.block_size;
            // Two sequences: the second's tokens are the first's shifted, so that their rows differ.
            let text: Vec<u32> = (0..2 * block as u32 + 3).map(|i| (i * 7 + 3) % 19).collect();
            let other: Vec<u32> = text.iter().map(|&tok| (tok + 5) % 19).collect();
            let weights = decode_cuda::upload_weights(&shared_gpu(), x, &params).unwrap();
            let mut decoder = CudaDecoder::new(shared_gpu(), &args, x, weights, 2).unwrap();
            let prompt = 3;
            for len in prompt..=text.len() {
                // The prompt as one prefill, then one position per pass, then the window once it is past the block.
                let (t, restart) = if len == prompt || len > block { (len.min(block), true) } else { (1, false) };
                let feed: Vec<u32> = [&text, &other].iter().flat_map(|seq| seq[len - t..len].to_vec()).collect();
                let logits = decoder.forward(&feed, t, restart).unwrap().to_vec();
                for (s, seq) in [&text, &other].into_iter().enumerate() {
                    let want = recomputed(&args, &params, &seq[len.saturating_sub(block)..len]);
                    let what = format!("{x:?} bias={bias} {gelu:?} sequence {s} at length {len}");
                    assert_close(&what, &logits[s * args.vocab_size..][..args.vocab_size], &want, tolerance);
                }
            }
        }
    }
}

#[test]
fn generation_gives_the_cpu_decoders_sequences() {
    if on_cuda_device() {
        // A sampled token follows its logits exactly only where the products are exact f32; a device's TF32
        // products move them by about 1e-3, which the logits test above allows for.
        eprintln!("decode: exact sequences need exact f32 products, which the emulator has and a device does not; not compared here");
        return;
    }
    let (args, params) = model(true, Gelu::Erf);
    let layout = ParamLayout::new(&args);
    let cpu = Weights { args: &args, layout: &layout, params: &params };
    let seeds = [3u64, 4, 5];
    for top_k in [Some(1), Some(5), None] {
        let sample = SampleArgs { max_new_tokens: 2 * args.block_size + 2, temperature: 0.9, top_k, seed: 0 };
        let want = decode::generate(cpu, &[1, 2], &seeds, &sample).unwrap();
        let got = decode_cuda::generate(shared_gpu(), &args, Precision::F32, &params, &[1, 2], &seeds, &sample).unwrap();
        assert_eq!(got, want, "top_k {top_k:?}");
    }
}

#[test]
fn a_generation_the_decoder_cannot_launch_is_refused_before_anything_is_allocated() {
    let refusal = |gpu: Arc<dyn Gpu + Send + Sync>, args: &ModelArgs, batch: usize| {
        let params = random(ParamLayout::new(args).len, 0.3, 21);
        let weights = decode_cuda::upload_weights(&shared_gpu(), Precision::F32, &params).unwrap();
        CudaDecoder::new(gpu, args, Precision::F32, weights, batch).err().map(|e| e.to_string())
    };
    let (args, _) = model(true, Gelu::Erf);
    // One block per sequence along the attention grid's z, which CUDA caps at 65535.
    assert_eq!(
        refusal(shared_gpu(), &args, 65536).as_deref(),
        Some("the GPU decodes at most 65535 sequences at once, not 65536: lower num_samples; or sample on candle's graph instead: NANOGPT_CUDA_STEP=graph")
    );
    // A score per cached position in shared memory: 16384 positions take 64 KiB and more.
    let long = ModelArgs { block_size: 16384, ..args };
    let small: Arc<dyn Gpu + Send + Sync> = Arc::new(gpu_with_shared_limit(48 * 1024));
    let message = refusal(small, &long, 1).expect("a context beyond the shared memory is refused");
    assert!(
        message.starts_with(
            "block_size 16384 needs 65 KiB of shared memory a block in the GPU decoder's attention, more than this GPU's 48 KiB;"
        ),
        "{message}"
    );
    assert!(refusal(Arc::new(gpu_with_shared_limit(227 * 1024)), &long, 1).is_none(), "227 KiB hold it");
}
