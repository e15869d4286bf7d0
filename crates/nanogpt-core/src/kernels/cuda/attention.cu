// Causal self-attention, flash-attention style (kernels/attention.rs is the CPU kernel they mirror).
// qkv is (B, T, 3C) as the c_attn projection writes it: q, k and v side by side, head h at columns
// h*HS.. of each; out and dout are (B, T, C) with the heads merged. Scores are q.k / sqrt(HS), causal.
// No (T, T) matrix exists: the forward keeps a running softmax over tiles of keys and writes each row's
// log-sum-exp; the backward recomputes the probabilities from it. Dropout on the attention weights is
// the Attention site's mask at element ((b*NH + h)*T + i)*T + j, drawn again in the backward.
//
// Launch shape of all three kernels: grid (tiles of rows, B*NH), block WARPS warps. A warp owns ROWS
// rows (queries in the forward and dQ kernels, keys in the dK/dV kernel) and holds their accumulators in
// registers, one head dimension per lane (PER_LANE of them when HS > 32); each lane of the warp takes one
// element of the other side's tile of TILE = 32 (a key, or a query), so that a row's scores are one
// register per lane and their max and sum are warp shuffles. Tiles sit in shared memory as float.
//
// Sizes on Hopper (per SM: 228 KiB of shared memory, 64K registers, 64 warps; at most 48 KiB of static
// shared memory per block). The forward holds K and V tiles (32 x HS each), its 16 query rows and their
// weights; the backward kernels hold two 32 x HS tiles and two blocks of rows, and take 8 rows per block
// (ROWS=2) at HS=128 to stay under 48 KiB. nvcc 13 (-Xptxas -v, sm_90, no spills) reports, at HS=64 and
// HS=128: forward 64 and 72 registers, 22.1 and 42.1 KiB; dQ kernel 96 and 64 registers, 26.3 and
// 41.3 KiB; dK/dV kernel 80 and 56 registers, 28.5 and 42.5 KiB. That is 5 to 8 blocks (20 to 32 warps)
// per SM at HS=64, registers limiting, and 5 blocks (20 warps) at HS=128, shared memory limiting; the
// grids (T/16 or T/8 tiles x B*NH: 9216 blocks for the forward at B=12, NH=12, T=1024) fill 132 SMs
// many times over. Rows of a 32 x HS tile are padded to HS+1 floats where lane j reads row j, so that
// lane j hits bank (j + d) % 32. The score loops read one shared float per lane and ROWS broadcast floats
// per ROWS FMAs: these kernels are bound by shared-memory bandwidth. They serve f32, and bf16 at head sizes
// 16 and 32; bf16 at 64 and 128 runs on the tensor-core kernels (attention_tc, below).
namespace attention {

constexpr int WARPS = 4;
constexpr int TILE = WARP_SIZE;

// Rows per warp of the backward kernels: 4 (16 per block) where two 32 x HS tiles and the rows fit in
// 48 KiB of shared memory, 2 at HS=128. attention.rs's rows_per_block mirrors these.
template <int HS>
constexpr int BACKWARD_ROWS = HS >= 128 ? 2 : 4;
constexpr int FORWARD_ROWS = 4;

// Rows first..first+rows of an HS-wide slice of a row-major matrix (rows `stride` apart) into shared
// memory as float, rows `pitch` apart; rows past T read as zeros. The whole block copies, lanes along a
// row, so that global reads are coalesced.
template <typename X, int HS>
__device__ __forceinline__ void load_rows(float* tile, int pitch, const X* src, int stride, int first, int rows, int T) {
  for (int idx = threadIdx.x; idx < rows * HS; idx += blockDim.x) {
    const int r = idx / HS, d = idx % HS, row = first + r;
    tile[r * pitch + d] = row < T ? to_float(src[(size_t)row * stride + d]) : 0.0f;
  }
}

// The dropout factor of attention weight (i, j) of the (b, h) whose rows start at element `first`.
__device__ __forceinline__ float dropout_at(uint64_t first, int T, int i, int j, uint64_t stream, uint32_t threshold, float keep) {
  return threshold == 0 ? 1.0f : dropout_scale(stream, threshold, keep, first + (uint64_t)i * T + j);
}

// out (B, T, C) and lse (B, NH, T): per (b, h, tile of FORWARD_ROWS * WARPS queries), a running softmax
// over tiles of TILE keys. The weights applied to v are p_ij times the dropout factor, p normalised by
// the full softmax sum; lse is that sum's log (in units of the scaled scores), dropout excluded.
template <typename X, int HS>
__device__ void forward(X* out, float* lse, const X* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) {
  constexpr int ROWS = FORWARD_ROWS, BLOCK_ROWS = ROWS * WARPS, PER_LANE = (HS + WARP_SIZE - 1) / WARP_SIZE;
  // A block's queries lie inside one key tile, so each of them sees a key (the tile's first) of every tile
  // the block loads: no row has a tile with nothing to do, and the running max is finite from tile 0 on.
  static_assert(TILE % BLOCK_ROWS == 0, "a block of queries must not straddle key tiles");
  __shared__ float k_tile[TILE][HS + 1];
  __shared__ float v_tile[TILE][HS];
  __shared__ float q_rows[BLOCK_ROWS][HS];
  __shared__ float weights[BLOCK_ROWS][TILE];
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS);
  const uint64_t first_weight = (uint64_t)bh * T * T;
  // Later query tiles see more keys: scheduled first, they do not leave one long block at the grid's end.
  const int first_row = (gridDim.x - 1 - blockIdx.x) * BLOCK_ROWS;
  const X* q = qkv + (size_t)b * T * C3 + h * HS;
  const X* k = q + C;
  const X* v = q + 2 * C;
  load_rows<X, HS>(&q_rows[0][0], HS, q, C3, first_row, BLOCK_ROWS, T);

