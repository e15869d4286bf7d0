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
///
/// Up to [`FEW_ROWS`] rows, the product streams the weight once for all of them ([`few_rows`]), and with `threads`
/// above one its columns are split between that many threads of rayon's pool: such a product reads each weight
/// for a few multiply-adds, so it is bound by memory bandwidth, and every thread that reads the whole weight adds
/// to the traffic. The caller runs on a thread of the pool, so that handing out the parts costs no wake-up of a
/// thread outside it. Other products run on gemm, which splits them itself when called from outside the pool.
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
    threads: usize,
) {
    assert!(
        oc <= row_stride && (c == 0 || weight_t.len() >= (c - 1) * row_stride + oc),
        "linear: the transposed weight does not hold {c} rows of {oc} columns, {row_stride} apart"
    );
    if n > FEW_ROWS || c == 0 {
        // SAFETY: every (row, column) read lies inside weight_t, as checked above.
        return unsafe { linear(out, inp, weight_t.as_ptr(), 1, row_stride as isize, bias, n, c, oc, residual) };
    }
    assert!(out.len() == n * oc && inp.len() == n * c, "linear: buffer sizes do not match ({n}x{c}) -> ({n}x{oc})");
    add_bias(out, bias, oc, residual);
    let read_out = residual || bias.is_some();
    // Parts of whole 64-column strips (the kernel's widest), at most one per thread.
    let part = oc.div_ceil(threads.max(1)).next_multiple_of(64);
    if part >= oc {
        // SAFETY: sizes checked above; out is a distinct mutable borrow.
        return unsafe { few_rows(n, oc, c, out.as_mut_ptr(), oc, read_out, inp, weight_t.as_ptr(), row_stride) };
    }
    let (out_at, weight_at) = (out.as_mut_ptr() as usize, weight_t.as_ptr() as usize);
    rayon::scope(|s| {
        for first in (0..oc).step_by(part) {
            s.spawn(move |_| {
                let (out, weight_t) = (out_at as *mut f32, weight_at as *const f32);
                // SAFETY: the parts are disjoint column ranges of out, inside it and inside weight_t as checked above.
                unsafe { few_rows(n, part.min(oc - first), c, out.add(first), oc, read_out, inp, weight_t.add(first), row_stride) }
            });
        }
    });
}

/// Rows up to which [`forward_transposed`] runs [`few_rows`].
pub const FEW_ROWS: usize = 8;

/// Puts the bias on every row of `out` (N x OC), added to what it holds with `residual`.
fn add_bias(out: &mut [f32], bias: Option<&[f32]>, oc: usize, residual: bool) {
    if let Some(b) = bias {
        if residual {
            out.chunks_exact_mut(oc).for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        } else {
            out.chunks_exact_mut(oc).for_each(|row| row.copy_from_slice(b));
        }
    }
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
    add_bias(out, bias, oc, residual);
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

/// `out` (M x N, rows `out_stride` apart) = inp (M x K) · rhs (K x N, rows `rhs_stride` apart), plus what `out`
/// holds when `read_out`, for M up to [`FEW_ROWS`]. The WebAssembly build runs its own kernel (`gemm_wasm`, which reads
/// such operands in place). Elsewhere the M rows' sums stay in registers over strips of columns: 64 wide up to 4 rows,
/// 32 up to 8 (16 vector registers of AVX-512 either way), then 16, then 1. The weight is read 8 rows at a time, strip
/// after strip along them, so that its reads are a few sequential streams that the prefetcher follows; `out` is read
/// and written once per 8 rows of it. (gemm's kernels for so few rows read a streamed weight at about half the rate.)
///
/// Safety: out, inp and rhs must address valid memory for their shapes, and out must not overlap either input.
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_stride: usize,
    read_out: bool,
    inp: &[f32],
    rhs: *const f32,
    rhs_stride: usize,
) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: as this function's.
    return unsafe {
        super::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            read_out,
            inp.as_ptr(),
            1,
            k as isize,
            rhs,
            1,
            rhs_stride as isize,
            1.0,
            1.0,
            gemm::Parallelism::None,
        )
    };
    #[cfg(not(target_arch = "wasm32"))]
    {
        let rows = Rows { out, out_stride, inp, k, rhs, rhs_stride };
        match m {
            1 => rows.strips::<1, 64>(n, read_out),
            2 => rows.strips::<2, 64>(n, read_out),
            3 => rows.strips::<3, 64>(n, read_out),
            4 => rows.strips::<4, 64>(n, read_out),
            5 => rows.strips::<5, 32>(n, read_out),
            6 => rows.strips::<6, 32>(n, read_out),
            7 => rows.strips::<7, 32>(n, read_out),
            8 => rows.strips::<8, 32>(n, read_out),
            _ => unreachable!("few_rows takes 1 to {FEW_ROWS} rows, not {m}"),
        }
    }
}

