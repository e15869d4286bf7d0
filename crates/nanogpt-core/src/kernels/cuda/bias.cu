// A linear layer's bias (kernels/matmul.rs): added to the product's rows where cuBLASLt's epilogue does not add
// it (cuda.rs), and its gradient, dout's column sums; and dropout applied on its own, which the backward pass
// uses for the residual dropouts.
namespace bias {
// The gradient's two stages: blocks of ROW_LANES x 32 threads each sum CHUNK_ROWS rows of 32 packs of columns
// (each lane a 16-byte pack of a row at a time, the row lanes ROW_LANES rows apart) into one row of partial
// sums; then one thread per column adds that column's partial sums, chunk by chunk, to dbias. Cutting the rows
// into chunks gives a grid of many blocks even where OC gives few (OC = 768 in bf16 is 3 blocks across), and
// both orders of addition are fixed: the gradient is deterministic, with no atomics.
constexpr int ROW_LANES = 8;
constexpr int CHUNK_ROWS = 64;

// out (n x oc) rows += row_bias, one 16-byte pack of elements per thread, as GELU does. When oc is a
// multiple of the pack and both buffers are 16-byte aligned, no pack straddles two rows and its bias is
// one aligned pack too: two loads and a store per pack, and one division for its column. Otherwise the
// thread adds its elements one at a time.
template <typename X>
__device__ void add(X* out, const X* row_bias, long long n, int oc) {
  constexpr int P = PACK<X>;
  const long long total = n * oc, first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * P;
  if (first >= total) return;
  int col = (int)(first % oc);
  if (oc % P == 0 && aligned16(out) && aligned16(row_bias)) {
    X values[P], biases[P];
    load_pack(values, out + first);
    load_pack(biases, row_bias + col);
    for (int e = 0; e < P; ++e) values[e] = from_float<X>(to_float(values[e]) + to_float(biases[e]));
    store_pack(out + first, values);
  } else {
    for (long long i = first; i < total && i < first + P; ++i) {
      out[i] = from_float<X>(to_float(out[i]) + to_float(row_bias[col]));
      col = col + 1 == oc ? 0 : col + 1;
    }
  }
}

// partials[chunk, col] = the sum of dout's rows in chunk blockIdx.y, for the block's 32 x P columns. When oc is a
// multiple of the pack and dout is 16-byte aligned, every row's packs are aligned too: one load per pack.
template <typename X>
__device__ void chunk_column_sums(float* partials, const X* dout, int n, int oc) {
  constexpr int P = PACK<X>;
  __shared__ float lane_sums[ROW_LANES][WARP_SIZE * P];
  const int block_first = blockIdx.x * WARP_SIZE * P, first = block_first + threadIdx.x * P;
  const int row_end = min(n, ((int)blockIdx.y + 1) * CHUNK_ROWS);
  const bool packed = oc % P == 0 && aligned16(dout);
  float sums[P];
  for (int e = 0; e < P; ++e) sums[e] = 0.0f;
  for (int row = blockIdx.y * CHUNK_ROWS + threadIdx.y; row < row_end; row += ROW_LANES) {
    const X* values = dout + (long long)row * oc;
    if (packed && first < oc) {
      X pack[P];
      load_pack(pack, values + first);
      for (int e = 0; e < P; ++e) sums[e] += to_float(pack[e]);
    } else {
      for (int e = 0; e < P && first + e < oc; ++e) sums[e] += to_float(values[first + e]);
    }
  }
  for (int e = 0; e < P; ++e) lane_sums[threadIdx.y][threadIdx.x * P + e] = sums[e];
  __syncthreads();
  for (int c = threadIdx.y * WARP_SIZE + threadIdx.x; c < WARP_SIZE * P; c += ROW_LANES * WARP_SIZE) {
    if (block_first + c >= oc) continue;
    float total = 0.0f;
    for (int lane = 0; lane < ROW_LANES; ++lane) total += lane_sums[lane][c];
    partials[(long long)blockIdx.y * oc + block_first + c] = total;
  }
}

// dbias[col] += the sum of partials[0..chunks, col], in chunk order.
__device__ void add_chunk_sums(float* dbias, const float* partials, int chunks, int oc) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= oc) return;
  float total = 0.0f;
  for (int chunk = 0; chunk < chunks; ++chunk) total += partials[(long long)chunk * oc + col];
  dbias[col] += total;
}

// out may be inp (in place): each thread reads its element before writing it.
template <typename X>
__device__ void dropout_apply(X* out, const X* inp, long long n, uint64_t stream, uint32_t threshold, float keep_scale) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_float<X>(to_float(inp[i]) * dropout_scale(stream, threshold, keep_scale, (uint64_t)i));
}
}  // namespace bias

extern "C" __global__ void add_bias_f32(float* out, const float* row_bias, long long n, int oc) { bias::add(out, row_bias, n, oc); }
extern "C" __global__ void add_bias_bf16(bf16* out, const bf16* row_bias, long long n, int oc) { bias::add(out, row_bias, n, oc); }
extern "C" __global__ void bias_chunk_sums_f32(float* partials, const float* dout, int n, int oc) { bias::chunk_column_sums(partials, dout, n, oc); }
extern "C" __global__ void bias_chunk_sums_bf16(float* partials, const bf16* dout, int n, int oc) { bias::chunk_column_sums(partials, dout, n, oc); }
extern "C" __global__ void bias_add_chunk_sums(float* dbias, const float* partials, int chunks, int oc) { bias::add_chunk_sums(dbias, partials, chunks, oc); }
extern "C" __global__ void dropout_apply_f32(float* out, const float* inp, long long n, uint64_t stream, uint32_t threshold, float keep_scale) { bias::dropout_apply(out, inp, n, stream, threshold, keep_scale); }
extern "C" __global__ void dropout_apply_bf16(bf16* out, const bf16* inp, long long n, uint64_t stream, uint32_t threshold, float keep_scale) { bias::dropout_apply(out, inp, n, stream, threshold, keep_scale); }