  // Warp w's r-th row is query first_row + r*WARPS + w: interleaved, the warps' causal extents are alike.
  float o[ROWS][PER_LANE] = {}, m[ROWS], l[ROWS];
  for (int r = 0; r < ROWS; ++r) m[r] = -INFINITY, l[r] = 0.0f;
  const int last_row = min(first_row + BLOCK_ROWS, T) - 1;
  for (int k0 = 0; k0 <= last_row; k0 += TILE) {
    __syncthreads();  // the previous tile's readers are done
    load_rows<X, HS>(&k_tile[0][0], HS + 1, k, C3, k0, TILE, T);
    load_rows<X, HS>(&v_tile[0][0], HS, v, C3, k0, TILE, T);
    __syncthreads();
    const int j = k0 + lane;
    float s[ROWS] = {};
    for (int d = 0; d < HS; ++d) {
      const float kd = k_tile[lane][d];
      for (int r = 0; r < ROWS; ++r) s[r] += q_rows[r * WARPS + warp][d] * kd;
    }
    for (int r = 0; r < ROWS; ++r) {
      const int row = r * WARPS + warp, i = first_row + row;
      if (i >= T) continue;  // warp-uniform: i is the same on every lane
      const bool seen = j <= i;
      const float m_new = fmaxf(m[r], warp_max(seen ? s[r] * scale : -INFINITY));
      const float p = seen ? __expf(s[r] * scale - m_new) : 0.0f;
      const float rescale = __expf(m[r] - m_new);
      l[r] = l[r] * rescale + warp_sum(p);
      m[r] = m_new;
      weights[row][lane] = seen ? p * dropout_at(first_weight, T, i, j, stream, threshold, keep) : 0.0f;
      for (int e = 0; e < PER_LANE; ++e) o[r][e] *= rescale;
    }
    __syncwarp();
    for (int r = 0; r < ROWS; ++r) {
      const int row = r * WARPS + warp, i = first_row + row;
      if (i >= T) continue;
      const int keys = min(TILE, i - k0 + 1);
      for (int jj = 0; jj < keys; ++jj) {
        const float w = weights[row][jj];
        for (int e = 0; e < PER_LANE; ++e) {
          const int d = lane + e * WARP_SIZE;
          if (d < HS) o[r][e] += w * v_tile[jj][d];
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const int i = first_row + r * WARPS + warp;
    if (i >= T) continue;
    const float inv = 1.0f / l[r];
    X* out_row = out + ((size_t)b * T + i) * C + h * HS;
    for (int e = 0; e < PER_LANE; ++e) {
      const int d = lane + e * WARP_SIZE;
      if (d < HS) out_row[d] = from_float<X>(o[r][e] * inv);
    }
    if (lane == 0) lse[(size_t)bh * T + i] = m[r] + logf(l[r]);
  }
}

// The backward's first kernel, per (b, h, tile of queries): D_i = dO_i . O_i (written to `delta` for the
// second kernel) and dQ, over the tiles of keys up to the query tile's last row, into dqkv's q part.
// D_i is the rowsum of P * dP that the softmax's backward needs, dropout or not: with W = P*M the applied
// weights, O = W V, dW = dO V^T and dP = dW*M, sum_j P_ij dP_ij = sum_j W_ij (dO_i . V_j) = dO_i . O_i.
// dQ has its own pass (recomputing S and dP) rather than atomics from the dK/dV kernel: it is written
// once, deterministically, in X, and needs no float (B, T, C) scratch; the price is two of the five
// tile products computed twice.
template <typename X, int HS>
__device__ void backward_query(X* dqkv, float* delta, const X* dout, const X* qkv, const X* out, const float* lse, int T, int C,
                               int NH, uint64_t stream, uint32_t threshold, float keep) {
  constexpr int ROWS = BACKWARD_ROWS<HS>, BLOCK_ROWS = ROWS * WARPS, PER_LANE = (HS + WARP_SIZE - 1) / WARP_SIZE;
  static_assert(TILE % BLOCK_ROWS == 0, "a block of queries must not straddle key tiles (see forward)");
  __shared__ float k_tile[TILE][HS + 1];
  __shared__ float v_tile[TILE][HS + 1];
  __shared__ float q_rows[BLOCK_ROWS][HS];
  __shared__ float do_rows[BLOCK_ROWS][HS];
  __shared__ float ds_rows[BLOCK_ROWS][TILE];
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS);
  const uint64_t first_weight = (uint64_t)bh * T * T;
  const int first_row = (gridDim.x - 1 - blockIdx.x) * BLOCK_ROWS;
  const X* q = qkv + (size_t)b * T * C3 + h * HS;
  const X* k = q + C;
  const X* v = q + 2 * C;
  const X* dout_bh = dout + (size_t)b * T * C + h * HS;
  load_rows<X, HS>(&q_rows[0][0], HS, q, C3, first_row, BLOCK_ROWS, T);
  load_rows<X, HS>(&do_rows[0][0], HS, dout_bh, C, first_row, BLOCK_ROWS, T);
  __syncthreads();

  float row_lse[ROWS], row_delta[ROWS], dq[ROWS][PER_LANE] = {};
  for (int r = 0; r < ROWS; ++r) {
    const int row = r * WARPS + warp, i = first_row + row;
    row_lse[r] = row_delta[r] = 0.0f;
    if (i >= T) continue;
    const X* out_row = out + ((size_t)b * T + i) * C + h * HS;
    float dot = 0.0f;
    for (int e = 0; e < PER_LANE; ++e) {
      const int d = lane + e * WARP_SIZE;
      if (d < HS) dot += do_rows[row][d] * to_float(out_row[d]);
    }
    row_delta[r] = warp_sum(dot);
    row_lse[r] = lse[(size_t)bh * T + i];
    if (lane == 0) delta[(size_t)bh * T + i] = row_delta[r];
  }

  const int last_row = min(first_row + BLOCK_ROWS, T) - 1;
  for (int k0 = 0; k0 <= last_row; k0 += TILE) {
    __syncthreads();
    load_rows<X, HS>(&k_tile[0][0], HS + 1, k, C3, k0, TILE, T);
    load_rows<X, HS>(&v_tile[0][0], HS + 1, v, C3, k0, TILE, T);
    __syncthreads();
    const int j = k0 + lane;
    float s[ROWS] = {}, dw[ROWS] = {};
    for (int d = 0; d < HS; ++d) {
      const float kd = k_tile[lane][d], vd = v_tile[lane][d];
      for (int r = 0; r < ROWS; ++r) {
        s[r] += q_rows[r * WARPS + warp][d] * kd;
        dw[r] += do_rows[r * WARPS + warp][d] * vd;
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const int row = r * WARPS + warp, i = first_row + row;
      if (i >= T) continue;
      float ds = 0.0f;
      if (j <= i) {
        const float p = __expf(s[r] * scale - row_lse[r]);
        ds = p * (dw[r] * dropout_at(first_weight, T, i, j, stream, threshold, keep) - row_delta[r]) * scale;
      }
      ds_rows[row][lane] = ds;
    }
    __syncwarp();
    for (int r = 0; r < ROWS; ++r) {
      const int row = r * WARPS + warp, i = first_row + row;
      if (i >= T) continue;
      const int keys = min(TILE, i - k0 + 1);
      for (int jj = 0; jj < keys; ++jj) {
        const float g = ds_rows[row][jj];
        for (int e = 0; e < PER_LANE; ++e) {
          const int d = lane + e * WARP_SIZE;
          if (d < HS) dq[r][e] += g * k_tile[jj][d];
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const int i = first_row + r * WARPS + warp;
    if (i >= T) continue;
    X* dq_row = dqkv + ((size_t)b * T + i) * C3 + h * HS;
    for (int e = 0; e < PER_LANE; ++e) {
      const int d = lane + e * WARP_SIZE;
      if (d < HS) dq_row[d] = from_float<X>(dq[r][e]);
    }
  }
}

// The backward's second kernel, per (b, h, tile of keys): dK and dV over the tiles of queries from the
// key tile's first row on, into dqkv's k and v parts. Needs `delta` from backward_query.
template <typename X, int HS>
__device__ void backward_key(X* dqkv, const X* dout, const X* qkv, const float* lse, const float* delta, int T, int C, int NH,
                             uint64_t stream, uint32_t threshold, float keep) {
  constexpr int ROWS = BACKWARD_ROWS<HS>, BLOCK_ROWS = ROWS * WARPS, PER_LANE = (HS + WARP_SIZE - 1) / WARP_SIZE;
  __shared__ float q_tile[TILE][HS + 1];
  __shared__ float do_tile[TILE][HS + 1];
  __shared__ float k_rows[BLOCK_ROWS][HS];
  __shared__ float v_rows[BLOCK_ROWS][HS];
  __shared__ float w_rows[BLOCK_ROWS][TILE];
  __shared__ float ds_rows[BLOCK_ROWS][TILE];
  __shared__ float lse_tile[TILE];
  __shared__ float delta_tile[TILE];
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS);
  const uint64_t first_weight = (uint64_t)bh * T * T;
  // Earlier keys are seen by more queries: their blocks come first.
  const int first_key = blockIdx.x * BLOCK_ROWS;
  const X* q = qkv + (size_t)b * T * C3 + h * HS;
  const X* k = q + C;
  const X* v = q + 2 * C;
  const X* dout_bh = dout + (size_t)b * T * C + h * HS;
  load_rows<X, HS>(&k_rows[0][0], HS, k, C3, first_key, BLOCK_ROWS, T);
  load_rows<X, HS>(&v_rows[0][0], HS, v, C3, first_key, BLOCK_ROWS, T);

  // Warp w's r-th row is key first_key + r*WARPS + w.
  float dk[ROWS][PER_LANE] = {}, dv[ROWS][PER_LANE] = {};
  for (int i0 = first_key; i0 < T; i0 += TILE) {
    __syncthreads();
    load_rows<X, HS>(&q_tile[0][0], HS + 1, q, C3, i0, TILE, T);
    load_rows<X, HS>(&do_tile[0][0], HS + 1, dout_bh, C, i0, TILE, T);
    if (threadIdx.x < TILE) {
      const int i = i0 + threadIdx.x;
      lse_tile[threadIdx.x] = i < T ? lse[(size_t)bh * T + i] : 0.0f;
      delta_tile[threadIdx.x] = i < T ? delta[(size_t)bh * T + i] : 0.0f;
    }
    __syncthreads();
    const int i = i0 + lane;
    float s[ROWS] = {}, dw[ROWS] = {};
    for (int d = 0; d < HS; ++d) {
      const float qd = q_tile[lane][d], dod = do_tile[lane][d];
      for (int r = 0; r < ROWS; ++r) {
        s[r] += qd * k_rows[r * WARPS + warp][d];
        dw[r] += dod * v_rows[r * WARPS + warp][d];
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const int row = r * WARPS + warp, j = first_key + row;
      float w = 0.0f, ds = 0.0f;
      if (j <= i && i < T) {
        const float p = __expf(s[r] * scale - lse_tile[lane]);
        const float drop = dropout_at(first_weight, T, i, j, stream, threshold, keep);
        w = p * drop;
        ds = p * (dw[r] * drop - delta_tile[lane]) * scale;
      }
      w_rows[row][lane] = w;
      ds_rows[row][lane] = ds;
    }
    __syncwarp();
    const int queries = min(TILE, T - i0);
    for (int r = 0; r < ROWS; ++r) {
      const int row = r * WARPS + warp;
      if (first_key + row >= T) continue;
      for (int ii = 0; ii < queries; ++ii) {
        const float w = w_rows[row][ii], g = ds_rows[row][ii];
        for (int e = 0; e < PER_LANE; ++e) {
          const int d = lane + e * WARP_SIZE;
          if (d < HS) {
            dv[r][e] += w * do_tile[ii][d];
            dk[r][e] += g * q_tile[ii][d];
          }
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const int j = first_key + r * WARPS + warp;
    if (j >= T) continue;
    X* dk_row = dqkv + ((size_t)b * T + j) * C3 + C + h * HS;
    for (int e = 0; e < PER_LANE; ++e) {
      const int d = lane + e * WARP_SIZE;
      if (d < HS) {
        dk_row[d] = from_float<X>(dk[r][e]);
        dk_row[C + d] = from_float<X>(dv[r][e]);
      }
    }
  }
}

}  // namespace attention

// Tensor-core kernels, for bf16 at head sizes 64 and 128 (GPT-2's sizes). Same contract as the kernels
// above (lse, dropout indices, D_i), with every tile product (Q.K^T and P.V in the forward; S = Q.K^T,
// dW = dO.V^T and dQ = dS.K in the dQ kernel; their transposes and dV = W^T.dO, dK = dS^T.Q in the dK/dV
// kernel) made of mma.sync tiles (common.cuh's mma_16x8x16), bf16 operands into float accumulators, as
// FlashAttention-2 does it. Their fragment layout is PTX's documented one, so the row-wise work (masking,
// the online softmax, dropout, dS) happens in registers, and a product's accumulators become the next
// product's A operand without leaving them: only the tiles of Q, K, V and dO pass through shared memory.
//
// A block of TC_WARPS warps owns BLOCK_ROWS<MT> rows (queries, or keys for the dK/dV kernel), MT tiles of 16 per warp:
// at HS=64 two (128-row blocks) or, where the GPU asks for 16 rows a warp (attention.rs), one (64-row blocks); at
// HS=128 one. It walks tiles of TC_COLS = 64 of the other side, double-buffered: the asynchronous copies
// (copy_tile_async) of tile i+1 run while the warps work on tile i. Each K, V, Q or dO element loaded into shared
// memory feeds the block's rows' products, and each operand a warp loads from the other side's tile feeds its row
// tiles' products. With g = lane / 4 and t = lane % 4, a lane holds, of each of its warp's tiles of 16 rows, rows g and
// g+8, against columns 2t and 2t+1 of every 8-column block: a row's max or sum is over the 4 lanes of its group (two
// shuffles).
//
// Operands reach registers through ldmatrix, four 8 x 8 matrices per instruction (transposed on the way
// where a tile's rows are a B operand's k, as V's in P.V).
//
// Shared memory is dynamic (attention.rs's tc_shared_bytes): 64 x HS bf16 tiles with rows padded by 8 elements (16
// bytes, which keeps rows 16-byte aligned for the copies and for ldmatrix, and puts the 8 rows of one ldmatrix matrix
// in distinct banks): in the forward K and V twice over (36 / 68 KiB at HS=64 / 128); in the backward the block's own
// rows' tiles (Q and dO, or K and V, MT tiles each) and the other side's two twice over, then the dK/dV kernel's
// per-query lse and D_i twice over (dQ kernel 72 / 102 KiB, dK/dV kernel 73 / 103 KiB; 54 and 55 KiB at HS=64 with
// MT = 1). The kernels have no static shared memory.
//
// Registers on Hopper (nvcc 13, -Xptxas -v, sm_90), at HS=64 / HS=128: forward 255 / 236, dQ kernel 255 / 170, dK/dV
// kernel 255 / 255. At HS=64 each kernel holds two row tiles' accumulators and runs 2 blocks per SM, 256 rows, spilling
// a few bytes: a whole tile of the other side without dropout takes 585 instructions with one local access in the
// forward, 620 with eleven in the dQ kernel and 814 with six in the dK/dV kernel, whose tile with dropout has 178 (its
// hash's registers beside both tiles' products). With one row tile a warp (the `_rows16` entry points: 128, 168 and
// 168 registers, 4, 3 and 3 blocks per SM, 256, 192 and 192 rows), the same 32 rows take 654, 694 and 868 instructions
// a whole tile, with twice the ldmatrix loads (64, 112 and 144 rather than 32, 65 and 81): shared-memory traffic beside
// the products' time on the tensor cores. Nsight Compute on an H200 showed those kernels latency-bound, on most cycles
// no warp ready to issue (bench/results/gpu-2026-11-30.md); the kernel benchmark times both shapes. At HS=128 the dK and
// dV accumulators, 64 floats each, spill a few bytes; GPT-2's head size is 64. At GPT-2's B=12, T=1024 the grids are
// T/128 x B*NH = 1152 blocks (2304 with 64-row blocks): several waves over 132 SMs.
namespace attention_tc {

constexpr int TC_WARPS = 4;
constexpr int TC_THREADS = TC_WARPS * WARP_SIZE;
constexpr int TC_ROWS = 16 * TC_WARPS;  // rows of a shared tile
constexpr int TC_COLS = 64;
constexpr int COL_BLOCKS = TC_COLS / 8;  // 8-column blocks of a warp's 16 x 64 products
constexpr int COL_STEPS = TC_COLS / 16;  // and 16-column steps, the k of the products that take them as A
template <int HS>
constexpr int TILE_LD = HS + 8;  // bf16 pitch of a 64 x HS tile
template <int HS>
constexpr int TILE_ELEMENTS = TC_ROWS * TILE_LD<HS>;
constexpr int PIECE = 8;  // bf16 per 16-byte piece
// Softmax in base 2 (fast_exp2): scores times log2(e) / sqrt(HS), lse back to natural log units.
constexpr float LOG2E = 1.4426950409f;
constexpr float LN2 = 0.6931471806f;

// Rows first..first+TC_ROWS of an HS-wide slice of a row-major bf16 matrix (rows `stride` apart) into a
// shared tile, rows TILE_LD apart, rows past T as zeros, as asynchronous copies (cp.async) into the calling
// thread's current group: the tile is in place once the thread has committed the group and waited for it,
// and the block has then passed a barrier. Where the slice's rows are 16-byte aligned (GPT-2's qkv and
// dout are) each copy moves 16 bytes; otherwise the copy is one bf16 per lane along a row, complete on
// return.
template <int HS>
__device__ __forceinline__ void copy_tile_async(bf16* tile, const bf16* src, int stride, int first, int T) {
  constexpr int PIECES_PER_ROW = HS / PIECE, PIECES = TC_ROWS * PIECES_PER_ROW / TC_THREADS, ROW_STEP = TC_THREADS / PIECES_PER_ROW;
  if ((uintptr_t)src % 16 != 0 || stride % PIECE != 0) {
    for (int idx = threadIdx.x; idx < TC_ROWS * HS; idx += TC_THREADS) {
      const int r = idx / HS, d = idx % HS, row = first + r;
      tile[r * TILE_LD<HS> + d] = row < T ? src[(size_t)row * stride + d] : from_float<bf16>(0.0f);
    }
    return;
  }
  // Thread x copies piece x % PIECES_PER_ROW of rows x / PIECES_PER_ROW + n * ROW_STEP.
  const int r0 = threadIdx.x / PIECES_PER_ROW, d = threadIdx.x % PIECES_PER_ROW * PIECE;
  bf16* to = tile + r0 * TILE_LD<HS> + d;
  if (first + TC_ROWS <= T) {
    // Every row exists: one address, stepped, rather than each piece's row and offset worked out afresh.
    const bf16* from = src + (size_t)(first + r0) * stride + d;
    const size_t step = (size_t)ROW_STEP * stride;
#pragma unroll
    for (int n = 0; n < PIECES; ++n) __pipeline_memcpy_async(to + n * ROW_STEP * TILE_LD<HS>, from + n * step, 16);
    return;
  }
#pragma unroll 1
  for (int n = 0; n < PIECES; ++n) {
    const int row = first + r0 + n * ROW_STEP;
    // Rows past T are zero-filled: nothing is read, from a row that exists.
    __pipeline_memcpy_async(to + n * ROW_STEP * TILE_LD<HS>, src + (size_t)min(row, T - 1) * stride + d, 16, row < T ? 0 : 16);
  }
}

// The operands of 16 x 8 x 16 tiles from shared memory (pitch LD), one ldmatrix for the warp each:
// - load_a: an A operand, the 16 rows at `rows`, k = columns k0..k0+15.
// - load_b_from_rows: B operands for two 8-column blocks of a product: n along rows n0..n0+15 of `tile`
//   ({b[0], b[1]} for rows n0.., {b[2], b[3]} for n0+8..), k = columns k0..k0+15. S = Q.K^T's K.
// - load_b_from_columns: the same with k along rows k0..k0+15 of `tile` and n = columns n0..n0+15
//   ({b[0], b[1]} for columns n0.., {b[2], b[3]} for n0+8..), transposed on the way. P.V's V.
// Rows are 16-byte aligned (TILE_LD), and the 8 rows of one matrix fall in distinct banks.
template <int LD>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* rows, int k0) {
  const int lane = threadIdx.x % WARP_SIZE;
  ldmatrix_x4(a, rows + (lane % 16) * LD + k0 + 8 * (lane / 16));
}
template <int LD>
__device__ __forceinline__ void load_b_from_rows(uint32_t (&b)[4], const bf16* tile, int n0, int k0) {
  const int lane = threadIdx.x % WARP_SIZE;
  ldmatrix_x4(b, tile + (n0 + lane % 8 + 8 * (lane / 16)) * LD + k0 + 8 * (lane / 8 % 2));
}
template <int LD>
__device__ __forceinline__ void load_b_from_columns(uint32_t (&b)[4], const bf16* tile, int k0, int n0) {
  const int lane = threadIdx.x % WARP_SIZE;
  ldmatrix_x4_transposed(b, tile + (k0 + lane % 8 + 8 * (lane / 8 % 2)) * LD + n0 + 8 * (lane / 16));
}

// d0 += a times the first B operand of `b` (registers 0, 1), d1 += a times the second (2, 3).
__device__ __forceinline__ void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t first[2] = {b[0], b[1]}, second[2] = {b[2], b[3]};
  mma_16x8x16(d0, a, first);
  mma_16x8x16(d1, a, second);
}

// 16 columns (8-column blocks 2s and 2s+1) of a warp's 16-row accumulators as the A operand of a product
// along those columns, rounded to bf16.
template <int BLOCKS>
__device__ __forceinline__ void accumulators_as_a(uint32_t (&a)[4], const float (&acc)[BLOCKS][4], int s) {
  a[0] = pack_bf16(acc[2 * s][0], acc[2 * s][1]);
  a[1] = pack_bf16(acc[2 * s][2], acc[2 * s][3]);
  a[2] = pack_bf16(acc[2 * s + 1][0], acc[2 * s + 1][1]);
  a[3] = pack_bf16(acc[2 * s + 1][2], acc[2 * s + 1][3]);
}

// The products below take a warp's MT tiles of 16 rows against STEPS 16-row steps of a shared tile (rows
// TILE_LD<HS> apart): each operand loaded from the tile feeds MT products. Their loops run over every step,
// skipping those outside [first, end), so that the register arrays are indexed by constants.

// acc[mt][cb] (row tile mt x 8-column block cb of the tile's rows) = rows (MT consecutive tiles of 16 x HS,
// shared) times the transpose of `tile` (16 STEPS x HS, shared), for the 16-column steps in [first, end); the
// other blocks are zeroed.
template <int HS, int MT, int STEPS = COL_STEPS>
__device__ __forceinline__ void rows_times_tile_transposed(float (&acc)[MT][2 * STEPS][4], const bf16* rows, const bf16* tile, int first, int end) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int cb = 0; cb < 2 * STEPS; ++cb) acc[mt][cb][0] = acc[mt][cb][1] = acc[mt][cb][2] = acc[mt][cb][3] = 0.0f;
#pragma unroll
  for (int ds = 0; ds < HS / 16; ++ds) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a<TILE_LD<HS>>(a[mt], rows + 16 * mt * TILE_LD<HS>, 16 * ds);
#pragma unroll
    for (int cs = 0; cs < STEPS; ++cs) {
      if (cs < first || cs >= end) continue;
      uint32_t b[4];
      load_b_from_rows<TILE_LD<HS>>(b, tile, 16 * cs, 16 * ds);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_pair(acc[mt][2 * cs], acc[mt][2 * cs + 1], a[mt], b);
    }
  }
}

// out[mt] (16 x HS in 8-column blocks) += operand[mt] (16 x 16 STEPS accumulators, as bf16) times `tile`
// (16 STEPS x HS, shared), over the operands' 16-column steps in [first, end).
template <int HS, int MT, int STEPS = COL_STEPS>
__device__ __forceinline__ void accumulate_times_tile(float (&out)[MT][HS / 8][4], const float (&operand)[MT][2 * STEPS][4], const bf16* tile,
                                                      int first, int end) {
#pragma unroll
  for (int cs = 0; cs < STEPS; ++cs) {
    if (cs < first || cs >= end) continue;
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) accumulators_as_a(a[mt], operand[mt], cs);
#pragma unroll
    for (int db = 0; db < HS / 8; db += 2) {
      uint32_t b[4];
      load_b_from_columns<TILE_LD<HS>>(b, tile, 16 * cs, 8 * db);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_pair(out[mt][db], out[mt][db + 1], a[mt], b);
    }
  }
}

// The two for a warp's one tile of 16 rows and a whole 64-row tile (the dK/dV kernel's).
template <int HS>
__device__ __forceinline__ void rows_times_tile_transposed(float (&acc)[COL_BLOCKS][4], const bf16* rows, const bf16* tile, int first, int end) {
  rows_times_tile_transposed<HS, 1>(reinterpret_cast<float(&)[1][COL_BLOCKS][4]>(acc), rows, tile, first, end);
}
template <int HS>
__device__ __forceinline__ void accumulate_times_tile(float (&out)[HS / 8][4], const float (&operand)[COL_BLOCKS][4], const bf16* tile, int first,
                                                      int end) {
  accumulate_times_tile<HS, 1>(reinterpret_cast<float(&)[1][HS / 8][4]>(out), reinterpret_cast<const float(&)[1][COL_BLOCKS][4]>(operand), tile,
                               first, end);
}

// Rows row0 + g and row0 + g + 8 of a warp's 16 x HS accumulators (times `factor[0]`, `factor[1]`), those
// before T, as bf16 into `dst` (rows `stride` apart).
template <int HS>
__device__ __forceinline__ void store_rows(bf16* dst, int stride, int row0, int T, const float (&acc)[HS / 8][4], const float (&factor)[2]) {
  const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= T) continue;
    bf16* at = dst + (size_t)row * stride + 2 * t;
#pragma unroll
    for (int db = 0; db < HS / 8; ++db) {
      at[8 * db] = from_float<bf16>(acc[db][2 * r] * factor[r]);
      at[8 * db + 1] = from_float<bf16>(acc[db][2 * r + 1] * factor[r]);
    }
  }
}

// MT, a kernel's tiles of 16 rows per warp (queries, or keys for the dK/dV kernel): with two, each operand loaded
// from the other side's shared tile feeds two products; at HS=128 a second tile's accumulators would not fit in
// registers. The backward kernels take the other side's tiles PART_STEPS 16-column steps at a time, so that MT row
// tiles' products (S and dW, or their transposes) fit beside the accumulators in registers.
template <int MT>
constexpr int BLOCK_ROWS = 16 * MT * TC_WARPS;
template <int MT>
constexpr int PART_STEPS = COL_STEPS / MT;

// attention::forward's contract, per (b, h, BLOCK_ROWS queries): a running softmax over tiles of 64 keys.
// Warp w owns its MT tiles of 16 queries from q0 = first_row + 16 MT w, keeps their Q
// operands in registers for every key tile, and on the diagonal tile skips the 16-key steps past its last
// query. Key tiles start at multiples of 64 and q0 at multiples of 16 MT, so a key tile either starts at or
// before q0 (every query of the warp sees its first key) or lies wholly past the warp's queries, and is
// skipped: with 128-row blocks, the block's last key tile is past its first two warps' queries.
template <int HS, int MT>
__device__ void forward(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) {
  constexpr int LD = TILE_LD<HS>, TILE = TILE_ELEMENTS<HS>, DIM_STEPS = HS / 16, ROWS = BLOCK_ROWS<MT>;
  static_assert(MT <= 2 && TC_COLS % (16 * MT) == 0, "the block's queries pass through buffer 1, and key tiles align with warps' queries");
  DYNAMIC_SHARED(bf16, attention_shared);
  // Buffer s holds K at tiles + 2s and V at tiles + 2s + 1 (in units of TILE).
  bf16* tiles = attention_shared;
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, g = lane / 4, t = lane % 4;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale_log2 = LOG2E / sqrtf((float)HS);
  const uint64_t first_weight = (uint64_t)bh * T * T;
  const int first_row = (gridDim.x - 1 - blockIdx.x) * ROWS, q0 = first_row + 16 * MT * warp;
  const bf16* q = qkv + (size_t)b * T * C3 + h * HS;
  const bf16* k = q + C;
  const bf16* v = q + 2 * C;

  // Q passes through buffer 1 (its K tile, then its V tile) into the warps' operands, while the first key tile
  // loads into buffer 0.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) copy_tile_async<HS>(tiles + (2 + mt) * TILE, q, C3, first_row + mt * TC_ROWS, T);
  __pipeline_commit();
  copy_tile_async<HS>(tiles, k, C3, 0, T);
  copy_tile_async<HS>(tiles + TILE, v, C3, 0, T);
  __pipeline_commit();
  __pipeline_wait_prior(1);  // this thread's Q copies are done...
  __syncthreads();           // ...and every thread's
  uint32_t q_frag[MT][DIM_STEPS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ds = 0; ds < DIM_STEPS; ++ds) load_a<LD>(q_frag[mt][ds], tiles + 2 * TILE + (q0 - first_row + 16 * mt) * LD, 16 * ds);
  __syncthreads();  // every warp holds its Q before the second tile is copied over it

  // Index [mt][r] is row q0 + 16 mt + g + 8r. m is the row's running max of scaled scores in base-2 units (times
  // log2 e), l this lane's share of the row's sum, summed over the group at the end (the rescales are the
  // group's alike).
  int rows[MT][2];
  float m[MT][2], l[MT][2], o[MT][HS / 8][4] = {};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) rows[mt][r] = q0 + 16 * mt + g + 8 * r, m[mt][r] = -INFINITY, l[mt][r] = 0.0f;
  const bool active = q0 < T;  // warp-uniform
  const int last_row = min(first_row + ROWS, T) - 1;
  for (int k0 = 0, s = 0; k0 <= last_row; k0 += TC_COLS, s ^= 1) {
    // Buffer s^1 was last read in the previous iteration, which every warp has left (the barrier at its end).
    if (k0 + TC_COLS <= last_row) {
      copy_tile_async<HS>(tiles + 2 * (s ^ 1) * TILE, k, C3, k0 + TC_COLS, T);
      copy_tile_async<HS>(tiles + (2 * (s ^ 1) + 1) * TILE, v, C3, k0 + TC_COLS, T);
    }
    __pipeline_commit();       // empty after the last tile, so that the wait below always means tile s
    __pipeline_wait_prior(1);  // this thread's copies of tile s are done...
    __syncthreads();           // ...and every thread's
    const bf16* k_tile = tiles + 2 * s * TILE;
    const bf16* v_tile = k_tile + TILE;
    // The tile's work, compiled per case (with_cases). On the diagonal (a tile that reaches past the warp's
    // first query) it masks and takes a run-time count of 16-key steps; below it nothing is masked and every
    // loop has constant bounds, so ptxas issues a product's ldmatrix loads ahead of its mma rather than one
    // before each. Without dropout no hash is computed: a run-time test per element let nvcc compute the
    // hash for every element and select.
    const auto attend = [&](auto diagonal_case, auto dropout_case) {
      constexpr bool DIAGONAL = decltype(diagonal_case)::value, DROPOUT = decltype(dropout_case)::value;
      // 16-key steps with a key that some row of the warp sees (its last tile's rows see the most): k0 <= q0,
      // so at least one.
      const int steps = DIAGONAL ? min(COL_STEPS, (q0 + 16 * (MT - 1) - k0) / 16 + 1) : COL_STEPS;
      float p[MT][COL_BLOCKS][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int cb = 0; cb < COL_BLOCKS; ++cb) p[mt][cb][0] = p[mt][cb][1] = p[mt][cb][2] = p[mt][cb][3] = 0.0f;
#pragma unroll
      for (int ds = 0; ds < DIM_STEPS; ++ds)
#pragma unroll
        for (int cs = 0; cs < COL_STEPS; ++cs) {
          if (cs >= steps) continue;
          uint32_t kt[4];
          load_b_from_rows<LD>(kt, k_tile, 16 * cs, 16 * ds);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_pair(p[mt][2 * cs], p[mt][2 * cs + 1], q_frag[mt][ds], kt);
        }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // Masked scores, then the rows' new maxima (key k0 is visible to every row, so they are finite from the
        // first tile on).
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int cb = 0; cb < COL_BLOCKS; ++cb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (DIAGONAL && (cb / 2 >= steps || k0 + 8 * cb + 2 * t + e % 2 > rows[mt][e / 2])) p[mt][cb][e] = -INFINITY;
            tile_max[e / 2] = fmaxf(tile_max[e / 2], p[mt][cb][e]);
          }
        float rescale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
          const float m_new = fmaxf(m[mt][r], tile_max[r] * scale_log2);
          rescale[r] = fast_exp2(m[mt][r] - m_new);
          m[mt][r] = m_new;
          l[mt][r] *= rescale[r];
        }
#pragma unroll
        for (int db = 0; db < HS / 8; ++db)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[mt][db][e] *= rescale[e / 2];
        // Probabilities, scaled and shifted in one multiply-add: the sum takes them as they are, P.V with the
        // dropout factor.
#pragma unroll
        for (int cb = 0; cb < COL_BLOCKS; ++cb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            p[mt][cb][e] = fast_exp2(fmaf(p[mt][cb][e], scale_log2, -m[mt][e / 2]));
            l[mt][e / 2] += p[mt][cb][e];
          }
        if (DROPOUT) {
#pragma unroll
          for (int cb = 0; cb < COL_BLOCKS; ++cb)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              p[mt][cb][e] *= dropout_scale(stream, threshold, keep, first_weight + (uint64_t)rows[mt][e / 2] * T + k0 + 8 * cb + 2 * t + e % 2);
        }
      }
      accumulate_times_tile<HS, MT>(o, p, v_tile, 0, steps);
    };
    if (active && k0 <= q0) with_cases(k0 + TC_COLS > q0, threshold != 0, attend);
    __syncthreads();  // every warp is done with buffer s before the next iteration copies into it
  }
  if (!active) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inverse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
      inverse[r] = 1.0f / l[mt][r];
      if (t == 0 && rows[mt][r] < T) lse[(size_t)bh * T + rows[mt][r]] = m[mt][r] * LN2 + logf(l[mt][r]);
    }
    store_rows<HS>(out + (size_t)b * T * C + h * HS, C, q0 + 16 * mt, T, o[mt], inverse);
  }
}

