// LayerNorm over rows of C channels (kernels/layernorm.rs): eps inside the square root, and each row's
// mean and 1/std kept (float) for the backward pass. Row reductions take one warp per row.
namespace layernorm {
constexpr float EPS = 1e-5f;
// Rows per block of the backward kernel, which its warps share out (see backward_rows).
constexpr int BACKWARD_ROWS = 32;

// A warp's row of C floats in shared memory (the forward kernels' cached row, the backward kernel's sums of
// dweight and dbias), as the P-element groups of channels its lanes own: lane l owns groups l, l + 32, ...
// (16-byte packs where C and the buffers allow, else single elements), every row, so each lane reads back
// only what it wrote and no barrier is needed. A group's floats are stored in 16-byte quads, quad q of every
// group together: the 32 lanes' accesses to one quad are then 512 consecutive bytes, free of bank conflicts,
// where a group's 8 floats side by side put the lanes 32 bytes apart (2-way conflicts for 16-byte accesses,
// 8-way for 4-byte ones).
template <int P>
__device__ __forceinline__ int float_index(int groups, int g, int e) {
  if constexpr (P % 4 == 0) {
    return ((e / 4) * groups + g) * 4 + e % 4;
  } else {
    return g * P + e;
  }
}
// The same for channel c.
template <int P>
__device__ __forceinline__ int channel_index(int groups, int c) {
  return float_index<P>(groups, c / P, c % P);
}
template <int P>
__device__ __forceinline__ void cache(float* row, int groups, int g, const float (&v)[P]) {
  if constexpr (P % 4 == 0) {
    for (int q = 0; q < P / 4; ++q)
      *reinterpret_cast<float4*>(row + float_index<P>(groups, g, 4 * q)) = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  } else {
    for (int e = 0; e < P; ++e) row[float_index<P>(groups, g, e)] = v[e];
  }
}
template <int P>
__device__ __forceinline__ void uncache(float (&v)[P], const float* row, int groups, int g) {
  if constexpr (P % 4 == 0) {
    for (int q = 0; q < P / 4; ++q) {
      const float4 f = *reinterpret_cast<const float4*>(row + float_index<P>(groups, g, 4 * q));
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else {
    for (int e = 0; e < P; ++e) v[e] = row[float_index<P>(groups, g, e)];
  }
}

// Normalises the warp's cached row `x` to out's row `row`, and keeps its statistics. Two passes over x, as
// the CPU kernel: the variance is the mean of squared deviations, not E[x²] - mean², which cancels badly.
template <typename X, int P>
__device__ void normalize_row(X* out, float* mean, float* rstd, const float* x, const X* weight, const X* bias, int C,
                              long long row) {
  const int lane = threadIdx.x % WARP_SIZE, groups = C / P;
  float sum = 0.0f;
  for (int g = lane; g < groups; g += WARP_SIZE) {
    float v[P];
    uncache(v, x, groups, g);
    for (int e = 0; e < P; ++e) sum += v[e];
  }
  const float mu = warp_sum(sum) / C;
  float squares = 0.0f;
  for (int g = lane; g < groups; g += WARP_SIZE) {
    float v[P];
    uncache(v, x, groups, g);
    for (int e = 0; e < P; ++e) squares += (v[e] - mu) * (v[e] - mu);
  }
  const float rs = rsqrtf(warp_sum(squares) / C + EPS);
  X* y = out + row * C;
  for (int g = lane; g < groups; g += WARP_SIZE) {
    float v[P];
    uncache(v, x, groups, g);
    X w[P], b[P], normed[P];
    load_pack(w, weight + g * P);
    if (bias) load_pack(b, bias + g * P);
    for (int e = 0; e < P; ++e) {
      const float scaled = (v[e] - mu) * rs * to_float(w[e]);
      normed[e] = from_float<X>(bias ? scaled + to_float(b[e]) : scaled);
    }
    store_pack(y + g * P, normed);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Whether a forward kernel's rows go in 16-byte packs: C a whole number of them, and every buffer aligned
// (a null bias is).
template <typename X, typename... Buffers>
__device__ __forceinline__ bool packs_fit(int C, const Buffers*... buffers) {
  return C % PACK<X> == 0 && (aligned16(buffers) && ...);
}

template <typename X>
__device__ void forward(X* out, float* mean, float* rstd, const X* inp, const X* weight, const X* bias, int N, int C) {
  DYNAMIC_SHARED(float, layernorm_rows);
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const long long row = (long long)blockIdx.x * (blockDim.x / WARP_SIZE) + warp;
  if (row >= N) return;  // whole warps leave together: the shuffles see only full warps
  float* x = layernorm_rows + warp * C;
  auto rows = [&](auto pack) {
    constexpr int P = decltype(pack)::value;
    for (int g = lane; g < C / P; g += WARP_SIZE) {
      X v[P];
      load_pack(v, inp + row * C + g * P);
      float f[P];
      for (int e = 0; e < P; ++e) f[e] = to_float(v[e]);
      cache(x, C / P, g, f);
    }
    normalize_row<X, P>(out, mean, rstd, x, weight, bias, C, row);
  };
  if (packs_fit<X>(C, out, inp, weight, bias)) rows(std::integral_constant<int, PACK<X>>{});
  else rows(std::integral_constant<int, 1>{});
}

// residual_out = inp + dropout(branch), then ln_out = LayerNorm(residual_out), in one pass over the inputs.
// The LayerNorm reads residual_out as stored (rounded to X), so that it agrees with the backward pass,
// which reads residual_out. residual_out may be inp. Without dropout (threshold 0) the kernel is compiled
// without the dropout hash, which it would otherwise compute for every element.
template <typename X>
__device__ void residual_forward(X* residual_out, X* ln_out, float* mean, float* rstd, const X* inp, const X* branch,
                                 const X* weight, const X* bias, int N, int C, uint64_t stream, uint32_t threshold,
                                 float keep_scale) {
  DYNAMIC_SHARED(float, layernorm_rows);
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const long long row = (long long)blockIdx.x * (blockDim.x / WARP_SIZE) + warp;
  if (row >= N) return;
  float* x = layernorm_rows + warp * C;
  auto rows = [&](auto packed_case, auto dropout_case) {
    constexpr int P = decltype(packed_case)::value ? PACK<X> : 1;
    constexpr bool DROPOUT = decltype(dropout_case)::value;
    for (int g = lane; g < C / P; g += WARP_SIZE) {
      const long long first = row * C + g * P;
      X a[P], b[P], sum[P];
      load_pack(a, inp + first);
      load_pack(b, branch + first);
      float f[P];
      for (int e = 0; e < P; ++e) {
        const float dropped = DROPOUT ? to_float(b[e]) * dropout_scale(stream, threshold, keep_scale, (uint64_t)(first + e)) : to_float(b[e]);
        sum[e] = from_float<X>(to_float(a[e]) + dropped);
        f[e] = to_float(sum[e]);
      }
      store_pack(residual_out + first, sum);
      cache(x, C / P, g, f);
    }
    normalize_row<X, P>(ln_out, mean, rstd, x, weight, bias, C, row);
  };
  with_cases(packs_fit<X>(C, residual_out, ln_out, inp, branch, weight, bias), threshold != 0, rows);
}

// Block b owns rows [b*BACKWARD_ROWS, (b+1)*BACKWARD_ROWS); warp w takes rows b*BACKWARD_ROWS + w, + w + warps,
// ... Each lane owns the same P-element groups of channels in every row (as the forward kernels' lanes do), so
// that the pass that writes dinp also adds the row's terms of dweight and dbias to the warp's own C floats of
// each in shared memory (laid out as cache() does), with no barrier and no atomics: one read of dout
// and inp from memory (the second pass over a row finds it in cache), where a separate column pass would read
// them again. The block then adds its warps' sums, in warp order, into its partial sums (partials[b*C + c] and
// partials[(blocks + b)*C + c]), whose column sums bias_backward adds to dweight and dbias. Fixed orders
// throughout, so the result is deterministic.
template <typename X, int P>
__device__ void backward_rows(X* dinp, float* partials, const X* dout, const X* inp, const X* weight,
                              const float* mean, const float* rstd, int N, int C, int add_to_dinp) {
  DYNAMIC_SHARED(float, warp_sums);
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, warps = blockDim.x / WARP_SIZE;
  const int first = blockIdx.x * BACKWARD_ROWS, end = min(first + BACKWARD_ROWS, N), groups = C / P;
  float* dweight_sum = warp_sums + 2 * warp * C;
  float* dbias_sum = dweight_sum + C;
  for (int g = lane; g < groups; g += WARP_SIZE) {
    const float zeros[P] = {};
    cache(dweight_sum, groups, g, zeros);
    cache(dbias_sum, groups, g, zeros);
  }
  for (int row = first + warp; row < end; row += warps) {
    const X* dy_row = dout + (long long)row * C;
    const X* x_row = inp + (long long)row * C;
    X* dx_row = dinp + (long long)row * C;
    const float mu = mean[row], rs = rstd[row];
    float dnorm_sum = 0.0f, dnorm_centred_sum = 0.0f;
    for (int g = lane; g < groups; g += WARP_SIZE) {
      X dy[P], x[P], w[P];
      load_pack(dy, dy_row + g * P);
      load_pack(x, x_row + g * P);
      load_pack(w, weight + g * P);
      for (int e = 0; e < P; ++e) {
        const float dnorm = to_float(w[e]) * to_float(dy[e]);
        dnorm_sum += dnorm;
        dnorm_centred_sum += dnorm * (to_float(x[e]) - mu);
      }
    }
    const float dnorm_mean = warp_sum(dnorm_sum) / C, dnorm_norm_mean = warp_sum(dnorm_centred_sum) * rs / C;
    for (int g = lane; g < groups; g += WARP_SIZE) {
      X dy[P], x[P], w[P], dx[P];
      load_pack(dy, dy_row + g * P);
      load_pack(x, x_row + g * P);
      load_pack(w, weight + g * P);
      if (add_to_dinp) load_pack(dx, dx_row + g * P);
      float dweight[P], dbias[P];
      uncache(dweight, dweight_sum, groups, g);
      uncache(dbias, dbias_sum, groups, g);
      for (int e = 0; e < P; ++e) {
        const float normed = (to_float(x[e]) - mu) * rs, dy_e = to_float(dy[e]);
        const float grad = (to_float(w[e]) * dy_e - normed * dnorm_norm_mean - dnorm_mean) * rs;
        dx[e] = from_float<X>(add_to_dinp ? to_float(dx[e]) + grad : grad);
        dweight[e] += normed * dy_e;
        dbias[e] += dy_e;
      }
      store_pack(dx_row + g * P, dx);
      cache(dweight_sum, groups, g, dweight);
      cache(dbias_sum, groups, g, dbias);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int at = channel_index<P>(groups, c);
    float dweight = 0.0f, dbias = 0.0f;
    for (int w = 0; w < warps; ++w) {
      dweight += warp_sums[2 * w * C + at];
      dbias += warp_sums[(2 * w + 1) * C + at];
    }
    partials[(long long)blockIdx.x * C + c] = dweight;
    partials[(long long)(gridDim.x + blockIdx.x) * C + c] = dbias;
  }
}

// dinp must not overlap dout or inp (the second pass over a row reads them after writing dinp's row).
template <typename X>
__device__ void backward(X* dinp, float* partials, const X* dout, const X* inp, const X* weight, const float* mean,
                         const float* rstd, int N, int C, int add_to_dinp) {
  if (C % PACK<X> == 0 && aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(weight)) {
    backward_rows<X, PACK<X>>(dinp, partials, dout, inp, weight, mean, rstd, N, C, add_to_dinp);
  } else {
    backward_rows<X, 1>(dinp, partials, dout, inp, weight, mean, rstd, N, C, add_to_dinp);
  }
}
}  // namespace layernorm

extern "C" __global__ void layernorm_forward_f32(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias, int N, int C) { layernorm::forward(out, mean, rstd, inp, weight, bias, N, C); }
extern "C" __global__ void layernorm_forward_bf16(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight, const bf16* bias, int N, int C) { layernorm::forward(out, mean, rstd, inp, weight, bias, N, C); }
extern "C" __global__ void residual_layernorm_forward_f32(float* residual_out, float* ln_out, float* mean, float* rstd, const float* inp, const float* branch, const float* weight, const float* bias, int N, int C, uint64_t stream, uint32_t threshold, float keep_scale) { layernorm::residual_forward(residual_out, ln_out, mean, rstd, inp, branch, weight, bias, N, C, stream, threshold, keep_scale); }
extern "C" __global__ void residual_layernorm_forward_bf16(bf16* residual_out, bf16* ln_out, float* mean, float* rstd, const bf16* inp, const bf16* branch, const bf16* weight, const bf16* bias, int N, int C, uint64_t stream, uint32_t threshold, float keep_scale) { layernorm::residual_forward(residual_out, ln_out, mean, rstd, inp, branch, weight, bias, N, C, stream, threshold, keep_scale); }
extern "C" __global__ void layernorm_backward_f32(float* dinp, float* partials, const float* dout, const float* inp, const float* weight, const float* mean, const float* rstd, int N, int C, int add_to_dinp) { layernorm::backward(dinp, partials, dout, inp, weight, mean, rstd, N, C, add_to_dinp); }
extern "C" __global__ void layernorm_backward_bf16(bf16* dinp, float* partials, const bf16* dout, const bf16* inp, const bf16* weight, const float* mean, const float* rstd, int N, int C, int add_to_dinp) { layernorm::backward(dinp, partials, dout, inp, weight, mean, rstd, N, C, add_to_dinp); }
