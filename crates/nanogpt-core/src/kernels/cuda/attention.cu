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
// above (lse, dropout indices, D_i), with every tile product a tensor-core product of bf16 operands into
// float accumulators: Q.K^T and P.V in the forward as mma.sync tiles whose layout PTX documents (the
// softmax stays in registers, see forward), dS.K, dS^T.Q, P^T.dO and dO.V^T in the backward as wmma
// m16n16k16 products.
//
// A block of TC_WARPS warps owns TC_ROWS = 64 rows (queries, or keys for the dK/dV kernel), 16 per warp,
// and walks tiles of TC_COLS = 64 of the other side. 64 x 64 tiles give each warp 16 x 64 scores per
// (16 x HS) x (HS x 64) product: each K or V element loaded into shared memory feeds 64 rows' products
// (against 16 for the CUDA-core kernels), to move these kernels from shared-memory bound towards
// tensor-core bound. A wmma fragment's element-to-lane mapping is unspecified, so the backward's row-wise
// work (masking, dropout, dS) is done on an f32 copy of the score tile in shared memory: lane pair
// (2r, 2r+1) owns row r of its warp's 16, every other column.
// Shared memory is dynamic (attention.rs's tc_shared_bytes): the K and V (or Q and dO) tiles as bf16, twice
// over in the forward (double-buffered), with rows padded by 8 elements (16 bytes, keeping wmma's 32-byte
// alignment per 16 rows while shifting banks, and the forward's operand reads free of bank conflicts); in
// the backward also per warp two 16 x 64 bf16 operand tiles (W^T and dS^T) and a float scratch of 16 rows,
// max(128, HS) + 4 wide (two score tiles side by side), and 2 x 64 per-row floats. Every region starts at
// a multiple of 32 bytes, and the kernels have no static shared memory, so the dynamic block starts
// aligned. Global reads of the tiles are 16 bytes per lane where the rows are aligned for it: asynchronous
// copies in the forward (copy_tile_async), loads through registers in the backward (load_tile), whose
// kernels have no shared memory to spare for a second pair of tiles.
//
// Sizes on Hopper (nvcc 13, -Xptxas -v, sm_90, no spills), at HS=64 / HS=128: forward 168 / 251 registers,
// 36 / 68 KiB; dQ kernel 130 / 226 registers, 69.5 / 85.5 KiB; dK/dV kernel 168 / 255 registers, 69.5 /
// 85.5 KiB. Per SM (64K registers, 228 KiB) that is 3 / 2 blocks of 4 warps for the forward, registers
// limiting, and 2 or 3 for the backward, limited by shared memory or registers; the dK/dV kernel at HS=128 keeps K, V fragments and dK, dV accumulators (16
// fragments each) in registers, at the 255 limit. 64-row blocks give T/64 x B*NH = 2304 blocks at GPT-2's
// B=12, T=1024: several waves over 132 SMs.
namespace attention_tc {
using namespace nvcuda;

constexpr int TC_WARPS = 4;
constexpr int TC_ROWS = 16 * TC_WARPS;
constexpr int TC_COLS = 64;
constexpr int OPERAND_LD = TC_COLS + 8;  // bf16 pitch of a warp's 16 x 64 operand tile
template <int HS>
constexpr int TILE_LD = HS + 8;  // bf16 pitch of a 64 x HS tile
// Float pitch of a backward warp's scratch: two 16 x 64 score tiles side by side, or 16 x HS gradients.
template <int HS>
constexpr int BACKWARD_LD = (HS > 2 * TC_COLS ? HS : 2 * TC_COLS) + 4;

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Accumulator;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> RowsA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> RowsB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> ColumnsB;

// Rows first..first+TC_ROWS of an HS-wide slice of a row-major bf16 matrix (rows `stride` apart) into a
// shared tile, rows TILE_LD apart; rows past T read as zeros. Where the slice's rows are 16-byte aligned
// (GPT-2's qkv and dout are), each thread moves 16-byte pieces, LOADS_IN_FLIGHT loads issued before their
// stores: a tile then waits for one memory latency per batch (2 batches at HS=64, 4 at HS=128) rather
// than one per element, which bounded these kernels when each thread copied one bf16 at a time (64
// loads in turn per 64 x 64 tile). Batches of 2 and a loop over them (unroll 1) keep the dQ kernel at
// HS=64 at 130 registers (4 in flight took the forward to 168, one block fewer per SM) and the dK/dV
// kernel at HS=128, at the register limit, from spilling.
// Otherwise one bf16 per lane along a row, coalesced.
constexpr int TC_THREADS = TC_WARPS * WARP_SIZE;
constexpr int LOADS_IN_FLIGHT = 2;
constexpr int PIECE = 8;  // bf16 per 16-byte piece

__device__ __forceinline__ bool rows_aligned(const bf16* src, int stride) { return (uintptr_t)src % 16 == 0 && stride % PIECE == 0; }

template <int HS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* src, int stride, int first, int T) {
  constexpr int PIECES_PER_ROW = HS / PIECE, PIECES = TC_ROWS * PIECES_PER_ROW / TC_THREADS;
  static_assert(PIECES % LOADS_IN_FLIGHT == 0, "a thread's pieces come in whole batches");
  if (!rows_aligned(src, stride)) {
    for (int idx = threadIdx.x; idx < TC_ROWS * HS; idx += TC_THREADS) {
      const int r = idx / HS, d = idx % HS, row = first + r;
      tile[r * TILE_LD<HS> + d] = row < T ? src[(size_t)row * stride + d] : from_float<bf16>(0.0f);
    }
    return;
  }
#pragma unroll 1
  for (int batch = 0; batch < PIECES; batch += LOADS_IN_FLIGHT) {
    uint4 piece[LOADS_IN_FLIGHT];
#pragma unroll
    for (int n = 0; n < LOADS_IN_FLIGHT; ++n) {
      const int idx = threadIdx.x + (batch + n) * TC_THREADS, row = first + idx / PIECES_PER_ROW;
      piece[n] = row < T ? *reinterpret_cast<const uint4*>(src + (size_t)row * stride + idx % PIECES_PER_ROW * PIECE) : uint4{0, 0, 0, 0};
    }
#pragma unroll
    for (int n = 0; n < LOADS_IN_FLIGHT; ++n) {
      const int idx = threadIdx.x + (batch + n) * TC_THREADS;
      *reinterpret_cast<uint4*>(tile + idx / PIECES_PER_ROW * TILE_LD<HS> + idx % PIECES_PER_ROW * PIECE) = piece[n];
    }
  }
}

