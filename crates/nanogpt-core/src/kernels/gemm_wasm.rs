//! f32 matrix products for the WebAssembly build, in place of the `gemm` crate's simd128 kernels (no fused
//! multiply-add, tiles of at most 3x4). Blocked as in BLIS: a KC x NC block of the right operand and an
//! MC x KC block of the left one are copied into panels of NR columns and MR rows, laid out in the order the
//! microkernel reads them, so its loop is unit-stride whatever the operands' strides; the microkernel keeps an
//! MR x NR tile of the product in registers for the KC steps of one block.
//!
//! The tile fits V8's register file on x64 (16 xmm registers): MR x NR/4 accumulators, NR/4 loads of the right
//! panel and one broadcast of the left. With relaxed SIMD (`+relaxed-simd`) a step is one `f32x4.relaxed_madd`,
//! which V8 compiles to an FMA where the CPU has one; otherwise a multiply and an add. Outside WebAssembly (the
//! unit tests) the same blocking and packing run with a scalar microkernel.

/// Rows of the register tile.
const MR: usize = 4;
/// Columns of the register tile (NR / 4 vectors of four lanes).
const NR: usize = 8;
/// Depth of one block: an NR-column panel of the right operand (KC x NR) stays in L1.
const KC: usize = 256;
/// Rows of one packed block of the left operand (MC x KC, in L2).
const MC: usize = 96;
/// Columns of one packed block of the right operand (KC x NC).
const NC: usize = 256;
/// Products of fewer rows than this read their operands in place: as dot products where the depth is contiguous in
/// both (see `dots`), or with the microkernel where the rows of rhs are (see `rows_in_place`).
const DOT_ROWS: usize = 2 * MR;
/// Columns of one tile of `dots`: rows of a linear layer's weight, read together.
const DOT_COLS: usize = 4;
/// Rows of rhs per sweep of `rows_in_place` along them.
const STREAM_DEPTH: usize = 16;
/// f32 lanes of a SIMD vector.
#[cfg(target_arch = "wasm32")]
const LANES: usize = 4;

/// A ROWS x NR tile of the product (MR rows unless said): in registers, as NR / LANES vectors per row, where the
/// microkernel is SIMD.
#[cfg(target_arch = "wasm32")]
type Tile<const ROWS: usize = MR> = [[core::arch::wasm32::v128; NR / LANES]; ROWS];
#[cfg(not(target_arch = "wasm32"))]
type Tile<const ROWS: usize = MR> = [[f32; NR]; ROWS];

/// A matrix operand: element (row, col) at `ptr + row * row_stride + col * col_stride`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Operand {
    /// Safety: (row, col) must lie inside the operand.
    #[inline(always)]
    unsafe fn at(&self, row: usize, col: usize) -> f32 {
        *self.ptr.offset(row as isize * self.row_stride + col as isize * self.col_stride)
    }

    unsafe fn row(self, row: usize) -> Self {
        Self { ptr: self.ptr.offset(row as isize * self.row_stride), ..self }
    }
}

/// `dst` (m x n) = alpha * dst + beta * lhs (m x k) * rhs (k x n) when `read_dst`, else beta * lhs * rhs (dst
/// is then never read). The arguments are those of `gemm::gemm` (column stride, then row stride); with `threads`
/// above one the rows are split into that many parts, run on rayon's pool.
///
/// Safety: every operand must address valid memory for its shape, and dst must not overlap lhs or rhs.
#[allow(clippy::too_many_arguments)]
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
    threads: usize,
) {
    let dst = Dst { ptr: dst, row_stride: dst_rs, col_stride: dst_cs };
    let lhs = Operand { ptr: lhs, row_stride: lhs_rs, col_stride: lhs_cs };
    let rhs = Operand { ptr: rhs, row_stride: rhs_rs, col_stride: rhs_cs };
    let scale = Scale { alpha: if read_dst { Some(alpha) } else { None }, beta };
    if threads <= 1 || m < 2 * MR {
        return product(m, n, k, dst, lhs, rhs, scale);
    }
    // Parts of whole tiles, so that only the last part has a ragged edge.
    let part = m.div_ceil(threads).next_multiple_of(MR);
    let shared = SendPtrs(dst, lhs, rhs);
    rayon::scope(move |s| {
        for first in (0..m).step_by(part) {
            s.spawn(move |_| {
                let (dst, lhs, rhs) = shared.get();
                // SAFETY: the parts are disjoint row ranges of dst; lhs and rhs are only read.
                unsafe { product(part.min(m - first), n, k, dst.row(first), lhs.row(first), rhs, scale) }
            });
        }
    });
}

