//! Token plus position embedding, with the embedding dropout fused in.

use rayon::prelude::*;

use super::dropout::Mask;
use super::store;

/// `out[b, t] = dropout(wte[tokens[b, t]] + wpe[t])` for B rows of T tokens, C channels.
pub fn forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize, mask: Option<Mask>) {
    assert!(out.len() == tokens.len() * c && wpe.len() >= t * c, "embedding: buffer sizes do not match");
    out.par_chunks_mut(c).zip(tokens.par_iter()).enumerate().for_each(|(row, (x, &tok))| {
        let (e, p) = (&wte[tok as usize * c..][..c], &wpe[(row % t) * c..][..c]);
        x.iter_mut().zip(e.iter().zip(p)).for_each(|(x, (e, p))| *x = e + p);
        if let Some(mask) = mask {
            mask.apply(x, row * c);
        }
    });
}

/// Gradients of both tables from `dout` (which is overwritten: the dropout mask is applied to it in
/// place). The token table's gradient is always added to (the tied output layer wrote it first);
/// the position table's is written or accumulated as `accumulate` says.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &mut [f32],
    tokens: &[u32],
    t: usize,
    c: usize,
    mask: Option<Mask>,
    accumulate: bool,
) {
    assert!(dout.len() == tokens.len() * c && dwpe.len() >= t * c, "embedding backward: buffer sizes do not match");
    if let Some(mask) = mask {
        dout.par_chunks_mut(c).enumerate().for_each(|(row, d)| mask.apply(d, row * c));
    }
    for (d, &tok) in dout.chunks_exact(c).zip(tokens) {
        dwte[tok as usize * c..][..c].iter_mut().zip(d).for_each(|(g, d)| *g += d);
    }
    let b = tokens.len() / t;
    if !accumulate {
        // Positions beyond this batch's T get no gradient, but the buffer may hold the last step's.
        dwpe[t * c..].fill(0.0);
    }
    dwpe[..t * c].par_chunks_mut(c).enumerate().for_each(|(pos, g)| {
        for row in 0..b {
            let d = &dout[(row * t + pos) * c..][..c];
            if row == 0 {
                store(g, d, accumulate);
            } else {
                g.iter_mut().zip(d).for_each(|(g, d)| *g += d);
            }
        }
    });
}
