//! encoder.cu against kernels/embedding.rs, with and without the embedding dropout.

use nanogpt_core::kernels::cuda::{encoder, Precision};
use nanogpt_core::kernels::dropout::{DropoutKey, Mask, Site};
use nanogpt_core::kernels::embedding as cpu;

use crate::gpu::{assert_close, device_i32, gpu, random, tolerance, Buffer};

// An odd shape: C not a multiple of 32; a vocabulary small enough that tokens repeat within the batch (the
// case dwte's atomic adds exist for); wpe with more rows than T, as a block_size beyond the batch's T.
const B: usize = 3;
const T: usize = 5;
const C: usize = 83;
const V: usize = 7;
const POSITIONS: usize = 9;

fn tokens() -> Vec<i32> {
    (0..B * T).map(|i| ((i * 5 + 3) % V) as i32).collect()
}

fn cpu_tokens(tokens: &[i32]) -> Vec<u32> {
    tokens.iter().map(|&t| t as u32).collect()
}

fn check_forward(x: Precision, mask: Option<Mask>) {
    let tokens = tokens();
    let device_tokens = device_i32(&tokens);
    let wte = Buffer::new(x, &random(V * C, 1.0, 1));
    let wpe = Buffer::new(x, &random(POSITIONS * C, 1.0, 2));
    let out = Buffer::new(x, &vec![0.0; B * T * C]);
    encoder::forward(gpu(), x, out.addr(), device_tokens.addr, wte.addr(), wpe.addr(), B, T, C, mask).unwrap();
    let mut want = vec![0.0; B * T * C];
    cpu::forward(&mut want, &cpu_tokens(&tokens), &wte.values(), &wpe.values(), T, C, mask);
    assert_close(&format!("encoder {x:?} dropout={}", mask.is_some()), &out.values(), &want, tolerance(x));
}

fn check_backward(x: Precision, mask: Option<Mask>) {
    let tokens = tokens();
    let device_tokens = device_i32(&tokens);
    let dout = Buffer::new(x, &random(B * T * C, 1.0, 3));
    // Gradients already there (the tied output layer's, earlier micro-steps'), which the kernel adds to.
    let (dwte, dwpe) = (Buffer::f32(&random(V * C, 1.0, 4)), Buffer::f32(&random(POSITIONS * C, 1.0, 5)));
    let (mut want_dwte, mut want_dwpe, mut want_dout) = (dwte.values(), dwpe.values(), dout.values());
    cpu::backward(&mut want_dwte, &mut want_dwpe, &mut want_dout, &cpu_tokens(&tokens), T, C, mask, true);
    encoder::backward(gpu(), x, dwte.addr(), dwpe.addr(), dout.addr(), device_tokens.addr, B, T, C, mask).unwrap();
    let what = format!("encoder backward {x:?} dropout={}", mask.is_some());
    assert_close(&format!("{what}: dout"), &dout.values(), &want_dout, tolerance(x));
    // dwte and dwpe sum the same float gradients in both precisions (the kernel sums them before rounding dout).
    assert_close(&format!("{what}: dwte"), &dwte.values(), &want_dwte, 1e-5);
    assert_close(&format!("{what}: dwpe"), &dwpe.values(), &want_dwpe, 1e-5);
}

#[test]
fn forward_matches_cpu_with_and_without_dropout() {
    let mask = Mask::new(DropoutKey { seed: 11, step: 4 }, Site::Embedding, 0.2);
    for x in [Precision::F32, Precision::Bf16] {
        for mask in [None, Some(mask)] {
            check_forward(x, mask);
        }
    }
}

#[test]
fn backward_matches_cpu_with_and_without_dropout() {
    let mask = Mask::new(DropoutKey { seed: 11, step: 4 }, Site::Embedding, 0.2);
    for x in [Precision::F32, Precision::Bf16] {
        for mask in [None, Some(mask)] {
            check_backward(x, mask);
        }
    }
}
