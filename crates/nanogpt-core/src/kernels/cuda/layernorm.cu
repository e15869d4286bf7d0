// LayerNorm over rows of C channels (kernels/layernorm.rs): eps inside the square root, and each row's
// mean and 1/std kept (float) for the backward pass. Row reductions take one warp per row.
namespace layernorm {
constexpr float EPS = 1e-5f;
// Rows per block of the backward kernel: its warps share them out for dinp, then each thread sums its
// columns of dweight and dbias over them into the block's partial sums (see backward).
constexpr int BACKWARD_ROWS = 32;

// Normalises one row, held as floats in this warp's `x` (each lane reads back only the channels it wrote,
// so no barrier is needed), to out's row `row`, and keeps its statistics. Two passes over x, as the CPU
// kernel: the variance is the mean of squared deviations, not E[x²] - mean², which cancels badly.
template <typename X>
__device__ void normalize_row(X* out, float* mean, float* rstd, const float* x, const X* weight, const X* bias, int C,
                              long long row) {
  const int lane = threadIdx.x % WARP_SIZE;
  float sum = 0.0f;
  for (int c = lane; c < C; c += WARP_SIZE) sum += x[c];
  const float mu = warp_sum(sum) / C;
  float squares = 0.0f;
  for (int c = lane; c < C; c += WARP_SIZE) squares += (x[c] - mu) * (x[c] - mu);
  const float rs = rsqrtf(warp_sum(squares) / C + EPS);
  X* y = out + row * C;
  for (int c = lane; c < C; c += WARP_SIZE) {
    const float normed = (x[c] - mu) * rs * to_float(weight[c]);
    y[c] = from_float<X>(bias ? normed + to_float(bias[c]) : normed);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// One warp per row; each warp keeps its row as floats in dynamic shared memory (C floats per warp), so
// the input is read from global memory once. bias may be null.
template <typename X>
__device__ void forward(X* out, float* mean, float* rstd, const X* inp, const X* weight, const X* bias, int N, int C) {
  DYNAMIC_SHARED(float, layernorm_rows);
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const long long row = (long long)blockIdx.x * (blockDim.x / WARP_SIZE) + warp;
  if (row >= N) return;  // whole warps leave together: the shuffles see only full warps
  float* x = layernorm_rows + warp * C;
  for (int c = lane; c < C; c += WARP_SIZE) x[c] = to_float(inp[row * C + c]);
  normalize_row(out, mean, rstd, x, weight, bias, C, row);
}

// residual_out = inp + dropout(branch), then ln_out = LayerNorm(residual_out), in one pass over the inputs.
// The LayerNorm reads residual_out as stored (rounded to X), so that it agrees with the backward pass,
// which reads residual_out. residual_out may be inp.
template <typename X>
__device__ void residual_forward(X* residual_out, X* ln_out, float* mean, float* rstd, const X* inp, const X* branch,
                                 const X* weight, const X* bias, int N, int C, uint64_t stream, uint32_t threshold,
                                 float keep_scale) {
  DYNAMIC_SHARED(float, layernorm_rows);
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const long long row = (long long)blockIdx.x * (blockDim.x / WARP_SIZE) + warp;
  if (row >= N) return;
  float* x = layernorm_rows + warp * C;
  for (int c = lane; c < C; c += WARP_SIZE) {
    const long long i = row * C + c;
    const float dropped = to_float(branch[i]) * dropout_scale(stream, threshold, keep_scale, (uint64_t)i);
    const X sum = from_float<X>(to_float(inp[i]) + dropped);
    residual_out[i] = sum;
    x[c] = to_float(sum);
  }
  normalize_row(ln_out, mean, rstd, x, weight, bias, C, row);
}

// Block b owns rows [b*BACKWARD_ROWS, (b+1)*BACKWARD_ROWS). First its warps take those rows in turn and
// write (or add to) dinp, a warp per row for the two row means. Then thread k sums channels k,
// k + blockDim.x, ... over the same rows, in row order, into the block's partial sums of dweight
// (partials[b*C + c]) and dbias (partials[(blocks + b)*C + c]); bias_backward then adds their column sums
// to dweight and dbias. Fixed orders throughout, so the result is deterministic without atomics. The
// second pass re-reads rows this block has just read, mostly from cache.
template <typename X>
__device__ void backward(X* dinp, float* partials, const X* dout, const X* inp, const X* weight, const float* mean,
                         const float* rstd, int N, int C, int add_to_dinp) {
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, warps = blockDim.x / WARP_SIZE;
  const int first = blockIdx.x * BACKWARD_ROWS, end = min(first + BACKWARD_ROWS, N);
  for (int row = first + warp; row < end; row += warps) {
    const X* dy = dout + (long long)row * C;
    const X* x = inp + (long long)row * C;
    const float mu = mean[row], rs = rstd[row];
    float dnorm_sum = 0.0f, dnorm_centred_sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
      const float dnorm = to_float(weight[c]) * to_float(dy[c]);
      dnorm_sum += dnorm;
      dnorm_centred_sum += dnorm * (to_float(x[c]) - mu);
    }
    const float dnorm_mean = warp_sum(dnorm_sum) / C, dnorm_norm_mean = warp_sum(dnorm_centred_sum) * rs / C;
    X* dx = dinp + (long long)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
      const float dnorm = to_float(weight[c]) * to_float(dy[c]);
      const float grad = (dnorm - (to_float(x[c]) - mu) * rs * dnorm_norm_mean - dnorm_mean) * rs;
      dx[c] = from_float<X>(add_to_dinp ? to_float(dx[c]) + grad : grad);
    }
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float dweight = 0.0f, dbias = 0.0f;
    for (int row = first; row < end; ++row) {
      const long long i = (long long)row * C + c;
      const float dy = to_float(dout[i]);
      dweight += (to_float(inp[i]) - mean[row]) * rstd[row] * dy;
      dbias += dy;
    }
    partials[(long long)blockIdx.x * C + c] = dweight;
    partials[(long long)(gridDim.x + blockIdx.x) * C + c] = dbias;
  }
}
}  // namespace layernorm

