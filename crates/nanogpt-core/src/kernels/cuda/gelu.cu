// GELU (kernels/gelu.rs): exact, with erf (PyTorch's nn.GELU()), or the tanh approximation (OpenAI's GPT-2).
// Elementwise, one 16-byte pack of consecutive elements (8 bf16 or 4 floats) per thread, loaded and stored
// as one access where the buffers are 16-byte aligned: an eighth (bf16) of the memory instructions of one
// element per thread, which left bf16 GELU at under half the bandwidth PyTorch's vectorised kernel reaches.
// Consecutive threads take consecutive packs, so every warp's accesses stay coalesced; the erf/tanh
// arithmetic is small beside the memory traffic.
namespace gelu {
constexpr float INV_SQRT_2 = 0.70710678f;
constexpr float INV_SQRT_2PI = 0.39894228f;
constexpr float SQRT_2_OVER_PI = 0.79788456f;
constexpr float CUBIC = 0.044715f;

// gelu(x) and d gelu(x) / dx, sharing the erf (or tanh), which is most of the arithmetic. The forward pass
// uses the value alone, and the compiler drops the slope's terms.
struct ValueAndSlope {
  float value, slope;
};
template <bool TANH>
__device__ __forceinline__ ValueAndSlope value_and_slope(float x) {
  if constexpr (TANH) {
    const float th = tanhf(SQRT_2_OVER_PI * (x + CUBIC * x * x * x));
    return {0.5f * x * (1.0f + th), 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * SQRT_2_OVER_PI * (1.0f + 3.0f * CUBIC * x * x)};
  } else {
    const float cdf = 0.5f * (1.0f + erff(x * INV_SQRT_2));
    return {x * cdf, cdf + x * INV_SQRT_2PI * expf(-0.5f * x * x)};
  }
}

// f(std::bool_constant<tanh_approximation>): each kernel is compiled for both, with no per-element branch.
template <typename F>
__device__ __forceinline__ void with_approximation(int tanh_approximation, const F& f) {
  if (tanh_approximation) f(std::true_type{});
  else f(std::false_type{});
}

// out[o][i] = f(a[i], b[i])[o] for each of the OUTPUTS, over the calling thread's pack (b is unused by
// one-input maps; pass a). f writes its results to its third argument. An output may be a or b: each pack
// is read whole before it is written.
template <int OUTPUTS, typename X, typename F>
__device__ __forceinline__ void map_pack(X* const (&out)[OUTPUTS], const X* a, const X* b, long long n, F f) {
  constexpr int P = PACK<X>;
  const long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * P;
  if (first >= n) return;
  bool aligned = aligned16(a) && aligned16(b);
  for (int o = 0; o < OUTPUTS; ++o) aligned = aligned && aligned16(out[o]);
  if (first + P <= n && aligned) {
    X av[P], bv[P], ov[OUTPUTS][P];
    load_pack(av, a + first);
    load_pack(bv, b + first);
    for (int e = 0; e < P; ++e) {
      float results[OUTPUTS];
      f(to_float(av[e]), to_float(bv[e]), results);
      for (int o = 0; o < OUTPUTS; ++o) ov[o][e] = from_float<X>(results[o]);
    }
    for (int o = 0; o < OUTPUTS; ++o) store_pack(out[o] + first, ov[o]);
  } else {
    for (long long i = first; i < n && i < first + P; ++i) {
      float results[OUTPUTS];
      f(to_float(a[i]), to_float(b[i]), results);
      for (int o = 0; o < OUTPUTS; ++o) out[o][i] = from_float<X>(results[o]);
    }
  }
}

template <typename X>
__device__ void forward(X* out, const X* inp, long long n, int tanh_approximation) {
  X* const outputs[1] = {out};
  with_approximation(tanh_approximation, [&](auto tanh_case) {
    map_pack(outputs, inp, inp, n, [](float x, float, float (&y)[1]) { y[0] = value_and_slope<decltype(tanh_case)::value>(x).value; });
  });
}

// dinp = dout * gelu'(inp), and out = gelu(inp) again, in one pass over inp: the training step keeps no GELU
// output, and the MLP's projection needs it for its weight gradient. inp is read once where a separate
// forward would read it again, and the erf (or tanh) is computed once for both. dinp may be dout (the
// gradient replaced in place).
template <typename X>
__device__ void backward(X* dinp, X* out, const X* inp, const X* dout, long long n, int tanh_approximation) {
  X* const outputs[2] = {dinp, out};
  with_approximation(tanh_approximation, [&](auto tanh_case) {
    map_pack(outputs, inp, dout, n, [](float x, float g, float (&y)[2]) {
      const ValueAndSlope gelu = value_and_slope<decltype(tanh_case)::value>(x);
      y[0] = g * gelu.slope;
      y[1] = gelu.value;
    });
  });
}
}  // namespace gelu

extern "C" __global__ void gelu_forward_f32(float* out, const float* inp, long long n, int tanh_approximation) { gelu::forward(out, inp, n, tanh_approximation); }
extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, long long n, int tanh_approximation) { gelu::forward(out, inp, n, tanh_approximation); }
extern "C" __global__ void gelu_backward_f32(float* dinp, float* out, const float* inp, const float* dout, long long n, int tanh_approximation) { gelu::backward(dinp, out, inp, dout, n, tanh_approximation); }
extern "C" __global__ void gelu_backward_bf16(bf16* dinp, bf16* out, const bf16* inp, const bf16* dout, long long n, int tanh_approximation) { gelu::backward(dinp, out, inp, dout, n, tanh_approximation); }