// load_tile's contract, as asynchronous copies (cp.async) into the calling thread's current group: the tile
// is in place once the thread has committed the group and waited for it, and the block has then passed a
// barrier. No registers hold the data on its way, so the forward fetches the next key tile while it works
// on this one. Misaligned rows take load_tile's element copies, complete on return.
template <int HS>
__device__ __forceinline__ void copy_tile_async(bf16* tile, const bf16* src, int stride, int first, int T) {
  constexpr int PIECES_PER_ROW = HS / PIECE, PIECES = TC_ROWS * PIECES_PER_ROW / TC_THREADS;
  if (!rows_aligned(src, stride)) {
    load_tile<HS>(tile, src, stride, first, T);
    return;
  }
  // Not unrolled: the forward would hold every piece's address, 167 registers against 140.
#pragma unroll 1
  for (int n = 0; n < PIECES; ++n) {
    const int idx = threadIdx.x + n * TC_THREADS, r = idx / PIECES_PER_ROW, d = idx % PIECES_PER_ROW * PIECE, row = first + r;
    // Rows past T are zero-filled: nothing is read, from a row that exists.
    __pipeline_memcpy_async(tile + r * TILE_LD<HS> + d, src + (size_t)min(row, T - 1) * stride + d, 16, row < T ? 0 : 16);
  }
}

// The warp's 16 rows (from `rows`, pitch TILE_LD) as HS/16 operand fragments, for products along HS.
template <int HS>
__device__ __forceinline__ void load_row_fragments(RowsA (&a)[HS / 16], const bf16* rows) {
  for (int d = 0; d < HS / 16; ++d) wmma::load_matrix_sync(a[d], rows + 16 * d, TILE_LD<HS>);
}

