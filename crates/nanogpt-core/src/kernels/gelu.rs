//! GELU, exact (erf, PyTorch's `nn.GELU()`) or the tanh approximation (OpenAI's GPT-2), elementwise
//! in parallel blocks.

use rayon::prelude::*;

use super::exp;

/// erf to about 1e-7 (Numerical Recipes' Chebyshev fit of erfc), enough for f32.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07 + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(poly);
    (1.0 - erfc).copysign(x)
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * INV_SQRT_2))
}

#[inline(always)]
fn gelu_erf_derivative(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * INV_SQRT_2)) + x * exp(-0.5 * x * x) * INV_SQRT_2PI
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
}

#[inline(always)]
fn gelu_tanh_derivative(x: f32) -> f32 {
    let th = tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x));
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
}

const BLOCK: usize = 4096;

pub fn forward(out: &mut [f32], inp: &[f32], tanh: bool) {
    assert_eq!(out.len(), inp.len(), "gelu: buffer sizes do not match");
    out.par_chunks_mut(BLOCK).zip(inp.par_chunks(BLOCK)).for_each(|(y, x)| match tanh {
        true => y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu_tanh(x)),
        false => y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu_erf(x)),
    });
}

/// `d` holds the gradient of GELU's output and receives that of its input `inp`, in place.
pub fn backward(d: &mut [f32], inp: &[f32], tanh: bool) {
    assert_eq!(d.len(), inp.len(), "gelu backward: buffer sizes do not match");
    d.par_chunks_mut(BLOCK).zip(inp.par_chunks(BLOCK)).for_each(|(d, x)| match tanh {
        true => d.iter_mut().zip(x).for_each(|(d, &x)| *d *= gelu_tanh_derivative(x)),
        false => d.iter_mut().zip(x).for_each(|(d, &x)| *d *= gelu_erf_derivative(x)),
    });
}