extern "C" __global__ void layernorm_forward_f32(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias, int N, int C) { layernorm::forward(out, mean, rstd, inp, weight, bias, N, C); }
extern "C" __global__ void layernorm_forward_bf16(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight, const bf16* bias, int N, int C) { layernorm::forward(out, mean, rstd, inp, weight, bias, N, C); }
extern "C" __global__ void residual_layernorm_forward_f32(float* residual_out, float* ln_out, float* mean, float* rstd, const float* inp, const float* branch, const float* weight, const float* bias, int N, int C, uint64_t stream, uint32_t threshold, float keep_scale) { layernorm::residual_forward(residual_out, ln_out, mean, rstd, inp, branch, weight, bias, N, C, stream, threshold, keep_scale); }
extern "C" __global__ void residual_layernorm_forward_bf16(bf16* residual_out, bf16* ln_out, float* mean, float* rstd, const bf16* inp, const bf16* branch, const bf16* weight, const bf16* bias, int N, int C, uint64_t stream, uint32_t threshold, float keep_scale) { layernorm::residual_forward(residual_out, ln_out, mean, rstd, inp, branch, weight, bias, N, C, stream, threshold, keep_scale); }
extern "C" __global__ void layernorm_backward_f32(float* dinp, float* partials, const float* dout, const float* inp, const float* weight, const float* mean, const float* rstd, int N, int C, int add_to_dinp) { layernorm::backward(dinp, partials, dout, inp, weight, mean, rstd, N, C, add_to_dinp); }
extern "C" __global__ void layernorm_backward_bf16(bf16* dinp, float* partials, const bf16* dout, const bf16* inp, const bf16* weight, const float* mean, const float* rstd, int N, int C, int add_to_dinp) { layernorm::backward(dinp, partials, dout, inp, weight, mean, rstd, N, C, add_to_dinp); }