// scores (16 x 64, pitch SLD; column blocks first..end-1 written) = a (16 x HS) times the transpose of
// `tile` (64 x HS): a row's dot products with the tile's rows.
template <int HS, int SLD>
__device__ __forceinline__ void rows_times_tile_transposed(float* scores, const RowsA (&a)[HS / 16], const bf16* tile, int first, int end) {
  for (int n = first; n < end; ++n) {
    Accumulator s;
    wmma::fill_fragment(s, 0.0f);
    for (int d = 0; d < HS / 16; ++d) {
      ColumnsB kt;
      wmma::load_matrix_sync(kt, tile + 16 * n * TILE_LD<HS> + 16 * d, TILE_LD<HS>);
      wmma::mma_sync(s, a[d], kt, s);
    }
    wmma::store_matrix_sync(scores + 16 * n, s, SLD, wmma::mem_row_major);
  }
}

// acc[dn] (16 x HS in HS/16 fragments) += operand (16 x 64 bf16, pitch OPERAND_LD) times `tile`
// (64 x HS), over the operand's column blocks (the tile's row blocks) first..end-1.
template <int HS>
__device__ __forceinline__ void accumulate_operand_times_tile(Accumulator (&acc)[HS / 16], const bf16* operand, const bf16* tile, int first,
                                                              int end) {
  for (int n = first; n < end; ++n) {
    RowsA a;
    wmma::load_matrix_sync(a, operand + 16 * n, OPERAND_LD);
    for (int dn = 0; dn < HS / 16; ++dn) {
      RowsB t;
      wmma::load_matrix_sync(t, tile + 16 * n * TILE_LD<HS> + 16 * dn, TILE_LD<HS>);
      wmma::mma_sync(acc[dn], a, t, acc[dn]);
    }
  }
}

// The warp's 16 x HS accumulators into `scratch` (pitch SLD), then as bf16 into rows row0.. of `dst`
// (rows `stride` apart) that lie before T, lanes along a row.
template <int HS, int SLD>
__device__ __forceinline__ void store_rows(bf16* dst, int stride, int row0, int T, const Accumulator (&acc)[HS / 16], float* scratch) {
  const int lane = threadIdx.x % WARP_SIZE;
  for (int dn = 0; dn < HS / 16; ++dn) wmma::store_matrix_sync(scratch + 16 * dn, acc[dn], SLD, wmma::mem_row_major);
  __syncwarp();
  for (int idx = lane; idx < 16 * HS; idx += WARP_SIZE) {
    const int r = idx / HS, d = idx % HS;
    if (row0 + r < T) dst[(size_t)(row0 + r) * stride + d] = from_float<bf16>(scratch[r * SLD + d]);
  }
  __syncwarp();
}

// attention::forward's contract on mma.sync tiles (common.cuh's mma_16x8x16), per (b, h, 64 queries): a
// running softmax over tiles of 64 keys, as FlashAttention-2 does it, in registers. K and V tiles are
// double-buffered in shared memory: the copies of tile i+1 (copy_tile_async) run while the warps work on
// tile i. Warp w owns queries q0 = first_row + 16w.. and keeps, per lane (g = lane / 4, t = lane % 4),
// their Q operands, the scores of rows g and g+8 against keys 2t, 2t+1 of each 8-key column block, and
// the same rows' output columns. A row's max and sum are thus over the 4 lanes of a group (two shuffles),
// the probabilities become P.V's A operands without leaving registers, and nothing but K and V passes
// through shared memory. On the diagonal tile a warp skips the 16-key blocks past its last query.
template <int HS>
__device__ void forward(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) {
  constexpr int LD = TILE_LD<HS>, TILE_ELEMENTS = TC_ROWS * LD;
  constexpr int KEY_BLOCKS = TC_COLS / 8, DIM_BLOCKS = HS / 8, DIM_STEPS = HS / 16, KEY_STEPS = TC_COLS / 16;
  DYNAMIC_SHARED(bf16, attention_shared);
  // Buffer s holds K at tiles + 2s and V at tiles + 2s + 1 (in units of TILE_ELEMENTS).
  bf16* tiles = attention_shared;
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, g = lane / 4, t = lane % 4;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS);
  const uint64_t first_weight = (uint64_t)bh * T * T;
  const int first_row = (gridDim.x - 1 - blockIdx.x) * TC_ROWS, q0 = first_row + 16 * warp;
  const bf16* q = qkv + (size_t)b * T * C3 + h * HS;
  const bf16* k = q + C;
  const bf16* v = q + 2 * C;

  // Q passes through the first K tile into the warp's operands, kept for every key tile.
  uint32_t q_frag[DIM_STEPS][4];
  load_tile<HS>(tiles, q, C3, first_row, T);
  __syncthreads();
  const bf16* q_rows = tiles + 16 * warp * LD;