// attention::backward_query's contract, per (b, h, BLOCK_ROWS queries): D_i, then over the key tiles S = Q.K^T
// and dW = dO.V^T, dS from them, and dQ += dS.K, accumulated in registers across tiles (nothing rescales them).
// Warps own their queries as in the forward, and take each key tile in parts of PART_STEPS 16-key steps. The
// block's Q and dO rows stay in shared memory, where the warps read their operands per part.
template <int HS, int MT>
__device__ void backward_query(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C,
                               int NH, uint64_t stream, uint32_t threshold, float keep) {
  constexpr int LD = TILE_LD<HS>, TILE = TILE_ELEMENTS<HS>, ROWS = BLOCK_ROWS<MT>, STEPS = PART_STEPS<MT>;
  DYNAMIC_SHARED(bf16, attention_shared);
  // The block's Q and dO (MT tiles each), then buffer s's K at tiles + 2s and V at tiles + 2s + 1 (in units of
  // TILE).
  bf16 *q_rows = attention_shared, *do_rows = attention_shared + MT * TILE, *tiles = attention_shared + 2 * MT * TILE;
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, g = lane / 4, t = lane % 4;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS), scale_log2 = LOG2E * scale;
  const uint64_t first_weight = (uint64_t)bh * T * T;
  const int first_row = (gridDim.x - 1 - blockIdx.x) * ROWS, q0 = first_row + 16 * MT * warp;
  const bf16* q = qkv + (size_t)b * T * C3 + h * HS;
  const bf16* k = q + C;
  const bf16* v = q + 2 * C;
  const bf16* dout_bh = dout + (size_t)b * T * C + h * HS;
  const bf16* my_q = q_rows + (q0 - first_row) * LD;
  const bf16* my_do = do_rows + (q0 - first_row) * LD;

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    copy_tile_async<HS>(q_rows + mt * TILE, q, C3, first_row + mt * TC_ROWS, T);
    copy_tile_async<HS>(do_rows + mt * TILE, dout_bh, C, first_row + mt * TC_ROWS, T);
  }
  __pipeline_commit();
  copy_tile_async<HS>(tiles, k, C3, 0, T);
  copy_tile_async<HS>(tiles + TILE, v, C3, 0, T);
  __pipeline_commit();
  __pipeline_wait_prior(1);  // this thread's Q and dO copies are done...
  __syncthreads();           // ...and every thread's

  // Index [mt][r] is row q0 + 16 mt + g + 8r: D_i = dO_i . out_i over the group's lanes, each taking every 4th
  // column.
  int rows[MT][2];
  float row_lse[MT][2], row_delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q0 + 16 * mt + g + 8 * r;
      rows[mt][r] = row;
      row_lse[mt][r] = row_delta[mt][r] = 0.0f;
      if (row < T) {
        const bf16* out_row = out + ((size_t)b * T + row) * C + h * HS;
        for (int d = t; d < HS; d += 4) row_delta[mt][r] += to_float(my_do[(16 * mt + g + 8 * r) * LD + d]) * to_float(out_row[d]);
        row_lse[mt][r] = lse[(size_t)bh * T + row] * LOG2E;  // base 2, as the probabilities are taken
      }
      row_delta[mt][r] += __shfl_xor_sync(0xffffffffu, row_delta[mt][r], 1);
      row_delta[mt][r] += __shfl_xor_sync(0xffffffffu, row_delta[mt][r], 2);
      if (t == 0 && row < T) delta[(size_t)bh * T + row] = row_delta[mt][r];
    }

  float dq[MT][HS / 8][4] = {};
  const bool active = q0 < T;  // warp-uniform
  const int last_row = min(first_row + ROWS, T) - 1;
  for (int k0 = 0, s = 0; k0 <= last_row; k0 += TC_COLS, s ^= 1) {
    // Buffer s^1 was last read in the previous iteration, which every warp has left (the barrier at its end).
    if (k0 + TC_COLS <= last_row) {
      copy_tile_async<HS>(tiles + 2 * (s ^ 1) * TILE, k, C3, k0 + TC_COLS, T);
      copy_tile_async<HS>(tiles + (2 * (s ^ 1) + 1) * TILE, v, C3, k0 + TC_COLS, T);
    }
    __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    const bf16* k_tile = tiles + 2 * s * TILE;
    const bf16* v_tile = k_tile + TILE;
    // Compiled per case, as the forward's tile: on the diagonal with masks, below it whole; with dropout or
    // without.
    const auto differentiate = [&](auto diagonal_case, auto dropout_case) {
      constexpr bool DIAGONAL = decltype(diagonal_case)::value, DROPOUT = decltype(dropout_case)::value;
      const int steps = DIAGONAL ? min(COL_STEPS, (q0 + 16 * (MT - 1) - k0) / 16 + 1) : COL_STEPS;
#pragma unroll
      for (int part = 0; part < COL_STEPS; part += STEPS) {
        if (part >= steps) continue;
        // Keys k0 + 16 part.. of the tile, the part's steps before `end` holding a key some row sees.
        const int key0 = k0 + 16 * part, end = steps - part;
        const bf16 *k_part = k_tile + 16 * part * LD, *v_part = v_tile + 16 * part * LD;
        float ds[MT][2 * STEPS][4], dw[MT][2 * STEPS][4];
        rows_times_tile_transposed<HS, MT, STEPS>(ds, my_q, k_part, 0, end);
        rows_times_tile_transposed<HS, MT, STEPS>(dw, my_do, v_part, 0, end);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int cb = 0; cb < 2 * STEPS; ++cb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = rows[mt][e / 2], j = key0 + 8 * cb + 2 * t + e % 2;
              const float p = fast_exp2(fmaf(ds[mt][cb][e], scale_log2, -row_lse[mt][e / 2]));
              const float dp = DROPOUT ? dw[mt][cb][e] * dropout_scale(stream, threshold, keep, first_weight + (uint64_t)i * T + j) : dw[mt][cb][e];
              ds[mt][cb][e] = DIAGONAL && (cb / 2 >= end || j > i) ? 0.0f : p * (dp - row_delta[mt][e / 2]) * scale;
            }
        accumulate_times_tile<HS, MT, STEPS>(dq, ds, k_part, 0, end);
      }
    };
    if (active && k0 <= q0) with_cases(k0 + TC_COLS > q0, threshold != 0, differentiate);
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) store_rows<HS>(dqkv + (size_t)b * T * C3 + h * HS, C3, q0 + 16 * mt, T, dq[mt], {1.0f, 1.0f});
}