/// The destination: element (row, col) at `ptr + row * row_stride + col * col_stride`.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    row_stride: isize,
    col_stride: isize,
}

impl Dst {
    unsafe fn row(self, row: usize) -> Self {
        Self { ptr: self.ptr.offset(row as isize * self.row_stride), ..self }
    }
}

#[derive(Clone, Copy)]
struct SendPtrs(Dst, Operand, Operand);
// SAFETY: the pointers are only dereferenced inside the disjoint parts `gemm` hands out.
unsafe impl Send for SendPtrs {}

impl SendPtrs {
    /// By method, so that a closure captures the whole (Send) value rather than its fields.
    fn get(self) -> (Dst, Operand, Operand) {
        (self.0, self.1, self.2)
    }
}

/// How a result is stored: dst = alpha * dst + beta * product, or beta * product when alpha is None.
#[derive(Clone, Copy)]
struct Scale {
    alpha: Option<f32>,
    beta: f32,
}

/// The blocked product on this thread.
unsafe fn product(m: usize, n: usize, k: usize, dst: Dst, lhs: Operand, rhs: Operand, scale: Scale) {
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let d = dst.ptr.offset(i as isize * dst.row_stride + j as isize * dst.col_stride);
                *d = scale.alpha.map_or(0.0, |alpha| alpha * *d);
            }
        }
        return;
    }
    if m < DOT_ROWS && lhs.col_stride == 1 && rhs.row_stride == 1 {
        return dots(m, n, k, dst, lhs, rhs, scale);
    }
    if m < DOT_ROWS && rhs.col_stride == 1 {
        return rows_in_place(m, n, k, dst, lhs, rhs, scale);
    }
    PANELS.with_borrow_mut(|(rhs_panels, lhs_panels)| {
        let (rhs_len, lhs_len) = (KC.min(k) * n.min(NC).next_multiple_of(NR), KC.min(k) * m.min(MC).next_multiple_of(MR));
        // Grown, never shrunk: a training step calls this with the same few shapes over and over.
        if rhs_panels.len() < rhs_len {
            rhs_panels.resize(rhs_len, 0.0);
        }
        if lhs_panels.len() < lhs_len {
            lhs_panels.resize(lhs_len, 0.0);
        }
        blocked(m, n, k, dst, lhs, rhs, scale, &mut rhs_panels[..rhs_len], &mut lhs_panels[..lhs_len]);
    });
}

thread_local! {
    /// This thread's packed panels of the right and the left operand.
    static PANELS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The loops over blocks and tiles, packing into the panels given.
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    m: usize,
    n: usize,
    k: usize,
    dst: Dst,
    lhs: Operand,
    rhs: Operand,
    scale: Scale,
    rhs_panels: &mut [f32],
    lhs_panels: &mut [f32],
) {
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // The first block of the depth stores over dst as asked; later ones add to it.
            let block_scale = if pc == 0 { scale } else { Scale { alpha: Some(1.0), beta: scale.beta } };
            pack_rhs(rhs_panels, rhs, pc, kc, jc, nc);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack_lhs(lhs_panels, lhs, ic, mc, pc, kc);
                for jr in (0..nc).step_by(NR) {
                    let b = &rhs_panels[jr * kc..(jr + NR) * kc];
                    for ir in (0..mc).step_by(MR) {
                        let a = &lhs_panels[ir * kc..(ir + MR) * kc];
                        // SAFETY: each panel holds kc steps of MR (or NR) values.
                        let tile = microkernel::<MR>(kc, std::array::from_fn(|i| a.as_ptr().add(i)), MR, b.as_ptr(), NR);
                        store(&tile, dst, ic + ir, MR.min(mc - ir), jc + jr, NR.min(nc - jr), block_scale);
                    }
                }
            }
        }
    }
}

