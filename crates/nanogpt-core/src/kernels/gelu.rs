//! GELU, exact (erf, PyTorch's `nn.GELU()`) or the tanh approximation (OpenAI's GPT-2), elementwise
//! in parallel blocks.

use rayon::prelude::*;

use super::{exp, madd};

const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// Φ(x), the standard normal CDF, and e^(-x²/2), which its derivative needs: erf by Abramowitz and
/// Stegun's 7.1.26 (absolute error below 1.5e-7), whose own exponential is that same e^(-x²/2).
#[inline(always)]
fn normal_cdf(x: f32) -> (f32, f32) {
    let z = x.abs() * INV_SQRT_2;
    let gauss = exp(-z * z);
    let t = 1.0 / madd(0.327_591_1, z, 1.0);
    let mut poly = 1.061_405_4;
    for coefficient in [-1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6] {
        poly = madd(poly, t, coefficient);
    }
    let erf = madd(-poly * t, gauss, 1.0);
    (madd(0.5, erf.copysign(x), 0.5), gauss)
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// erf to about 3e-7 (absolute) without an exponential or a branch: clamped to [-4, 4], beyond which it is ±1 in
/// f32, then an odd polynomial of degree 13 over an even one of degree 8 (the rational approximation of Eigen's
/// `generic_fast_erf_float`). About half the operations of [`normal_cdf`]'s route, which the derivative takes
/// because it needs e^(-x²/2) as well.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_4e-10;
    for coefficient in [2.770_681_5e-8, -2.101_024e-6, -5.692_506_2e-5, -7.349_906_4e-4, -2.954_6e-3, -1.609_603_3e-2] {
        p = madd(x2, p, coefficient);
    }
    let mut q = -1.456_607_15e-5;
    for coefficient in [-2.133_740_5e-4, -1.682_827e-3, -7.373_329_3e-3, -1.426_473_9e-2] {
        q = madd(x2, q, coefficient);
    }
    x * p / q
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    let half_x = 0.5 * x;
    madd(half_x, erf(x * INV_SQRT_2), half_x)
}

#[inline(always)]
fn gelu_erf_derivative(x: f32) -> f32 {
    let (cdf, gauss) = normal_cdf(x);
    madd(x * gauss, INV_SQRT_2PI, cdf)
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * madd(0.044715 * x * x, x, x);
    0.5 * x * (1.0 + tanh(inner))
}

#[inline(always)]
fn gelu_tanh_derivative(x: f32) -> f32 {
    let th = tanh(SQRT_2_OVER_PI * madd(0.044715 * x * x, x, x));
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * SQRT_2_OVER_PI * madd(3.0 * 0.044715 * x, x, 1.0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series in f64, exact to about 1e-10 for |z| <= 4.5.
    fn erf_f64(z: f64) -> f64 {
        let (mut term, mut total) = (z, z);
        for n in 1..200 {
            term *= -z * z / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_gelu_and_its_derivative_match_f64_to_single_precision() {
        for i in -6000..=6000 {
            let x = i as f64 / 1000.0;
            let cdf = 0.5 * (1.0 + erf_f64(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (value, slope) = (gelu_erf(x as f32) as f64, gelu_erf_derivative(x as f32) as f64);
            assert!((value - x * cdf).abs() <= 1e-6 * (1.0 + x.abs()), "gelu({x}) = {value}, want {}", x * cdf);
            assert!((slope - (cdf + x * pdf)).abs() <= 1e-6, "gelu'({x}) = {slope}, want {}", cdf + x * pdf);
        }
    }

    #[test]
    fn tanh_gelu_and_its_derivative_match_f64() {
        for i in -6000..=6000 {
            let x = i as f64 / 1000.0;
            let th = (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh();
            let want = 0.5 * x * (1.0 + th);
            let want_slope = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.797_884_560_802_865_4 * (1.0 + 3.0 * 0.044715 * x * x);
            assert!((gelu_tanh(x as f32) as f64 - want).abs() <= 1e-6 * (1.0 + x.abs()), "gelu_tanh({x})");
            assert!((gelu_tanh_derivative(x as f32) as f64 - want_slope).abs() <= 1e-6 * (1.0 + x.abs()), "gelu_tanh'({x})");
        }
    }
}
