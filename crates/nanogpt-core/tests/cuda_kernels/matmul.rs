//! Device memory and matrix products on the Gpu: DeviceBuffer's copies, `gemm` against a plain product in
//! f64 in every transpose and precision combination, and kernels/cuda/matmul.rs's linear layer against
//! kernels/matmul.rs.

use nanogpt_core::kernels::cuda::{bias, matmul, DeviceBuffer, Gemm, Precision};
use nanogpt_core::kernels::matmul as cpu;

use crate::gpu::{assert_close, device_buffer, device_values, gpu, on_cuda_device, random, shared_gpu, Buffer};

// Odd shapes: no dimension a multiple of a warp, a tile or a block.
const N: usize = 37;
const C: usize = 29;
const OC: usize = 45;

/// Tolerance of a product's output: bf16 outputs are rounded to 8 bits; f32 inputs are rounded to TF32's
/// 11 bits on a CUDA device; bf16 inputs multiply exactly in f32, which leaves the sums' rounding.
fn product_tolerance(inputs: Precision, output: Precision) -> f32 {
    if output == Precision::Bf16 || (inputs == Precision::F32 && on_cuda_device()) {
        1e-2
    } else {
        1e-5
    }
}

/// Values as a precision holds them.
fn rounded(x: Precision, values: &[f32]) -> Vec<f32> {
    device_values(x, &device_buffer(x, values))
}

#[test]
fn device_buffer_round_trips() {
    let gpu = shared_gpu();
    let buffer = DeviceBuffer::zeroed(&gpu, 4 * 1037).unwrap();
    assert_eq!(buffer.bytes, 4 * 1037);
    assert!(buffer.download_f32().unwrap().iter().all(|&v| v == 0.0), "a new buffer is zero-filled");

    let values = random(1037, 3.0, 1);
    buffer.upload_f32(&values).unwrap();
    assert_eq!(buffer.download_f32().unwrap(), values);

    let tokens: Vec<i32> = (0..1037).map(|i| i * 48_611 - 25_000_000).collect();
    buffer.upload_i32(&tokens).unwrap();
    assert_eq!(buffer.download_i32().unwrap(), tokens);

    // A shorter upload writes the first bytes only.
    buffer.upload_bytes(&[7u8; 10]).unwrap();
    let bytes = buffer.download_bytes().unwrap();
    assert_eq!(&bytes[..10], &[7u8; 10]);
    assert_eq!(bytes[10..], tokens.iter().flat_map(|t| t.to_ne_bytes()).collect::<Vec<u8>>()[10..]);

    // `zero` clears a range inside the buffer and leaves the rest.
    buffer.upload_f32(&values).unwrap();
    gpu.zero(buffer.addr + 4 * 100, 4 * 200).unwrap();
    let got = buffer.download_f32().unwrap();
    assert!(got[100..300].iter().all(|&v| v == 0.0));
    assert_eq!(got[..100], values[..100]);
    assert_eq!(got[300..], values[300..]);

    let error = buffer.upload_bytes(&vec![0u8; 4 * 1037 + 1]).unwrap_err().to_string();
    assert!(error.contains("do not fit"), "{error}");

    let empty = DeviceBuffer::zeroed(&gpu, 0).unwrap();
    assert_eq!(empty.addr, 0);
    assert!(empty.download_bytes().unwrap().is_empty());
}

/// alpha op(A) op(B) + beta C + bias in f64, from the stored matrices, transposed into place first.
fn reference(g: &Gemm, a: &[f32], b: &[f32], c: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let Gemm { m, n, k, .. } = *g;
    let transposed =
        |x: &[f32], rows: usize, cols: usize| -> Vec<f32> { (0..cols).flat_map(|j| (0..rows).map(move |i| x[i * cols + j])).collect() };
    let a = if g.transpose_a { transposed(a, k, m) } else { a.to_vec() };
    let b = if g.transpose_b { transposed(b, n, k) } else { b.to_vec() };
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let product: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
            let row_bias = bias.map_or(0.0, |bias| bias[j] as f64);
            out[i * n + j] = (g.alpha as f64 * product + g.beta as f64 * c[i * n + j] as f64 + row_bias) as f32;
        }
    }
    out
}

#[test]
fn gemm_matches_reference() {
    let (m, n, k) = (13, 37, 29);
    let combinations = [(Precision::F32, Precision::F32), (Precision::Bf16, Precision::F32), (Precision::Bf16, Precision::Bf16)];
    for (inputs, output) in combinations {
        for (transpose_a, transpose_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for (beta, with_bias) in [(0.0, false), (1.0, false), (0.0, true), (1.0, true)] {
                let a = rounded(inputs, &random(m * k, 1.0, 1));
                let b = rounded(inputs, &random(k * n, 1.0, 2));
                let c = rounded(output, &random(m * n, 1.0, 3));
                let bias = rounded(output, &random(n, 1.0, 4));
                let (a_buffer, b_buffer, c_buffer) = (device_buffer(inputs, &a), device_buffer(inputs, &b), device_buffer(output, &c));
                let bias_buffer = device_buffer(output, &bias);
                let g = Gemm {
                    m,
                    n,
                    k,
                    a: a_buffer.addr,
                    transpose_a,
                    b: b_buffer.addr,
                    transpose_b,
                    c: c_buffer.addr,
                    inputs,
                    output,
                    alpha: 1.5,
                    beta,
                    bias: with_bias.then_some(bias_buffer.addr),
                };
                gpu().gemm(&g).unwrap();
                let what = format!(
                    "gemm {inputs:?} -> {output:?} transpose_a={transpose_a} transpose_b={transpose_b} beta={beta} bias={with_bias}"
                );
                let want = reference(&g, &a, &b, &c, with_bias.then_some(&bias[..]));
                assert_close(&what, &device_values(output, &c_buffer), &want, product_tolerance(inputs, output));
            }
        }
    }
}