#pragma unroll
  for (int ds = 0; ds < DIM_STEPS; ++ds) {
    const bf16* at = q_rows + g * LD + 16 * ds + 2 * t;
    q_frag[ds][0] = load_bf16_pair(at);
    q_frag[ds][1] = load_bf16_pair(at + 8 * LD);
    q_frag[ds][2] = load_bf16_pair(at + 8);
    q_frag[ds][3] = load_bf16_pair(at + 8 * LD + 8);
  }
  __syncthreads();  // every warp holds its Q before the first K tile is copied over it
  copy_tile_async<HS>(tiles, k, C3, 0, T);
  copy_tile_async<HS>(tiles + TILE_ELEMENTS, v, C3, 0, T);
  __pipeline_commit();

  // Index 0 is row q0 + g, index 1 row q0 + g + 8; l is this lane's share of the row's sum, summed over
  // the group at the end (the rescales are the group's alike).
  const int rows[2] = {q0 + g, q0 + g + 8};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[DIM_BLOCKS][4] = {};
  const bool active = q0 < T;  // warp-uniform
  const int last_row = min(first_row + TC_ROWS, T) - 1;
  for (int k0 = 0, s = 0; k0 <= last_row; k0 += TC_COLS, s ^= 1) {
    // Buffer s^1 was last read in the previous iteration, which every warp has left (the barrier at its end).
    if (k0 + TC_COLS <= last_row) {
      copy_tile_async<HS>(tiles + 2 * (s ^ 1) * TILE_ELEMENTS, k, C3, k0 + TC_COLS, T);
      copy_tile_async<HS>(tiles + (2 * (s ^ 1) + 1) * TILE_ELEMENTS, v, C3, k0 + TC_COLS, T);
    }
    __pipeline_commit();       // empty after the last tile, so that the wait below always means tile s
    __pipeline_wait_prior(1);  // this thread's copies of tile s are done...
    __syncthreads();           // ...and every thread's
    const bf16* k_tile = tiles + 2 * s * TILE_ELEMENTS;
    const bf16* v_tile = k_tile + TILE_ELEMENTS;
    if (active) {
      // 16-key blocks with a key some row of the warp sees: k0 <= q0, so at least one. The loops below run
      // over every block, skipping the rest, so that the register arrays are indexed by constants.
      const int key_steps = min(KEY_STEPS, (q0 - k0) / 16 + 1);
      float p[KEY_BLOCKS][4];
#pragma unroll
      for (int kb = 0; kb < KEY_BLOCKS; ++kb) {
        p[kb][0] = p[kb][1] = p[kb][2] = p[kb][3] = 0.0f;
        if (kb / 2 >= key_steps) continue;
        const bf16* key = k_tile + (8 * kb + g) * LD + 2 * t;
#pragma unroll
        for (int ds = 0; ds < DIM_STEPS; ++ds) {
          const uint32_t kt[2] = {load_bf16_pair(key + 16 * ds), load_bf16_pair(key + 16 * ds + 8)};
          mma_16x8x16(p[kb], q_frag[ds], kt);
        }
      }
      // Scaled and masked scores, then the rows' new maxima over the group's lanes (j <= i: key k0 is
      // visible to every row, so the maxima are finite from the first tile on).
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int kb = 0; kb < KEY_BLOCKS; ++kb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = k0 + 8 * kb + 2 * t + e % 2;
          p[kb][e] = kb / 2 < key_steps && j <= rows[e / 2] ? p[kb][e] * scale : -INFINITY;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], p[kb][e]);
        }
      float rescale[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(m[r], tile_max[r]);
        rescale[r] = __expf(m[r] - m_new);
        m[r] = m_new;
        l[r] *= rescale[r];
      }
#pragma unroll
      for (int db = 0; db < DIM_BLOCKS; ++db)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[db][e] *= rescale[e / 2];
      // Probabilities: the sum takes them as they are, P.V with the dropout factor.