/// The operands of [`few_rows`] from one column on: `out`'s rows `out_stride` apart, `inp` (M x K), `rhs`'s rows
/// `rhs_stride` apart.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Clone, Copy)]
struct Rows<'a> {
    out: *mut f32,
    out_stride: usize,
    inp: &'a [f32],
    k: usize,
    rhs: *const f32,
    rhs_stride: usize,
}

#[cfg(not(target_arch = "wasm32"))]
impl Rows<'_> {
    /// Weight rows per pass along the strips.
    const DEPTH: usize = 8;

    /// The same operands from column `j` on.
    ///
    /// Safety: `j` must be a column of out and rhs.
    unsafe fn at_column(self, j: usize) -> Self {
        Self { out: self.out.add(j), rhs: self.rhs.add(j), ..self }
    }

    /// The product over N columns: strips of W, then of 16, then single columns, DEPTH rows of rhs at a time.
    ///
    /// Safety: as [`few_rows`]', for M rows and N columns.
    unsafe fn strips<const M: usize, const W: usize>(self, n: usize, read_out: bool) {
        for p0 in (0..self.k).step_by(Self::DEPTH) {
            let (depth, read) = (Self::DEPTH.min(self.k - p0), read_out || p0 > 0);
            let mut j = 0;
            while j + W <= n {
                self.at_column(j).strip::<M, W>(read, p0, depth);
                j += W;
            }
            while j + 16 <= n {
                self.at_column(j).strip::<M, 16>(read, p0, depth);
                j += 16;
            }
            for j in j..n {
                self.at_column(j).strip::<M, 1>(read, p0, depth);
            }
        }
    }

    /// Columns 0..W of out's M rows (+)= inp's columns p0..p0 + depth times those rows of rhs.
    ///
    /// Safety: those rows and columns must lie inside the operands.
    #[inline(always)]
    unsafe fn strip<const M: usize, const W: usize>(self, read_out: bool, p0: usize, depth: usize) {
        let mut sums = [[0f32; W]; M];
        if read_out {
            for (r, row) in sums.iter_mut().enumerate() {
                *row = *(self.out.add(r * self.out_stride) as *const [f32; W]);
            }
        }
        for p in p0..p0 + depth {
            let weights = &*(self.rhs.add(p * self.rhs_stride) as *const [f32; W]);
            for (r, row) in sums.iter_mut().enumerate() {
                let a = *self.inp.get_unchecked(r * self.k + p);
                for (sum, &w) in row.iter_mut().zip(weights) {
                    *sum = super::madd(a, w, *sum);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            *(self.out.add(r * self.out_stride) as *mut [f32; W]) = *row;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Multiples of 1/8 in [-1, 1): their products and sums are exact in f32, so both routes agree to the bit.
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + seed * 13) % 17) as f32 / 8.0 - 1.0).collect()
    }

    /// The transposed weight's products of a few rows (their own kernel, split by columns) against `forward` (gemm on
    /// the (OC, C) weight): every row count up to FEW_ROWS and one past it; columns that end in a partial strip and in
    /// single columns; a depth of several passes; the weight a column block of a wider matrix; with and without bias
    /// and residual; on 1 to 3 threads.
    #[test]
    fn few_rows_match_the_product_on_gemm() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for n in 1..=FEW_ROWS + 1 {
            for (c, oc) in [(1, 1), (9, 83), (37, 64 * 3 + 16 + 5)] {
                let stride = oc + 7;
                let weight_t = values(c * stride, 1);
                let weight: Vec<f32> = (0..oc * c).map(|i| weight_t[(i % c) * stride + i / c]).collect();
                let (inp, bias, initial) = (values(n * c, 2), values(oc, 3), values(n * oc, 4));
                for (with_bias, residual) in [(false, false), (true, false), (false, true), (true, true)] {
                    let bias = with_bias.then_some(&bias[..]);
                    let mut expected = initial.clone();
                    forward(&mut expected, &inp, &weight, bias, n, c, oc, residual);
                    for threads in 1..=3 {
                        let mut got = initial.clone();
                        pool.install(|| forward_transposed(&mut got, &inp, &weight_t, stride, bias, n, c, oc, residual, threads));
                        assert_eq!(got, expected, "{n} rows, {c} -> {oc}, bias {with_bias}, residual {residual}, {threads} threads");
                    }
                }
            }
        }
    }
}