/// The product of a few rows, as a linear layer's input rows (lhs, contiguous along k) against the rows of its
/// weight (the columns of rhs, contiguous along k) in one decode step: each tile is the dot products of two rows of
/// lhs (or the last one) with DOT_COLS columns of rhs, read in place. Packing would copy the whole of rhs for every
/// call to use it for one tile of a few rows; here each column of rhs is read from memory once, for all the rows
/// (again from L1 for the next pair).
unsafe fn dots(m: usize, n: usize, k: usize, dst: Dst, lhs: Operand, rhs: Operand, scale: Scale) {
    for j0 in (0..n).step_by(DOT_COLS) {
        let cols = DOT_COLS.min(n - j0);
        // A ragged last tile reads its last column again in place of the missing ones, and stores only `cols`.
        let columns: [*const f32; DOT_COLS] = std::array::from_fn(|j| rhs.ptr.offset((j0 + j.min(cols - 1)) as isize * rhs.col_stride));
        for i0 in (0..m).step_by(2) {
            if m - i0 >= 2 {
                let tile = dot_tile(k, [lhs.row(i0).ptr, lhs.row(i0 + 1).ptr], columns);
                store_values(&tile, dst, i0, 2, j0, cols, scale);
            } else {
                let tile = dot_tile(k, [lhs.row(i0).ptr], columns);
                store_values(&tile, dst, i0, 1, j0, cols, scale);
            }
        }
    }
}

/// The product of a few rows against an rhs whose rows are contiguous (a linear layer's weight stored transposed,
/// as decoding keeps it): the microkernel reads both operands in place, for the same reason as [`dots`]. Such a
/// product reads each weight for a few multiply-adds, so it is bound by memory bandwidth: rhs is read STREAM_DEPTH
/// rows at a time, tile after tile along them, a few sequential streams that the prefetcher follows (a tile's whole
/// depth at once would read one 32-byte run per row, rows far apart), and dst is updated once per STREAM_DEPTH rows.
/// Columns past the last whole tile are summed one at a time.
unsafe fn rows_in_place(m: usize, n: usize, k: usize, dst: Dst, lhs: Operand, rhs: Operand, scale: Scale) {
    let whole = n / NR * NR;
    for p0 in (0..k).step_by(STREAM_DEPTH) {
        let depth = STREAM_DEPTH.min(k - p0);
        // The first rows of rhs scale what dst held; later ones add to the partial sums there.
        let scale = if p0 == 0 { scale } else { Scale { alpha: Some(1.0), ..scale } };
        for j0 in (0..whole).step_by(NR) {
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let (b, a_step, b_step) = (rhs.row(p0).ptr.add(j0), lhs.col_stride as usize, rhs.row_stride as usize);
                // A ragged last tile reads its last row again in place of the missing ones, and stores only `rows`;
                // up to two rows take a tile of two, with half the multiply-adds.
                let a = |i: usize| lhs.row(i0 + i.min(rows - 1)).ptr.offset(p0 as isize * lhs.col_stride);
                if rows <= 2 {
                    store(&microkernel::<2>(depth, std::array::from_fn(a), a_step, b, b_step), dst, i0, rows, j0, NR, scale);
                } else {
                    store(&microkernel::<MR>(depth, std::array::from_fn(a), a_step, b, b_step), dst, i0, rows, j0, NR, scale);
                }
            }
        }
    }
    for i in 0..m {
        for j in whole..n {
            let value = (0..k).map(|p| lhs.at(i, p) * rhs.at(p, j)).sum::<f32>();
            store_values(&[[value]], dst, i, 1, j, 1, scale);
        }
    }
}