#pragma unroll
      for (int kb = 0; kb < KEY_BLOCKS; ++kb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float prob = __expf(p[kb][e] - m[e / 2]);
          l[e / 2] += prob;
          const int j = k0 + 8 * kb + 2 * t + e % 2;
          p[kb][e] = prob * attention::dropout_at(first_weight, T, rows[e / 2], j, stream, threshold, keep);
        }
      // O += P.V, 16 keys at a time: two adjacent 8-key blocks of P are one A operand. V's column-major
      // operand takes its two keys from two rows of the tile.
#pragma unroll
      for (int ks = 0; ks < KEY_STEPS; ++ks) {
        if (ks >= key_steps) continue;
        const uint32_t pa[4] = {pack_bf16(p[2 * ks][0], p[2 * ks][1]), pack_bf16(p[2 * ks][2], p[2 * ks][3]),
                                pack_bf16(p[2 * ks + 1][0], p[2 * ks + 1][1]), pack_bf16(p[2 * ks + 1][2], p[2 * ks + 1][3])};
        const bf16* value = v_tile + (16 * ks + 2 * t) * LD + g;
#pragma unroll
        for (int db = 0; db < DIM_BLOCKS; ++db) {
          const bf16* at = value + 8 * db;
          const uint32_t vt[2] = {pack_bf16(at[0], at[LD]), pack_bf16(at[8 * LD], at[9 * LD])};
          mma_16x8x16(o[db], pa, vt);
        }
      }
    }
    __syncthreads();  // every warp is done with buffer s before the next iteration copies into it
  }
  if (!active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (t == 0 && rows[r] < T) lse[(size_t)bh * T + rows[r]] = m[r] + logf(l[r]);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    const float inverse = 1.0f / l[r];
    bf16* row_out = out + ((size_t)b * T + rows[r]) * C + h * HS + 2 * t;
#pragma unroll
    for (int db = 0; db < DIM_BLOCKS; ++db) {
      row_out[8 * db] = from_float<bf16>(o[db][2 * r] * inverse);
      row_out[8 * db + 1] = from_float<bf16>(o[db][2 * r + 1] * inverse);
    }
  }
}


// Shared memory of both backward kernels: two 64 x HS bf16 tiles, per warp two 16 x 64 bf16 operand
// tiles and a 16 x BACKWARD_LD float scratch, then 2 x 64 floats of per-row values.
struct BackwardShared {
  bf16 *tile_a, *tile_b, *operand_a, *operand_b;
  float *scratch, *row_values;
};
template <int HS>
__device__ __forceinline__ BackwardShared backward_shared() {
  DYNAMIC_SHARED(bf16, attention_shared);
  const int warp = threadIdx.x / WARP_SIZE;
  bf16* operands = attention_shared + 2 * TC_ROWS * TILE_LD<HS>;
  float* scratch = reinterpret_cast<float*>(operands + TC_WARPS * 2 * 16 * OPERAND_LD);
  return {attention_shared,
          attention_shared + TC_ROWS * TILE_LD<HS>,
          operands + warp * 2 * 16 * OPERAND_LD,
          operands + warp * 2 * 16 * OPERAND_LD + 16 * OPERAND_LD,
          scratch + warp * 16 * BACKWARD_LD<HS>,
          scratch + TC_WARPS * 16 * BACKWARD_LD<HS>};
}