// attention::backward_key's contract, per (b, h, BLOCK_ROWS keys): over the query tiles from the block's first
// key on, S^T = K.Q^T and dW^T = V.dO^T (row g of a warp's tile is key j, a column query i), W^T and dS^T from
// them, and dV += W^T.dO, dK += dS^T.Q in registers. Warp w owns its MT tiles of 16 keys from
// j0 = first_key + 16 MT w, and takes each query tile in parts of PART_STEPS 16-query steps. The block's K and V
// rows stay in shared memory; each query tile comes with its queries' lse and D_i. A warp skips a query tile
// wholly before its keys (with 128-key blocks, the block's first query tile for its last two warps), and the
// 16-query steps before its first key.
template <int HS, int MT>
__device__ void backward_key(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH,
                             uint64_t stream, uint32_t threshold, float keep) {
  constexpr int LD = TILE_LD<HS>, TILE = TILE_ELEMENTS<HS>, ROWS = BLOCK_ROWS<MT>, STEPS = PART_STEPS<MT>;
  DYNAMIC_SHARED(bf16, attention_shared);
  // The block's K and V (MT tiles each), then buffer s's Q at tiles + 2s and dO at tiles + 2s + 1 (in units of
  // TILE), then buffer s's lse and D_i at query_values + 2s * TC_COLS and + (2s + 1) * TC_COLS.
  bf16 *k_rows = attention_shared, *v_rows = attention_shared + MT * TILE, *tiles = attention_shared + 2 * MT * TILE;
  float* query_values = reinterpret_cast<float*>(tiles + 4 * TILE);
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, g = lane / 4, t = lane % 4;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS), scale_log2 = LOG2E * scale;
  const uint64_t first_weight = (uint64_t)bh * T * T;
  // Earlier keys are seen by more queries: their blocks come first.
  const int first_key = blockIdx.x * ROWS, j0 = first_key + 16 * MT * warp;
  const bf16* q = qkv + (size_t)b * T * C3 + h * HS;
  const bf16* k = q + C;
  const bf16* v = q + 2 * C;
  const bf16* dout_bh = dout + (size_t)b * T * C + h * HS;
  const bf16* my_k = k_rows + (j0 - first_key) * LD;
  const bf16* my_v = v_rows + (j0 - first_key) * LD;
  // A query tile's lse (in base 2, as the probabilities are taken) and D_i, by the block's first 64 threads,
  // as plain stores: the barrier after the tile's copies publishes them.
  const auto load_query_values = [&](int i0, int s) {
    const int i = i0 + (int)threadIdx.x;
    if (threadIdx.x < TC_COLS) {
      query_values[2 * s * TC_COLS + threadIdx.x] = i < T ? lse[(size_t)bh * T + i] * LOG2E : 0.0f;
      query_values[(2 * s + 1) * TC_COLS + threadIdx.x] = i < T ? delta[(size_t)bh * T + i] : 0.0f;
    }
  };

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    copy_tile_async<HS>(k_rows + mt * TILE, k, C3, first_key + mt * TC_ROWS, T);
    copy_tile_async<HS>(v_rows + mt * TILE, v, C3, first_key + mt * TC_ROWS, T);
  }
  copy_tile_async<HS>(tiles, q, C3, first_key, T);
  copy_tile_async<HS>(tiles + TILE, dout_bh, C, first_key, T);
  load_query_values(first_key, 0);
  __pipeline_commit();

  // Index [mt][r] is key j0 + 16 mt + g + 8r.
  float dk[MT][HS / 8][4] = {}, dv[MT][HS / 8][4] = {};
  int keys[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) keys[mt][0] = j0 + 16 * mt + g, keys[mt][1] = j0 + 16 * mt + g + 8;
  const bool active = j0 < T;  // warp-uniform
  for (int i0 = first_key, s = 0; i0 < T; i0 += TC_COLS, s ^= 1) {
    if (i0 + TC_COLS < T) {
      copy_tile_async<HS>(tiles + 2 * (s ^ 1) * TILE, q, C3, i0 + TC_COLS, T);
      copy_tile_async<HS>(tiles + (2 * (s ^ 1) + 1) * TILE, dout_bh, C, i0 + TC_COLS, T);
      load_query_values(i0 + TC_COLS, s ^ 1);
    }
    __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    const bf16* q_tile = tiles + 2 * s * TILE;
    const bf16* do_tile = q_tile + TILE;
    const float* tile_lse = query_values + 2 * s * TC_COLS;
    const float* tile_delta = tile_lse + TC_COLS;
    // Compiled per case, as the forward's tile: a tile with pairs to mask (it reaches back before the warp's
    // last key, or past T) takes run-time bounds on its 16-query steps, a tile with none is whole; with
    // dropout or without.
    const auto differentiate = [&](auto edge_case, auto dropout_case) {
      constexpr bool EDGE = decltype(edge_case)::value, DROPOUT = decltype(dropout_case)::value;
      // 16-query steps with a query at or after some key of the warp, and before T.
      const int first = EDGE ? max(0, (j0 - i0) / 16) : 0, end = EDGE ? min(COL_STEPS, (T - i0 + 15) / 16) : COL_STEPS;
#pragma unroll
      for (int part = 0; part < COL_STEPS; part += STEPS) {
        if (part + STEPS <= first || part >= end) continue;
        // Queries i0 + 16 part.. of the tile; the part's own steps in [part_first, part_end).
        const int query0 = i0 + 16 * part, part_first = first - part, part_end = end - part;
        const bf16 *q_part = q_tile + 16 * part * LD, *do_part = do_tile + 16 * part * LD;
        const float *part_lse = tile_lse + 16 * part, *part_delta = tile_delta + 16 * part;
        float w[MT][2 * STEPS][4], ds[MT][2 * STEPS][4];
        rows_times_tile_transposed<HS, MT, STEPS>(w, my_k, q_part, part_first, part_end);
        rows_times_tile_transposed<HS, MT, STEPS>(ds, my_v, do_part, part_first, part_end);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int cb = 0; cb < 2 * STEPS; ++cb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = 8 * cb + 2 * t + e % 2, i = query0 + c, j = keys[mt][e / 2];
              const float p = fast_exp2(fmaf(w[mt][cb][e], scale_log2, -part_lse[c]));
              const float drop = DROPOUT ? dropout_scale(stream, threshold, keep, first_weight + (uint64_t)i * T + j) : 1.0f;
              const bool masked = EDGE && (cb / 2 < part_first || cb / 2 >= part_end || j > i || i >= T);
              w[mt][cb][e] = masked ? 0.0f : p * drop;
              ds[mt][cb][e] = masked ? 0.0f : p * (ds[mt][cb][e] * drop - part_delta[c]) * scale;
            }
        accumulate_times_tile<HS, MT, STEPS>(dv, w, do_part, part_first, part_end);
        accumulate_times_tile<HS, MT, STEPS>(dk, ds, q_part, part_first, part_end);
      }
    };
    if (active && i0 + TC_COLS > j0) with_cases(i0 < j0 + 16 * MT || i0 + TC_COLS > T, threshold != 0, differentiate);
    __syncthreads();
  }
  if (!active) return;
  bf16* dk_rows = dqkv + (size_t)b * T * C3 + C + h * HS;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    store_rows<HS>(dk_rows, C3, j0 + 16 * mt, T, dk[mt], {1.0f, 1.0f});
    store_rows<HS>(dk_rows + C, C3, j0 + 16 * mt, T, dv[mt], {1.0f, 1.0f});
  }
}

}  // namespace attention_tc

