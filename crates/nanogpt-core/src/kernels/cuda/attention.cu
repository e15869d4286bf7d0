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
// per ROWS FMAs: these kernels are bound by shared-memory bandwidth, and a register-tiled (or tensor-core)
// version is their next step.
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

// Entry points, one per head size and precision (the tile shapes are compile-time): grid
// (ceil(T / rows per block), B*NH), block attention::WARPS * 32 threads, no dynamic shared memory.
extern "C" __global__ void attention_forward_hs16_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 16>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs32_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 32>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs64_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 64>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs128_f32(float* out, float* lse, const float* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<float, 128>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs16_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 16>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs32_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 32>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs64_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 64>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_forward_hs128_bf16(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::forward<bf16, 128>(out, lse, qkv, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs16_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 16>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs32_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 32>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs64_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 64>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs128_f32(float* dqkv, float* delta, const float* dout, const float* qkv, const float* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<float, 128>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs16_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<bf16, 16>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs32_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<bf16, 32>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs64_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<bf16, 64>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_query_hs128_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_query<bf16, 128>(dqkv, delta, dout, qkv, out, lse, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs16_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 16>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs32_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 32>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs64_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 64>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs128_f32(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<float, 128>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs16_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<bf16, 16>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs32_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<bf16, 32>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs64_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<bf16, 64>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
extern "C" __global__ void attention_backward_key_hs128_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, int T, int C, int NH, uint64_t stream, uint32_t threshold, float keep) { attention::backward_key<bf16, 128>(dqkv, dout, qkv, lse, delta, T, C, NH, stream, threshold, keep); }