/// The ROWS x DOT_COLS dot products of `rows` with `columns`, each a run of k contiguous values: four lanes at a
/// time into one vector per pair, whose lanes are summed at the end (then the k % 4 last steps).
#[cfg(target_arch = "wasm32")]
#[inline(always)]
unsafe fn dot_tile<const ROWS: usize>(k: usize, rows: [*const f32; ROWS], columns: [*const f32; DOT_COLS]) -> [[f32; DOT_COLS]; ROWS] {
    use core::arch::wasm32::*;
    let steps = k / LANES * LANES;
    let mut acc = [[f32x4_splat(0.0); DOT_COLS]; ROWS];
    for p in (0..steps).step_by(LANES) {
        let w: [v128; DOT_COLS] = std::array::from_fn(|j| v128_load(columns[j].add(p) as *const v128));
        for (sums, row) in acc.iter_mut().zip(rows) {
            let x = v128_load(row.add(p) as *const v128);
            for (sum, &w) in sums.iter_mut().zip(&w) {
                *sum = madd(x, w, *sum);
            }
        }
    }
    let mut tile = [[0f32; DOT_COLS]; ROWS];
    for ((out, [a0, a1, a2, a3]), row) in tile.iter_mut().zip(acc).zip(rows) {
        // Lane j of the result is the sum of the four lanes of aj: two rounds of pairwise sums across vectors.
        let low = f32x4_add(i32x4_shuffle::<0, 4, 1, 5>(a0, a1), i32x4_shuffle::<2, 6, 3, 7>(a0, a1));
        let high = f32x4_add(i32x4_shuffle::<0, 4, 1, 5>(a2, a3), i32x4_shuffle::<2, 6, 3, 7>(a2, a3));
        let sums = f32x4_add(i64x2_shuffle::<0, 2>(low, high), i64x2_shuffle::<1, 3>(low, high));
        v128_store(out.as_mut_ptr() as *mut v128, sums);
        for (value, column) in out.iter_mut().zip(columns) {
            *value += (steps..k).map(|p| *row.add(p) * *column.add(p)).sum::<f32>();
        }
    }
    tile
}

/// The scalar `dot_tile` the unit tests run.
#[cfg(not(target_arch = "wasm32"))]
unsafe fn dot_tile<const ROWS: usize>(k: usize, rows: [*const f32; ROWS], columns: [*const f32; DOT_COLS]) -> [[f32; DOT_COLS]; ROWS] {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..k).map(|p| *rows[i].add(p) * *columns[j].add(p)).sum()))
}

/// Copies rhs[pc.., jc..] (kc x nc) into panels of NR columns: panel j holds, for each step p, its NR values of
/// row p (zeros past column nc). The read order follows whichever stride of rhs is unit.
unsafe fn pack_rhs(panels: &mut [f32], rhs: Operand, pc: usize, kc: usize, jc: usize, nc: usize) {
    for (panel, j0) in panels.chunks_exact_mut(kc * NR).zip((0..nc).step_by(NR)) {
        let width = NR.min(nc - j0);
        if rhs.row_stride == 1 {
            let done = if width == NR {
                transpose_into(panel, NR, rhs.ptr.offset((jc + j0) as isize * rhs.col_stride).add(pc), rhs.col_stride, kc)
            } else {
                0
            };
            for j in 0..NR {
                for p in done..kc {
                    panel[p * NR + j] = if j < width { rhs.at(pc + p, jc + j0 + j) } else { 0.0 };
                }
            }
        } else if rhs.col_stride == 1 && width == NR {
            for (p, step) in panel.chunks_exact_mut(NR).enumerate() {
                step.copy_from_slice(std::slice::from_raw_parts(rhs.row(pc + p).ptr.add(jc + j0), NR));
            }
        } else {
            for (p, step) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, value) in step.iter_mut().enumerate() {
                    *value = if j < width { rhs.at(pc + p, jc + j0 + j) } else { 0.0 };
                }
            }
        }
    }
}

