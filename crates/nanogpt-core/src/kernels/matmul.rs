//! Linear layer `out = inp Wᵀ + b` over rows of `inp` (N x C), W in PyTorch's (OC, C) layout, on `kernels::gemm`.

use super::{gemm, parallelism, store};

/// `out` (N x OC) = inp Wᵀ + b; with `residual`, the product is added to what `out` already holds
/// (the residual stream), which saves a separate add pass.
#[allow(clippy::too_many_arguments)]
pub fn forward(out: &mut [f32], inp: &[f32], weight: &[f32], bias: Option<&[f32]>, n: usize, c: usize, oc: usize, residual: bool) {
    assert!(weight.len() == oc * c, "linear: the weight is not ({oc}x{c})");
    // SAFETY: the weight's size was checked against its (OC, C) rows, read here as the columns of Wᵀ.
    unsafe { linear(out, inp, weight.as_ptr(), c as isize, 1, bias, n, c, oc, residual) }
}

/// [`forward`] with the weight given transposed, as (C, OC) rows `row_stride` apart (a column block of a wider
/// matrix when the stride exceeds OC). For few rows this is the fast layout: gemm re-lays out a weight in
/// PyTorch's (OC, C) layout on every call, which costs as much as the product itself below a few dozen rows
/// (`decode.rs` keeps its weights this way).
#[allow(clippy::too_many_arguments)]
pub fn forward_transposed(
    out: &mut [f32],
    inp: &[f32],
    weight_t: &[f32],
    row_stride: usize,
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
    residual: bool,
) {
    assert!(
        oc <= row_stride && (c == 0 || weight_t.len() >= (c - 1) * row_stride + oc),
        "linear: the transposed weight does not hold {c} rows of {oc} columns, {row_stride} apart"
    );
    // SAFETY: every (row, column) read lies inside weight_t, as checked above.
    unsafe { linear(out, inp, weight_t.as_ptr(), 1, row_stride as isize, bias, n, c, oc, residual) }
}

/// `out` (N x OC) = inp (N x C) Wᵀ + b, with Wᵀ (C x OC) addressed by its column and row strides.
///
/// Safety: `weight_t` must address a valid C x OC matrix with those strides.
#[allow(clippy::too_many_arguments)]
unsafe fn linear(
    out: &mut [f32],
    inp: &[f32],
    weight_t: *const f32,
    col_stride: isize,
    row_stride: isize,
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
    residual: bool,
) {
    assert!(out.len() == n * oc && inp.len() == n * c, "linear: buffer sizes do not match ({n}x{c}) -> ({n}x{oc})");
    if let Some(b) = bias {
        if residual {
            out.chunks_exact_mut(oc).for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        } else {
            out.chunks_exact_mut(oc).for_each(|row| row.copy_from_slice(b));
        }
    }
    let read_out = residual || bias.is_some();
    // SAFETY: out is n x oc, inp n x c, both checked above, and out is a distinct mutable borrow, so it overlaps
    // neither input; the caller vouches for the weight.
    unsafe {
        gemm(
            n,
            oc,
            c,
            out.as_mut_ptr(),
            1,
            oc as isize,
            read_out,
            inp.as_ptr(),
            1,
            c as isize,
            weight_t,
            col_stride,
            row_stride,
            1.0,
            1.0,
            parallelism(n * oc * c),
        );
    }
}

/// Gradients of the input (written to `dinp`), of the weight and of the bias (written or accumulated).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    n: usize,
    c: usize,
    oc: usize,
    accumulate: bool,
) {
    assert!(
        dout.len() == n * oc && inp.len() == n * c && weight.len() == oc * c && dweight.len() == oc * c,
        "linear backward: buffer sizes do not match"
    );
    if let Some(dinp) = dinp {
        assert_eq!(dinp.len(), n * c);
        // SAFETY: dinp (n x c) = dout (n x oc) @ weight (oc x c), sizes checked, dinp a distinct borrow.
        unsafe {
            gemm(
                n,
                c,
                oc,
                dinp.as_mut_ptr(),
                1,
                c as isize,
                false,
                dout.as_ptr(),
                1,
                oc as isize,
                weight.as_ptr(),
                1,
                c as isize,
                0.0,
                1.0,
                parallelism(n * oc * c),
            );
        }
    }
    // SAFETY: dweight (oc x c) (+)= doutᵀ (oc x n) @ inp (n x c), sizes checked, dweight a distinct borrow.
    unsafe {
        gemm(
            oc,
            c,
            n,
            dweight.as_mut_ptr(),
            1,
            c as isize,
            accumulate,
            dout.as_ptr(),
            oc as isize,
            1,
            inp.as_ptr(),
            1,
            c as isize,
            1.0,
            1.0,
            parallelism(n * oc * c),
        );
    }
    if let Some(dbias) = dbias {
        let mut sums = vec![0f32; oc];
        dout.chunks_exact(oc).for_each(|row| sums.iter_mut().zip(row).for_each(|(s, g)| *s += g));
        store(dbias, &sums, accumulate);
    }
}

/// Runs the products of one linear layer `reps` times, the forward (inp Wᵀ) or the backward (dout W and doutᵀ
/// inp), on fixed data, on one thread of rayon's pool as the training step's batch shards run them: for timing
/// the matrix products (`npm run bench:gemm`). Returns a checksum of the last outputs (each weighted by its
/// position, so that a misplaced element changes it too): the work is never idle, and builds can be compared.
pub fn repeat(backward: bool, n: usize, c: usize, oc: usize, reps: usize) -> f32 {
    let fill = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7 + seed) % 17) as f32 / 16.0 - 0.5).collect() };
    let (inp, weight, dout) = (fill(n * c, 1), fill(oc * c, 2), fill(n * oc, 3));
    let (mut out, mut dinp, mut dweight) = (vec![0f32; n * oc], vec![0f32; n * c], vec![0f32; oc * c]);
    let mut checksum = 0.0;
    rayon::scope(|s| {
        s.spawn(|_| {
            for _ in 0..reps {
                if backward {
                    self::backward(Some(&mut dinp), &mut dweight, None, &dout, &inp, &weight, n, c, oc, false);
                } else {
                    forward(&mut out, &inp, &weight, None, n, c, oc, false);
                }
            }
            let weighted = |v: &[f32]| v.iter().enumerate().map(|(i, x)| x * (i % 11 + 1) as f32).sum::<f32>();
            checksum = if backward { weighted(&dinp) + weighted(&dweight) } else { weighted(&out) };
        })
    });
    checksum
}
