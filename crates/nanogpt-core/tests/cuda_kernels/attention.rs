//! kernels/cuda/attention against kernels::attention: the forward's output, its log-sum-exp (against
//! a direct f64 computation), and the backward's dqkv, with and without dropout on the weights.

use nanogpt_core::kernels::attention;
use nanogpt_core::kernels::cuda::{attention as cuda, Gpu, Precision};
use nanogpt_core::kernels::dropout::{DropoutKey, Mask, Site};
use nanogpt_core::model::{Gelu, ModelArgs};

use crate::gpu::{assert_close, from_bf16, gpu, gpu_landing_copies_early, gpu_with_shared_limit, random, to_bf16, Buffer};

/// Values the kernels can hold exactly in precision `x`.
fn representable(x: Precision, values: Vec<f32>) -> Vec<f32> {
    match x {
        Precision::F32 => values,
        Precision::Bf16 => from_bf16(&to_bf16(&values)),
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    t: usize,
    n_head: usize,
    hs: usize,
    dropout: Option<f32>,
    /// qkv and dout start one element past an aligned address, as a slice of a larger buffer may: the
    /// tensor-core kernels then copy tiles element by element rather than 16 bytes at a time.
    misaligned: bool,
}

/// Each query's log of the sum of exp(scaled score) over the keys it sees, in f64.
fn log_sum_exp(qkv: &[f32], case: Case) -> Vec<f32> {
    let Case { b, t, n_head, hs, .. } = case;
    let c = n_head * hs;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut lse = Vec::with_capacity(b * n_head * t);
    for row in 0..b {
        for h in 0..n_head {
            let at = |i: usize, part: usize, d: usize| qkv[(row * t + i) * 3 * c + part * c + h * hs + d] as f64;
            for i in 0..t {
                let scores: Vec<f64> = (0..=i).map(|j| (0..hs).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() * scale).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse.push((max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln()) as f32);
            }
        }
    }
    lse
}

/// Forward (out, lse) then backward (dqkv) on `gpu` against the CPU kernels, on inputs representable in
/// `x`; the backward takes the CUDA forward's out and lse, as training would.
fn check_on(gpu: &dyn Gpu, x: Precision, case: Case, tol: f32) {
    let Case { b, t, n_head, hs, dropout, misaligned } = case;
    let c = n_head * hs;
    let what = |name: &str| format!("{name} {x:?} {case:?}");
    let qkv = representable(x, random(b * t * 3 * c, 1.0, 11 + t as u64));
    let dout = representable(x, random(b * t * c, 1.0, 23 + t as u64));
    let mask = dropout.map(|p| Mask::new(DropoutKey { seed: 5, step: 2 }, Site::Attention(1), p));

    let mut want_out = vec![0f32; b * t * c];
    attention::forward(&mut want_out, &qkv, t, c, n_head, mask);
    let mut want_dqkv = vec![0f32; qkv.len()];
    attention::backward(&mut want_dqkv, &dout, &qkv, t, c, n_head, mask);

    let shift = misaligned as usize;
    let padded = |values: &[f32]| [vec![0.0; shift], values.to_vec()].concat();
    let (qkv_x, dout_x) = (Buffer::new(x, &padded(&qkv)), Buffer::new(x, &padded(&dout)));
    let skip = (shift * x.size_in_bytes()) as u64;
    let (qkv_addr, dout_addr) = (qkv_x.addr() + skip, dout_x.addr() + skip);
    // Outputs start as NaN so that an element left unwritten fails.
    let (out, lse) = (Buffer::unwritten(x, b * t * c), Buffer::unwritten(Precision::F32, b * n_head * t));
    cuda::forward(gpu, x, out.addr(), lse.addr(), qkv_addr, b, t, c, n_head, mask).unwrap();
    assert_close(&what("out"), &out.values(), &want_out, tol);
    assert_close(&what("lse"), &lse.values(), &log_sum_exp(&qkv, case), tol);

    let (dqkv, delta) = (Buffer::unwritten(x, qkv.len()), Buffer::unwritten(Precision::F32, b * n_head * t));
    cuda::backward(gpu, x, dqkv.addr(), dout_addr, qkv_addr, out.addr(), lse.addr(), delta.addr(), b, t, c, n_head, mask).unwrap();
    assert_close(&what("dqkv"), &dqkv.values(), &want_dqkv, tol);
}

fn check(x: Precision, case: Case, tol: f32) {
    check_on(gpu(), x, case, tol);
}

/// Sequence lengths of one token, less than a tile, and over two and several tiles of 32.
fn head_size_16_cases() -> impl Iterator<Item = Case> {
    [1, 7, 33, 70]
        .into_iter()
        .flat_map(|t| [None, Some(0.2)].map(|dropout| Case { b: 2, t, n_head: 2, hs: 16, dropout, misaligned: false }))
}

#[test]
fn f32_matches_the_cpu_kernels_at_head_size_16() {
    head_size_16_cases().for_each(|case| check(Precision::F32, case, 1e-5));
}

#[test]
fn bf16_matches_the_cpu_kernels_at_head_size_16() {
    head_size_16_cases().for_each(|case| check(Precision::Bf16, case, 1e-2));
}

#[test]
fn every_head_size_matches_the_cpu_kernels() {
    for hs in [32, 64, 128] {
        for dropout in [None, Some(0.2)] {
            let case = Case { b: 1, t: 20, n_head: 2, hs, dropout, misaligned: false };
            check(Precision::F32, case, 1e-5);
            check(Precision::Bf16, case, 1e-2);
        }
    }
}

/// The tensor-core kernels (bf16 at head sizes 64 and 128) over several blocks of rows (128 at head size 64,
/// 64 at 128) and tiles of 64, the last ones partial, with inputs aligned for 16-byte copies and not, and over
/// two sequences of two heads; their double-buffered tiles with asynchronous copies landing at either end of what
/// a GPU allows (see [`gpu_landing_copies_early`]).
#[test]
fn bf16_tensor_core_kernels_match_the_cpu_kernels_over_several_tiles() {
    for gpu in [gpu(), gpu_landing_copies_early()] {
        check_tensor_core_kernels(gpu, &[(64, 150), (128, 130)]);
    }
}

/// The same at head size 64 with 16 rows a warp (64-row blocks), the shape a GPU may be asked for.
#[test]
fn bf16_tensor_core_kernels_with_16_rows_a_warp_match_the_cpu_kernels() {
    for gpu in [gpu(), gpu_landing_copies_early()] {
        let gpu = cuda::WithAttention { gpu, kernels: cuda::AttentionKernels::Engine, warp_rows: cuda::WarpRows::Sixteen };
        check_tensor_core_kernels(&gpu, &[(64, 150)]);
    }
}

fn check_tensor_core_kernels(gpu: &dyn Gpu, head_sizes_and_lengths: &[(usize, usize)]) {
    for &(hs, t) in head_sizes_and_lengths {
        for dropout in [None, Some(0.2)] {
            for misaligned in [false, true] {
                check_on(gpu, Precision::Bf16, Case { b: 1, t, n_head: 1, hs, dropout, misaligned }, 1e-2);
            }
        }
        check_on(gpu, Precision::Bf16, Case { b: 2, t: 70, n_head: 2, hs, dropout: Some(0.2), misaligned: false }, 1e-2);
    }
}

/// Asked for cuDNN, a GPU runs bf16 passes without dropout over 16-byte aligned buffers there and every other pass
/// on the engine's kernels: the emulator has no cuDNN, so the first refuse and the others match the CPU kernels.
#[test]
fn only_bf16_passes_without_dropout_go_to_cudnn() {
    let gpu = cuda::WithAttention { gpu: gpu(), kernels: cuda::AttentionKernels::Cudnn, warp_rows: cuda::WarpRows::ThirtyTwo };
    let buffer = Buffer::f32(&[0.0]);
    let a = buffer.addr();
    let err = cuda::forward(&gpu, Precision::Bf16, a, a, a, 1, 4, 128, 2, None).unwrap_err();
    assert!(err.to_string().contains("cuDNN attention"), "{err}");
    let err = cuda::backward(&gpu, Precision::Bf16, a, a, a, a, a, a, 1, 4, 128, 2, None).unwrap_err();
    assert!(err.to_string().contains("cuDNN attention"), "{err}");
    let case = |dropout, misaligned| Case { b: 1, t: 20, n_head: 2, hs: 64, dropout, misaligned };
    check_on(&gpu, Precision::Bf16, case(Some(0.2), false), 1e-2);
    check_on(&gpu, Precision::Bf16, case(None, true), 1e-2);
    check_on(&gpu, Precision::F32, case(None, false), 1e-5);
}

#[test]
fn unsupported_head_sizes_are_refused() {
    let buffer = Buffer::f32(&[0.0]);
    let err = cuda::forward(gpu(), Precision::F32, buffer.addr(), buffer.addr(), buffer.addr(), 1, 4, 48, 2, None).unwrap_err();
    assert!(err.to_string().contains("no CUDA kernel for head size 24"), "{err}");
    let err = cuda::backward(gpu(), Precision::F32, 0, 0, 0, 0, 0, 0, 1, 4, 50, 3, None).unwrap_err();
    assert!(err.to_string().contains("n_head=3 must be positive and divide C=50"), "{err}");
}

/// A GPU with 99 KiB of shared memory a block (compute capability 8.6, 8.9, 12.0) has no room for the bf16 backward
/// kernels at head size 128: the fused step refuses the model when it is set up, naming the ways out.
#[test]
fn a_model_whose_kernels_need_more_shared_memory_than_the_gpu_has_is_refused_at_set_up() {
    let model = |n_embd, n_head| ModelArgs {
        n_layer: 1,
        n_head,
        n_embd,
        block_size: 8,
        vocab_size: 11,
        bias: false,
        dropout: 0.0,
        gelu: Gelu::Erf,
    };
    let check = nanogpt_core::kernels::cuda::check_model;
    let small = gpu_with_shared_limit(99 * 1024);
    let err = check(&small, &model(256, 2), Precision::Bf16).unwrap_err().to_string();
    assert!(err.contains("bfloat16 attention at head size 128 needs 102 KiB of shared memory a block"), "{err}");
    assert!(err.contains("more than this GPU's 99 KiB; choose n_head so that C / n_head is 64"), "{err}");
    assert!(err.ends_with("or train on candle's graph instead: NANOGPT_CUDA_STEP=graph"), "{err}");
    check(&small, &model(256, 4), Precision::Bf16).unwrap();
    check(&small, &model(256, 2), Precision::F32).unwrap();
    check(&gpu_with_shared_limit(227 * 1024), &model(256, 2), Precision::Bf16).unwrap();
    let on_cudnn = cuda::WithAttention { gpu: &small, kernels: cuda::AttentionKernels::Cudnn, warp_rows: cuda::WarpRows::default() };
    check(&on_cudnn, &model(256, 2), Precision::Bf16).unwrap();
    let with_dropout = ModelArgs { dropout: 0.1, ..model(256, 2) };
    assert!(check(&on_cudnn, &with_dropout, Precision::Bf16).is_err());
    let err = check(&small, &model(96, 1), Precision::F32).unwrap_err().to_string();
    assert!(err.contains("no CUDA kernel for head size 96"), "{err}");
    let err = check(&small, &model(8192, 64), Precision::F32).unwrap_err().to_string();
    assert!(err.contains("C = 8192 is more than"), "{err}");
}
