// A linear layer's bias (kernels/matmul.rs adds it to the product and sums dout's columns for its
// gradient), and dropout applied on its own, which the backward pass uses for the residual dropouts.
namespace bias {
// column_sums' row lanes (threadIdx.y), each summing every 32nd row: with 32 columns a block (a warp
// across them reads a coalesced 128-byte f32 row segment) that is 1024 threads, many loads in flight
// per SM for a kernel that reads N x OC once.
constexpr int ROW_LANES = 32;

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
    alignas(16) X values[P], biases[P];
    *reinterpret_cast<uint4*>(values) = *reinterpret_cast<const uint4*>(out + first);
    *reinterpret_cast<uint4*>(biases) = *reinterpret_cast<const uint4*>(row_bias + col);
    for (int e = 0; e < P; ++e) values[e] = from_float<X>(to_float(values[e]) + to_float(biases[e]));
    *reinterpret_cast<uint4*>(out + first) = *reinterpret_cast<const uint4*>(values);
  } else {
    for (long long i = first; i < total && i < first + P; ++i) {
      out[i] = from_float<X>(to_float(out[i]) + to_float(row_bias[col]));
      col = col + 1 == oc ? 0 : col + 1;
    }
  }
}

// dbias[c] += sum over rows of dout[row, c]. Each block owns 32 columns and all N rows, so the sum has one
// fixed order (each row lane's rows in turn, then the lanes in turn): deterministic, with no atomics and
// no scratch memory.
template <typename X>
__device__ void column_sums(float* dbias, const X* dout, int n, int oc) {
  __shared__ float lane_sums[ROW_LANES][WARP_SIZE];
  const int col = blockIdx.x * WARP_SIZE + threadIdx.x;
  float sum = 0.0f;
  if (col < oc)
    for (int row = threadIdx.y; row < n; row += ROW_LANES) sum += to_float(dout[(long long)row * oc + col]);
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < oc) {
    float total = 0.0f;
    for (int lane = 0; lane < ROW_LANES; ++lane) total += lane_sums[lane][threadIdx.x];
    dbias[col] += total;
  }
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
extern "C" __global__ void bias_backward_f32(float* dbias, const float* dout, int n, int oc) { bias::column_sums(dbias, dout, n, oc); }
extern "C" __global__ void bias_backward_bf16(float* dbias, const bf16* dout, int n, int oc) { bias::column_sums(dbias, dout, n, oc); }
extern "C" __global__ void dropout_apply_f32(float* out, const float* inp, long long n, uint64_t stream, uint32_t threshold, float keep_scale) { bias::dropout_apply(out, inp, n, stream, threshold, keep_scale); }
extern "C" __global__ void dropout_apply_bf16(bf16* out, const bf16* inp, long long n, uint64_t stream, uint32_t threshold, float keep_scale) { bias::dropout_apply(out, inp, n, stream, threshold, keep_scale); }