// attention::backward_query's contract on tensor cores, per (b, h, 64 queries): D_i, then over the key
// tiles S = Q.K^T and dW = dO.V^T side by side in the warp's scratch, dS on them by lane pairs, and
// dQ += dS.K in accumulator fragments that stay in registers across tiles (nothing rescales them).
template <int HS>
__device__ void backward_query(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C,
                               int NH, uint64_t stream, uint32_t threshold, float keep) {
  constexpr int SLD = BACKWARD_LD<HS>;
  const BackwardShared sh = backward_shared<HS>();
  bf16 *k_tile = sh.tile_a, *v_tile = sh.tile_b, *ds_tile = sh.operand_a;
  float* scratch = sh.scratch;
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS);
  const uint64_t first_weight = (uint64_t)bh * T * T;
  const int first_row = (gridDim.x - 1 - blockIdx.x) * TC_ROWS, q0 = first_row + 16 * warp;
  const bf16* q = qkv + (size_t)b * T * C3 + h * HS;
  const bf16* k = q + C;
  const bf16* v = q + 2 * C;
  const bf16* dout_bh = dout + (size_t)b * T * C + h * HS;

  // Q and dO pass through the K and V tiles into the warp's fragments.
  RowsA q_frag[HS / 16], do_frag[HS / 16];
  load_tile<HS>(k_tile, q, C3, first_row, T);
  load_tile<HS>(v_tile, dout_bh, C, first_row, T);
  __syncthreads();
  load_row_fragments<HS>(q_frag, k_tile + 16 * warp * TILE_LD<HS>);
  load_row_fragments<HS>(do_frag, v_tile + 16 * warp * TILE_LD<HS>);
  const int r = lane / 2, half = lane % 2, i = q0 + r;
  float row_lse = 0.0f, row_delta = 0.0f;
  if (i < T) {
    const bf16* do_row = v_tile + (16 * warp + r) * TILE_LD<HS>;
    const bf16* out_row = out + ((size_t)b * T + i) * C + h * HS;
    for (int d = half; d < HS; d += 2) row_delta += to_float(do_row[d]) * to_float(out_row[d]);
    row_lse = lse[(size_t)bh * T + i];
  }
  row_delta += __shfl_xor_sync(0xffffffffu, row_delta, 1);
  if (half == 0 && i < T) delta[(size_t)bh * T + i] = row_delta;

  Accumulator dq[HS / 16];
  for (int dn = 0; dn < HS / 16; ++dn) wmma::fill_fragment(dq[dn], 0.0f);
  const bool active = q0 < T;  // warp-uniform
  const int last_row = min(first_row + TC_ROWS, T) - 1;
  for (int k0 = 0; k0 <= last_row; k0 += TC_COLS) {
    __syncthreads();
    load_tile<HS>(k_tile, k, C3, k0, T);
    load_tile<HS>(v_tile, v, C3, k0, T);
    __syncthreads();
    if (!active) continue;
    const int blocks = min(TC_COLS / 16, (q0 - k0) / 16 + 1), keys = 16 * blocks;
    rows_times_tile_transposed<HS, SLD>(scratch, q_frag, k_tile, 0, blocks);
    rows_times_tile_transposed<HS, SLD>(scratch + TC_COLS, do_frag, v_tile, 0, blocks);
    __syncwarp();
    for (int c = half; c < keys; c += 2) {
      const int j = k0 + c;
      float ds = 0.0f;
      if (j <= i) {
        const float p = __expf(scratch[r * SLD + c] * scale - row_lse);
        const float dw = scratch[r * SLD + TC_COLS + c];
        ds = p * (dw * attention::dropout_at(first_weight, T, i, j, stream, threshold, keep) - row_delta) * scale;
      }
      ds_tile[r * OPERAND_LD + c] = from_float<bf16>(ds);
    }
    __syncwarp();
    accumulate_operand_times_tile<HS>(dq, ds_tile, k_tile, 0, blocks);
  }
  if (active) store_rows<HS, SLD>(dqkv + (size_t)b * T * C3 + h * HS, C3, q0, T, dq, scratch);
}

