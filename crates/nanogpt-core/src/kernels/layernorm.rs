//! LayerNorm over the last dimension (eps inside the square root, as PyTorch), rows in parallel.
//! The forward pass keeps each row's mean and 1/std for the backward pass (llm.c's layout).

use rayon::prelude::*;

use super::{madd, sum};

pub const EPS: f32 = 1e-5;

/// Mean and 1/sqrt(var + eps) of one row.
#[inline(always)]
pub fn row_stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    for v in chunks {
        for k in 0..8 {
            acc[k] += (v[k] - mean) * (v[k] - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + tail) / n;
    (mean, 1.0 / (var + EPS).sqrt())
}

/// `out` = normalised rows of `inp` (rows of `weight.len()`) times weight plus bias; each row's
/// statistics go to `mean` and `rstd`.
pub fn forward(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], bias: Option<&[f32]>) {
    let c = weight.len();
    assert!(out.len() == inp.len() && inp.len() == mean.len() * c && rstd.len() == mean.len(), "layernorm: buffer sizes do not match");
    out.par_chunks_mut(c).zip(inp.par_chunks(c)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(|((y, x), (m, r))| {
        let (mu, rs) = row_stats(x);
        (*m, *r) = (mu, rs);
        let normed = x.iter().zip(weight).map(|(x, w)| (x - mu) * rs * w);
        match bias {
            Some(b) => y.iter_mut().zip(normed.zip(b)).for_each(|(y, (n, b))| *y = n + b),
            None => y.iter_mut().zip(normed).for_each(|(y, n)| *y = n),
        }
    });
}

/// llm.c's layernorm_backward. The input gradient is added to `dinp` (the residual stream's gradient,
/// which already holds the skip connection's share) when `add_to_dinp`, else written; the weight and
/// bias gradients are written or accumulated as `accumulate` says.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    mean: &[f32],
    rstd: &[f32],
    weight: &[f32],
    add_to_dinp: bool,
    accumulate: bool,
) {
    let c = weight.len();
    assert!(
        dinp.len() == inp.len() && dout.len() == inp.len() && inp.len() == mean.len() * c,
        "layernorm backward: buffer sizes do not match"
    );
    dinp.par_chunks_mut(c).zip(dout.par_chunks(c).zip(inp.par_chunks(c))).zip(mean.par_iter().zip(rstd.par_iter())).for_each(
        |((dx, (dy, x)), (&mu, &rs))| {
            // Means over the row of dnorm = weight * dy and of dnorm * (x - mean), in eight lanes each so
            // that the sums vectorise (see `kernels::dot`).
            let (mut dnorm_sum, mut dnorm_centred_sum) = ([0f32; 8], [0f32; 8]);
            for ((w, dy), x) in weight.chunks_exact(8).zip(dy.chunks_exact(8)).zip(x.chunks_exact(8)) {
                for k in 0..8 {
                    let dnorm = w[k] * dy[k];
                    dnorm_sum[k] += dnorm;
                    dnorm_centred_sum[k] = madd(dnorm, x[k] - mu, dnorm_centred_sum[k]);
                }
            }
            for ((w, dy), x) in weight.iter().zip(dy).zip(x).skip(c / 8 * 8) {
                dnorm_sum[0] += w * dy;
                dnorm_centred_sum[0] += w * dy * (x - mu);
            }
            let dnorm_mean = dnorm_sum.iter().sum::<f32>() / c as f32;
            let dnorm_norm_mean = dnorm_centred_sum.iter().sum::<f32>() * rs / c as f32;
            let grads = weight.iter().zip(dy).zip(x).map(|((w, dy), x)| (madd(-(x - mu) * rs, dnorm_norm_mean, w * dy) - dnorm_mean) * rs);
            if add_to_dinp {
                dx.iter_mut().zip(grads).for_each(|(d, g)| *d += g);
            } else {
                dx.iter_mut().zip(grads).for_each(|(d, g)| *d = g);
            }
        },
    );
    // The parameter gradients sum over rows: column-wise, in one sweep of the rows.
    if !accumulate {
        dweight.fill(0.0);
    }
    for ((dy, x), (&mu, &rs)) in dout.chunks_exact(c).zip(inp.chunks_exact(c)).zip(mean.iter().zip(rstd)) {
        dweight.iter_mut().zip(x.iter().zip(dy)).for_each(|(d, (x, dy))| *d = madd((x - mu) * rs, *dy, *d));
    }
    if let Some(dbias) = dbias {
        if !accumulate {
            dbias.fill(0.0);
        }
        dout.chunks_exact(c).for_each(|dy| dbias.iter_mut().zip(dy).for_each(|(d, g)| *d += g));
    }
}