#[test]
fn gemm_refuses_what_cublas_cannot_do() {
    let buffer = device_buffer(Precision::F32, &[0.0; 16]);
    let g = Gemm {
        m: 4,
        n: 4,
        k: 1,
        a: buffer.addr,
        transpose_a: false,
        b: buffer.addr,
        transpose_b: false,
        c: buffer.addr,
        inputs: Precision::F32,
        output: Precision::Bf16,
        alpha: 1.0,
        beta: 0.0,
        bias: None,
    };
    let error = gpu().gemm(&g).unwrap_err().to_string();
    assert!(error.contains("f32 inputs with a bf16 output"), "{error}");
    let error = gpu().gemm(&Gemm { output: Precision::F32, k: 0, ..g }).unwrap_err().to_string();
    assert!(error.contains("empty dimension"), "{error}");
}

fn check_forward(x: Precision, with_bias: bool) {
    let inp = rounded(x, &random(N * C, 1.0, 4));
    let weight = rounded(x, &random(OC * C, 0.5, 5));
    let bias = rounded(x, &random(OC, 1.0, 6));
    let mut want = vec![0.0; N * OC];
    cpu::forward(&mut want, &inp, &weight, with_bias.then_some(&bias[..]), N, C, OC, false);

    // The output starts as garbage: the forward writes it without reading it.
    let out = device_buffer(x, &random(N * OC, 9.0, 7));
    let (inp_buffer, weight_buffer, bias_buffer) = (device_buffer(x, &inp), device_buffer(x, &weight), device_buffer(x, &bias));
    let bias_addr = with_bias.then_some(bias_buffer.addr);
    matmul::forward(gpu(), x, out.addr, inp_buffer.addr, weight_buffer.addr, bias_addr, N, C, OC).unwrap();
    assert_close(&format!("linear {x:?} bias={with_bias}"), &device_values(x, &out), &want, product_tolerance(x, x));
}

#[test]
fn linear_forward_matches_cpu() {
    for x in [Precision::F32, Precision::Bf16] {
        for with_bias in [false, true] {
            check_forward(x, with_bias);
        }
    }
}

fn check_backward(x: Precision, with_dinp: bool, with_bias: bool) {
    let dout = rounded(x, &random(N * OC, 1.0, 8));
    let inp = rounded(x, &random(N * C, 1.0, 9));
    let weight = rounded(x, &random(OC * C, 0.5, 10));
    // The weight's and bias's gradients hold earlier micro-steps' sums, which the backward adds to.
    let dweight = random(OC * C, 1.0, 11);
    let dbias = random(OC, 1.0, 12);
    let (mut want_dinp, mut want_dweight, mut want_dbias) = (vec![0.0; N * C], dweight.clone(), dbias.clone());
    cpu::backward(
        with_dinp.then_some(&mut want_dinp[..]),
        &mut want_dweight,
        with_bias.then_some(&mut want_dbias[..]),
        &dout,
        &inp,
        &weight,
        N,
        C,
        OC,
        true,
    );

    let dinp_buffer = device_buffer(x, &random(N * C, 9.0, 13));
    let dweight_buffer = device_buffer(Precision::F32, &dweight);
    let dbias_buffer = device_buffer(Precision::F32, &dbias);
    let (dout_buffer, inp_buffer, weight_buffer) = (device_buffer(x, &dout), device_buffer(x, &inp), device_buffer(x, &weight));
    let bias_scratch = Buffer::unwritten(Precision::F32, bias::backward_scratch_len(N, OC));
    matmul::backward(
        gpu(),
        x,
        with_dinp.then_some(dinp_buffer.addr),
        dweight_buffer.addr,
        with_bias.then_some(dbias_buffer.addr),
        bias_scratch.addr(),
        dout_buffer.addr,
        inp_buffer.addr,
        weight_buffer.addr,
        N,
        C,
        OC,
    )
    .unwrap();

    let what = format!("linear backward {x:?} dinp={with_dinp} bias={with_bias}");
    if with_dinp {
        assert_close(&format!("{what}: dinp"), &device_values(x, &dinp_buffer), &want_dinp, product_tolerance(x, x));
    }
    assert_close(
        &format!("{what}: dweight"),
        &device_values(Precision::F32, &dweight_buffer),
        &want_dweight,
        product_tolerance(x, Precision::F32),
    );
    // Sums of the same floats in both: only the order of the additions differs.
    assert_close(&format!("{what}: dbias"), &device_values(Precision::F32, &dbias_buffer), &want_dbias, 1e-5);
}

#[test]
fn linear_backward_matches_cpu() {
    for x in [Precision::F32, Precision::Bf16] {
        for (with_dinp, with_bias) in [(true, true), (true, false), (false, true)] {
            check_backward(x, with_dinp, with_bias);
        }
    }
}