// attention::backward_key's contract on tensor cores, per (b, h, 64 keys): over the query tiles from the
// block's first key on, S^T = K.Q^T and dW^T = V.dO^T side by side in the warp's scratch, W^T and dS^T on
// them by lane pairs (row r is key j, column c query i), and dV += W^T.dO, dK += dS^T.Q in registers.
// On the first tile warp w skips the 16-query blocks before its first key.
template <int HS>
__device__ void backward_key(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH,
                             uint64_t stream, uint32_t threshold, float keep) {
  constexpr int SLD = BACKWARD_LD<HS>;
  const BackwardShared sh = backward_shared<HS>();
  bf16 *q_tile = sh.tile_a, *do_tile = sh.tile_b, *w_tile = sh.operand_a, *ds_tile = sh.operand_b;
  float *scratch = sh.scratch, *lse_tile = sh.row_values, *delta_tile = sh.row_values + TC_COLS;
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int bh = blockIdx.y, b = bh / NH, h = bh % NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf((float)HS);
  const uint64_t first_weight = (uint64_t)bh * T * T;
  const int first_key = blockIdx.x * TC_ROWS, j0 = first_key + 16 * warp;
  const bf16* q = qkv + (size_t)b * T * C3 + h * HS;
  const bf16* k = q + C;
  const bf16* v = q + 2 * C;
  const bf16* dout_bh = dout + (size_t)b * T * C + h * HS;

  RowsA k_frag[HS / 16], v_frag[HS / 16];
  load_tile<HS>(q_tile, k, C3, first_key, T);
  load_tile<HS>(do_tile, v, C3, first_key, T);
  __syncthreads();
  load_row_fragments<HS>(k_frag, q_tile + 16 * warp * TILE_LD<HS>);
  load_row_fragments<HS>(v_frag, do_tile + 16 * warp * TILE_LD<HS>);

  Accumulator dk[HS / 16], dv[HS / 16];
  for (int dn = 0; dn < HS / 16; ++dn) wmma::fill_fragment(dk[dn], 0.0f), wmma::fill_fragment(dv[dn], 0.0f);
  const int r = lane / 2, half = lane % 2, j = j0 + r;
  const bool active = j0 < T;  // warp-uniform
  for (int i0 = first_key; i0 < T; i0 += TC_COLS) {
    __syncthreads();
    load_tile<HS>(q_tile, q, C3, i0, T);
    load_tile<HS>(do_tile, dout_bh, C, i0, T);
    if (threadIdx.x < TC_COLS) {
      const int i = i0 + threadIdx.x;
      lse_tile[threadIdx.x] = i < T ? lse[(size_t)bh * T + i] : 0.0f;
      delta_tile[threadIdx.x] = i < T ? delta[(size_t)bh * T + i] : 0.0f;
    }
    __syncthreads();
    if (!active) continue;
    // Query blocks with a query at or after some key of the warp, and before T.
    const int first = max(0, (j0 - i0) / 16), end = min(TC_COLS / 16, (T - i0 + 15) / 16);
    rows_times_tile_transposed<HS, SLD>(scratch, k_frag, q_tile, first, end);
    rows_times_tile_transposed<HS, SLD>(scratch + TC_COLS, v_frag, do_tile, first, end);
    __syncwarp();
    for (int c = 16 * first + half; c < 16 * end; c += 2) {
      const int i = i0 + c;
      float w = 0.0f, ds = 0.0f;
      if (j <= i && i < T) {
        const float p = __expf(scratch[r * SLD + c] * scale - lse_tile[c]);
        const float drop = attention::dropout_at(first_weight, T, i, j, stream, threshold, keep);
        w = p * drop;
        ds = p * (scratch[r * SLD + TC_COLS + c] * drop - delta_tile[c]) * scale;
      }
      w_tile[r * OPERAND_LD + c] = from_float<bf16>(w);
      ds_tile[r * OPERAND_LD + c] = from_float<bf16>(ds);
    }
    __syncwarp();
    accumulate_operand_times_tile<HS>(dv, w_tile, do_tile, first, end);
    accumulate_operand_times_tile<HS>(dk, ds_tile, q_tile, first, end);
  }
  if (!active) return;
  bf16* dk_rows = dqkv + (size_t)b * T * C3 + C + h * HS;
  store_rows<HS, SLD>(dk_rows, C3, j0, T, dk, scratch);
  store_rows<HS, SLD>(dk_rows + C, C3, j0, T, dv, scratch);
}

}  // namespace attention_tc

// Entry points, one per head size and precision (the tile shapes are compile-time): grid
// (ceil(T / rows per block), B*NH), block WARPS * 32 threads. The CUDA-core kernels (f32 at every head
// size, bf16 at 16 and 32) take no dynamic shared memory; the tensor-core ones (`_tc_`, bf16 at 64 and
// 128) take attention.rs's tc_shared_bytes.
extern "C" __global__ void attention_forward_hs16_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 16>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs32_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 32>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs64_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 64>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs128_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 128>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs16_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 16>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs32_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 32>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_tc_hs64_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::forward<64>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_tc_hs128_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::forward<128>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
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
extern "C" __global__ void attention_backward_query_tc_hs64_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_query<64>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_tc_hs128_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_query<128>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_tc_hs64_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_key<64>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_tc_hs128_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention_tc::backward_key<128>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