// Entry points, one per head size and precision (the tile shapes are compile-time): grid
// (ceil(T / rows per block), B*NH), block WARPS * 32 threads. The CUDA-core kernels (f32 at every head
// size, bf16 at 16 and 32) take no dynamic shared memory; the tensor-core ones (`_tc_`, bf16 at 64 and
// 128) take attention.rs's tc_shared_bytes. At head size 64 they come with 32 rows a warp (MT = 2) and, as
// `_rows16_`, with 16 (MT = 1), bounded to the blocks per SM they ran best at: 4 for the forward, 3 for the
// dK/dV kernel (bench/results/gpu-2026-11-30.md).
extern "C" __global__ void attention_forward_hs16_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 16>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs32_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 32>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs64_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 64>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs128_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 128>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs16_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 16>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs32_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 32>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_tc_hs64_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::forward<64, 2>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void __launch_bounds__(attention_tc::TC_THREADS, 4) attention_forward_tc_hs64_rows16_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::forward<64, 1>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_tc_hs128_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::forward<128, 1>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs16_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 16>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs32_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 32>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs64_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 64>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs128_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 128>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs16_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<bf16, 16>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs32_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<bf16, 32>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs16_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 16>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs32_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 32>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs64_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 64>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs128_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 128>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs16_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<bf16, 16>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs32_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<bf16, 32>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_tc_hs64_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_query<64, 2>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void __launch_bounds__(attention_tc::TC_THREADS, 3) attention_backward_query_tc_hs64_rows16_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_query<64, 1>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_tc_hs128_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_query<128, 1>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_tc_hs64_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_key<64, 2>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void __launch_bounds__(attention_tc::TC_THREADS, 3) attention_backward_key_tc_hs64_rows16_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_key<64, 1>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_tc_hs128_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_key<128, 1>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