/// Copies lhs[ic.., pc..] (mc x kc) into panels of MR rows: panel i holds, for each step p, its MR values of
/// column p (zeros past row mc).
unsafe fn pack_lhs(panels: &mut [f32], lhs: Operand, ic: usize, mc: usize, pc: usize, kc: usize) {
    for (panel, i0) in panels.chunks_exact_mut(kc * MR).zip((0..mc).step_by(MR)) {
        let height = MR.min(mc - i0);
        if lhs.col_stride == 1 {
            let done = if height == MR { transpose_into(panel, MR, lhs.row(ic + i0).ptr.add(pc), lhs.row_stride, kc) } else { 0 };
            for i in 0..MR {
                for p in done..kc {
                    panel[p * MR + i] = if i < height { lhs.at(ic + i0 + i, pc + p) } else { 0.0 };
                }
            }
        } else if lhs.row_stride == 1 && height == MR {
            for (p, step) in panel.chunks_exact_mut(MR).enumerate() {
                let column = lhs.ptr.offset((pc + p) as isize * lhs.col_stride).add(ic + i0);
                step.copy_from_slice(std::slice::from_raw_parts(column, MR));
            }
        } else {
            for (p, step) in panel.chunks_exact_mut(MR).enumerate() {
                for (i, value) in step.iter_mut().enumerate() {
                    *value = if i < height { lhs.at(ic + i0 + i, pc + p) } else { 0.0 };
                }
            }
        }
    }
}

