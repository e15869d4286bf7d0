//! The training step's kernels: one forward/backward pair per layer kind, on f32 slices, for the CPU.
//! Shapes are passed explicitly as llm.c does: B batch rows, T positions, C channels, NH heads, V vocab.
//! A GPU or WebAssembly-specific implementation would be a sibling module with the same functions,
//! chosen by `train_step` for its backend; the CPU kernels here are also what the WebAssembly build runs.
//!
//! Backward functions write their parameter gradients with `accumulate == false` (the first micro-step
//! after an optimizer step) and add to them otherwise, so that no gradient buffer is ever zero-filled.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod cuda;
pub mod dropout;
pub mod embedding;
pub mod gelu;
#[cfg(any(target_arch = "wasm32", test))]
mod gemm_wasm;
pub mod layernorm;
pub mod matmul;

/// Dot product with eight independent partial sums: a single running sum cannot be vectorised
/// (float addition is not associative) and waits on the adder's latency at every element.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for x in chunks {
        for k in 0..8 {
            acc[k] += x[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// a * b + c, fused where the target has FMA: Rust never contracts `a * b + c` on its own, and a
/// polynomial of separate multiplies and adds is a chain of twice the latency. Without FMA (WebAssembly)
/// `mul_add` would be a libm call per element, so it stays two operations there.
#[inline(always)]
pub(crate) fn madd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    return a.mul_add(b, c);
    #[cfg(not(target_feature = "fma"))]
    return a * b + c;
}

/// e^x to about 2e-7 relative error, branch-free so that loops over it vectorise
/// (libm's `expf` is a call per element).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = madd(x, LOG2E, ROUND);
    let n = shifted - ROUND;
    // The low mantissa bits of `shifted` hold n as an integer: 2^n without a float-to-int conversion.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = madd(-n, LN2_LO, madd(-n, LN2_HI, x));
    // Taylor terms to r^7 / 7!, by Horner's rule.
    let mut p = 1.0 / 5040.0;
    for coefficient in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd(p, r, coefficient);
    }
    p * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// The largest element of `a` (-inf when empty; NaNs are passed over), with eight running maxima so that the loop
/// vectorises, as in [`sum`].
#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = a.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| larger(m, x));
    for x in chunks {
        for k in 0..8 {
            acc[k] = larger(acc[k], x[k]);
        }
    }
    acc.into_iter().fold(tail, larger)
}

/// `dst = src` on the first micro-step, `dst += src` on later ones.
#[inline(always)]
pub(crate) fn store(dst: &mut [f32], src: &[f32], accumulate: bool) {
    if accumulate {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    } else {
        dst.copy_from_slice(src);
    }
}

/// dst (m x n) = alpha * dst + beta * lhs (m x k) * rhs (k x n) when `read_dst`, else beta * lhs * rhs; every
/// matrix is addressed by a column stride and a row stride, as `gemm::gemm` takes them. The WebAssembly build runs
/// its own kernel (fused multiply-adds with relaxed SIMD, larger register tiles); other targets run `gemm`.
///
/// Safety: every operand must address valid memory for its shape, and dst must not overlap lhs or rhs.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    #[cfg(target_arch = "wasm32")]
    {
        let threads = match parallelism {
            gemm::Parallelism::Rayon(n) => n,
            gemm::Parallelism::None => 1,
        };
        gemm_wasm::gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta, threads);
    }
    #[cfg(not(target_arch = "wasm32"))]
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        alpha,
        beta,
        false,
        false,
        false,
        parallelism,
    );
}

/// The threading of a product of `flops` multiply-adds (gemm's, or the WebAssembly kernel's row split): below
/// about a million, handing work to other threads costs more than it saves; and on a thread of the pool, the
/// caller already split its work between threads (batch shards, attention heads), so the product stays there.
pub(crate) fn parallelism(flops: usize) -> gemm::Parallelism {
    match rayon::current_num_threads() {
        n if n > 1 && flops >= 1 << 20 && rayon::current_thread_index().is_none() => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    }
}
