//! LayerNorm over the last dimension (eps inside the square root, as PyTorch), rows in parallel.
//! The forward pass keeps each row's mean and 1/std for the backward pass (llm.c's layout).

use rayon::prelude::*;

use super::sum;

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
        match bias {
            Some(b) => (0..c).for_each(|i| y[i] = (x[i] - mu) * rs * weight[i] + b[i]),
            None => (0..c).for_each(|i| y[i] = (x[i] - mu) * rs * weight[i]),
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
            let (mut dnorm_mean, mut dnorm_norm_mean) = (0f32, 0f32);
            for i in 0..c {
                let dnorm = weight[i] * dy[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * (x[i] - mu) * rs;
            }
            dnorm_mean /= c as f32;
            dnorm_norm_mean /= c as f32;
            for i in 0..c {
                let norm = (x[i] - mu) * rs;
                let g = (weight[i] * dy[i] - dnorm_mean - norm * dnorm_norm_mean) * rs;
                dx[i] = if add_to_dinp { dx[i] + g } else { g };
            }
        },
    );
    // The parameter gradients sum over rows: column-wise, in one sweep of the rows.
    if !accumulate {
        dweight.fill(0.0);
    }
    for ((dy, x), (&mu, &rs)) in dout.chunks_exact(c).zip(inp.chunks_exact(c)).zip(mean.iter().zip(rstd)) {
        (0..c).for_each(|i| dweight[i] += (x[i] - mu) * rs * dy[i]);
    }
    if let Some(dbias) = dbias {
        if !accumulate {
            dbias.fill(0.0);
        }
        dout.chunks_exact(c).for_each(|dy| dbias.iter_mut().zip(dy).for_each(|(d, g)| *d += g));
    }
}
