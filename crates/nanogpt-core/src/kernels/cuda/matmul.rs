//! The linear layer `out = inp Wᵀ + b` on a [`Gpu`] (kernels/matmul.rs's forward and backward), W in
//! PyTorch's (OC, C) layout: its products are [`Gemm`]s (cuBLAS on a CUDA device), the forward's bias added
//! inside its product (cuBLASLt's bias epilogue: no pass of its own over the output), the bias's gradient
//! summed by bias.cu.

use candle_core::Result;

use super::{bias, Gemm, Gpu, Precision};

/// `out` (N x OC of X) = `inp` (N x C of X) Wᵀ, `weight` (OC x C of X), plus `bias` (OC of X) on every
/// row when there is one. `out` is written, not read.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &dyn Gpu,
    x: Precision,
    out: u64,
    inp: u64,
    weight: u64,
    bias: Option<u64>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let product = Gemm {
        m: n,
        n: oc,
        k: c,
        a: inp,
        transpose_a: false,
        b: weight,
        transpose_b: true,
        c: out,
        inputs: x,
        output: x,
        alpha: 1.0,
        beta: 0.0,
        bias,
    };
    gpu.gemm(&product)
}

/// The gradients from `dout` (N x OC of X), with `inp` (N x C of X) and `weight` (OC x C of X) the
/// forward's: [`input_gradient`] into `dinp` when there is one, then [`weight_gradients`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &dyn Gpu,
    x: Precision,
    dinp: Option<u64>,
    dweight: u64,
    dbias: Option<u64>,
    bias_scratch: u64,
    dout: u64,
    inp: u64,
    weight: u64,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    if let Some(dinp) = dinp {
        input_gradient(gpu, x, dinp, dout, weight, n, c, oc)?;
    }
    weight_gradients(gpu, x, dweight, dbias, bias_scratch, dout, inp, n, c, oc)
}

/// `dinp` (N x C of X) = `dout` (N x OC of X) `weight` (OC x C of X), written.
#[allow(clippy::too_many_arguments)]
pub fn input_gradient(gpu: &dyn Gpu, x: Precision, dinp: u64, dout: u64, weight: u64, n: usize, c: usize, oc: usize) -> Result<()> {
    let product = Gemm {
        m: n,
        n: c,
        k: oc,
        a: dout,
        transpose_a: false,
        b: weight,
        transpose_b: false,
        c: dinp,
        inputs: x,
        output: x,
        alpha: 1.0,
        beta: 0.0,
        bias: None,
    };
    gpu.gemm(&product)
}

/// `dweight` (OC x C, f32) += `dout`ᵀ `inp` (N x OC and N x C of X) and `dbias` (OC, f32) += dout's column
/// sums: added to, so that micro-steps accumulate their gradients. `bias_scratch` holds
/// [`bias::backward_scratch_len`] floats when there is a dbias.
#[allow(clippy::too_many_arguments)]
pub fn weight_gradients(
    gpu: &dyn Gpu,
    x: Precision,
    dweight: u64,
    dbias: Option<u64>,
    bias_scratch: u64,
    dout: u64,
    inp: u64,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let weight_gradient = Gemm {
        m: oc,
        n: c,
        k: n,
        a: dout,
        transpose_a: true,
        b: inp,
        transpose_b: false,
        c: dweight,
        inputs: x,
        output: Precision::F32,
        alpha: 1.0,
        beta: 1.0,
        bias: None,
    };
    gpu.gemm(&weight_gradient)?;
    match dbias {
        Some(dbias) => bias::backward(gpu, x, dbias, bias_scratch, dout, n, oc),
        None => Ok(()),
    }
}