/// Copies `width` runs of steps, run r starting at `src + r * stride`, into a panel that interleaves them
/// (`panel[p * width + r]` = step p of run r), four steps of four runs at a time by 4 x 4 transposes in
/// registers. Returns how many steps it copied: kc rounded down to a multiple of four (none on other targets,
/// where the caller's loop copies them all).
#[cfg(target_arch = "wasm32")]
#[inline(always)]
unsafe fn transpose_into(panel: &mut [f32], width: usize, src: *const f32, stride: isize, kc: usize) -> usize {
    use core::arch::wasm32::*;
    let steps = kc / LANES * LANES;
    assert!(width % LANES == 0 && panel.len() >= kc * width);
    for first_run in (0..width).step_by(LANES) {
        let runs: [*const f32; LANES] = std::array::from_fn(|r| src.offset((first_run + r) as isize * stride));
        for p in (0..steps).step_by(LANES) {
            let [r0, r1, r2, r3] = runs.map(|run| v128_load(run.add(p) as *const v128));
            let (low01, low23) = (i32x4_shuffle::<0, 4, 1, 5>(r0, r1), i32x4_shuffle::<0, 4, 1, 5>(r2, r3));
            let (high01, high23) = (i32x4_shuffle::<2, 6, 3, 7>(r0, r1), i32x4_shuffle::<2, 6, 3, 7>(r2, r3));
            let columns = [
                i64x2_shuffle::<0, 2>(low01, low23),
                i64x2_shuffle::<1, 3>(low01, low23),
                i64x2_shuffle::<0, 2>(high01, high23),
                i64x2_shuffle::<1, 3>(high01, high23),
            ];
            for (q, column) in columns.into_iter().enumerate() {
                v128_store(panel.as_mut_ptr().add((p + q) * width + first_run) as *mut v128, column);
            }
        }
    }
    steps
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn transpose_into(_panel: &mut [f32], _width: usize, _src: *const f32, _stride: isize, _kc: usize) -> usize {
    0
}

/// Writes the rows x cols corner of a tile into dst at (row, col): the rows of a tile of whole columns into
/// unit-stride rows straight from the registers, four lanes at a time; a tile with columns missing, or a destination
/// with strided columns, one value at a time.
#[cfg(target_arch = "wasm32")]
#[inline(always)]
unsafe fn store<const ROWS: usize>(tile: &Tile<ROWS>, dst: Dst, row: usize, rows: usize, col: usize, cols: usize, scale: Scale) {
    use core::arch::wasm32::*;
    if cols < NR || dst.col_stride != 1 {
        let mut values = [[0f32; NR]; ROWS];
        for (out, vectors) in values.iter_mut().zip(tile) {
            for (v, vector) in vectors.iter().enumerate() {
                v128_store(out.as_mut_ptr().add(v * LANES) as *mut v128, *vector);
            }
        }
        return store_values(&values, dst, row, rows, col, cols, scale);
    }
    let beta = f32x4_splat(scale.beta);
    for (i, vectors) in tile.iter().enumerate().take(rows) {
        let base = dst.ptr.offset((row + i) as isize * dst.row_stride + col as isize);
        for (v, &vector) in vectors.iter().enumerate() {
            let d = base.add(v * LANES) as *mut v128;
            let value = match scale.alpha {
                Some(alpha) => madd(beta, vector, f32x4_mul(f32x4_splat(alpha), v128_load(d))),
                None => f32x4_mul(beta, vector),
            };
            v128_store(d, value);
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn store<const ROWS: usize>(tile: &Tile<ROWS>, dst: Dst, row: usize, rows: usize, col: usize, cols: usize, scale: Scale) {
    store_values(tile, dst, row, rows, col, cols, scale)
}

unsafe fn store_values<const COLS: usize>(tile: &[[f32; COLS]], dst: Dst, row: usize, rows: usize, col: usize, cols: usize, scale: Scale) {
    for (i, values) in tile.iter().enumerate().take(rows) {
        let base = dst.ptr.offset((row + i) as isize * dst.row_stride + col as isize * dst.col_stride);
        for (j, &value) in values.iter().enumerate().take(cols) {
            let d = base.offset(j as isize * dst.col_stride);
            *d = match scale.alpha {
                Some(alpha) => alpha * *d + scale.beta * value,
                None => scale.beta * value,
            };
        }
    }
}

/// The ROWS x NR tile of a times b over kc steps: step p reads a's value of row i at `a[i] + p * a_step` and b's NR
/// contiguous values at `b + p * b_step` (packed panels, or operands read in place).
///
/// Safety: every value read must lie inside its operand.
#[cfg(target_arch = "wasm32")]
#[inline(always)]
unsafe fn microkernel<const ROWS: usize>(kc: usize, a: [*const f32; ROWS], a_step: usize, b: *const f32, b_step: usize) -> Tile<ROWS> {
    use core::arch::wasm32::*;
    let mut acc = [[f32x4_splat(0.0); NR / LANES]; ROWS];
    for p in 0..kc {
        let b_step = b.add(p * b_step);
        let bv: [v128; NR / LANES] = std::array::from_fn(|v| v128_load(b_step.add(v * LANES) as *const v128));
        for (row, a_row) in acc.iter_mut().zip(a) {
            let a_value = v128_load32_splat(a_row.add(p * a_step) as *const u32);
            for (c, &b_value) in row.iter_mut().zip(&bv) {
                *c = madd(a_value, b_value, *c);
            }
        }
    }
    acc
}

/// a * b + c per lane: fused (one rounding) where relaxed SIMD lets the engine use the CPU's FMA.
#[cfg(target_arch = "wasm32")]
#[inline(always)]
fn madd(a: core::arch::wasm32::v128, b: core::arch::wasm32::v128, c: core::arch::wasm32::v128) -> core::arch::wasm32::v128 {
    use core::arch::wasm32::*;
    #[cfg(target_feature = "relaxed-simd")]
    return f32x4_relaxed_madd(a, b, c);
    #[cfg(not(target_feature = "relaxed-simd"))]
    return f32x4_add(f32x4_mul(a, b), c);
}

/// The scalar microkernel the unit tests run: the same operands, the same tile.
#[cfg(not(target_arch = "wasm32"))]
unsafe fn microkernel<const ROWS: usize>(kc: usize, a: [*const f32; ROWS], a_step: usize, b: *const f32, b_step: usize) -> Tile<ROWS> {
    let mut tile = [[0f32; NR]; ROWS];
    for p in 0..kc {
        for (row, a_row) in tile.iter_mut().zip(a) {
            let a_value = *a_row.add(p * a_step);
            for (j, c) in row.iter_mut().enumerate() {
                *c += a_value * *b.add(p * b_step + j);
            }
        }
    }
    tile
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic matrix of small integers-over-eight, so that products are exact in f32.
    fn matrix(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + seed * 13) % 17) as f32 / 8.0 - 1.0).collect()
    }

    /// Runs `gemm` for one layout of each operand (row-major, or transposed storage) against a naive product.
    #[allow(clippy::too_many_arguments)]
    fn check(m: usize, n: usize, k: usize, lhs_t: bool, rhs_t: bool, read_dst: bool, alpha: f32, beta: f32, threads: usize) {
        let (lhs, rhs) = (matrix(m * k, 1), matrix(k * n, 2));
        // Element (i, p) of lhs sits at i * k + p (row-major) or p * m + i (stored transposed).
        let (lhs_rs, lhs_cs) = if lhs_t { (1, m as isize) } else { (k as isize, 1) };
        let (rhs_rs, rhs_cs) = if rhs_t { (1, k as isize) } else { (n as isize, 1) };
        // dst rows padded by 3, as attention writes one head's columns of a wider row.
        let dst_rs = n + 3;
        let initial = matrix(m * dst_rs, 3);
        let mut dst = if read_dst { initial.clone() } else { vec![f32::NAN; m * dst_rs] };
        unsafe {
            gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                dst_rs as isize,
                read_dst,
                lhs.as_ptr(),
                lhs_cs,
                lhs_rs,
                rhs.as_ptr(),
                rhs_cs,
                rhs_rs,
                alpha,
                beta,
                threads,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let product: f32 = (0..k)
                    .map(|p| {
                        lhs[(i as isize * lhs_rs + p as isize * lhs_cs) as usize]
                            * rhs[(p as isize * rhs_rs + j as isize * rhs_cs) as usize]
                    })
                    .sum();
                let expected = if read_dst { alpha * initial[i * dst_rs + j] + beta * product } else { beta * product };
                let got = dst[i * dst_rs + j];
                assert!(
                    (got - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                    "{m}x{k} @ {k}x{n} (lhs_t {lhs_t}, rhs_t {rhs_t}, read {read_dst}, threads {threads}): ({i}, {j}) = {got}, expected {expected}"
                );
            }
            for pad in n..dst_rs {
                let untouched = dst[i * dst_rs + pad];
                assert!(
                    if read_dst { untouched == initial[i * dst_rs + pad] } else { untouched.is_nan() },
                    "wrote past column {n} in row {i}"
                );
            }
        }
    }

    #[test]
    fn matches_a_naive_product_at_ragged_shapes_and_all_layouts() {
        // Not multiples of the tile, across block edges (MC, KC, NC) and below one tile.
        let shapes = [(1, 1, 1), (3, 5, 7), (13, 11, 9), (MC + 5, NC + 9, KC + 3), (2 * MC + 1, 2 * NR + 1, 2 * KC + 1), (64, 32, 64)];
        for &(m, n, k) in &shapes {
            for (lhs_t, rhs_t) in [(false, false), (false, true), (true, false), (true, true)] {
                check(m, n, k, lhs_t, rhs_t, false, 0.0, 1.0, 1);
                check(m, n, k, lhs_t, rhs_t, true, 1.0, 1.0, 1);
            }
        }
        check(37, 19, 23, false, true, false, 0.0, 0.125, 1);
        check(37, 19, 23, true, false, true, 0.5, -2.0, 1);
        check(37, 19, 0, false, false, true, 0.5, 1.0, 1);
    }

    #[test]
    fn few_rows_read_in_place_match_a_naive_product() {
        // Below DOT_ROWS, in the linear layer's layout (lhs rows and rhs columns contiguous along k) and the others:
        // ragged column tiles, an odd depth (over several of rows_in_place's passes), one row past a pair, and a
        // whole tile followed by one of two rows.
        for m in [1, 2, 3, MR + 1, DOT_ROWS - 1] {
            for (n, k) in [(1, 1), (5, 3), (13, 37), (2 * DOT_COLS + 3, KC + 5)] {
                check(m, n, k, false, true, false, 0.0, 1.0, 1);
                check(m, n, k, false, true, true, 0.5, -2.0, 1);
                check(m, n, k, true, false, true, 1.0, 1.0, 1);
                check(m, n, k, false, false, false, 0.0, 1.0, 1);
                check(m, n, k, false, false, true, 0.5, -2.0, 1);
                check(m, n, k, true, false, false, 0.0, 1.0, 1);
            }
        }
    }

    #[test]
    fn splits_rows_between_threads() {
        for threads in [2, 3] {
            check(MC + 5, 21, 40, false, true, true, 1.0, 1.0, threads);
            check(2 * MR + 1, 9, KC + 1, true, false, false, 0.0, 1.0, threads);
        }
    }
}
