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

__device__ __forceinline__ float value(float x, bool tanh_approximation) {
  if (tanh_approximation) return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * (x + CUBIC * x * x * x)));
  return 0.5f * x * (1.0f + erff(x * INV_SQRT_2));
}

// d gelu(x) / dx.
__device__ __forceinline__ float slope(float x, bool tanh_approximation) {
  if (tanh_approximation) {
    const float th = tanhf(SQRT_2_OVER_PI * (x + CUBIC * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * SQRT_2_OVER_PI * (1.0f + 3.0f * CUBIC * x * x);
  }
  return 0.5f * (1.0f + erff(x * INV_SQRT_2)) + x * INV_SQRT_2PI * expf(-0.5f * x * x);
}

// out[i] = f(a[i], b[i]) over the calling thread's pack (b is unused by one-input maps; pass a). out may be
// a or b: each pack is read whole before it is written.
template <typename X, typename F>
__device__ __forceinline__ void map_pack(X* out, const X* a, const X* b, long long n, F f) {
  constexpr int P = PACK<X>;
  const long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * P;
  if (first >= n) return;
  if (first + P <= n && aligned16(out) && aligned16(a) && aligned16(b)) {
    alignas(16) X av[P], bv[P], ov[P];
    *reinterpret_cast<uint4*>(av) = *reinterpret_cast<const uint4*>(a + first);
    *reinterpret_cast<uint4*>(bv) = *reinterpret_cast<const uint4*>(b + first);
    for (int e = 0; e < P; ++e) ov[e] = from_float<X>(f(to_float(av[e]), to_float(bv[e])));
    *reinterpret_cast<uint4*>(out + first) = *reinterpret_cast<const uint4*>(ov);
  } else {
    for (long long i = first; i < n && i < first + P; ++i) out[i] = from_float<X>(f(to_float(a[i]), to_float(b[i])));
  }
}

template <typename X>
__device__ void forward(X* out, const X* inp, long long n, int tanh_approximation) {
  const bool approximate = tanh_approximation != 0;
  map_pack(out, inp, inp, n, [=](float x, float) { return value(x, approximate); });
}

// dinp may be dout (the gradient replaced in place).
template <typename X>
__device__ void backward(X* dinp, const X* inp, const X* dout, long long n, int tanh_approximation) {
  const bool approximate = tanh_approximation != 0;
  map_pack(dinp, inp, dout, n, [=](float x, float g) { return g * slope(x, approximate); });
}
}  // namespace gelu

extern "C" __global__ void gelu_forward_f32(float* out, const float* inp, long long n, int tanh_approximation) { gelu::forward(out, inp, n, tanh_approximation); }
extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, long long n, int tanh_approximation) { gelu::forward(out, inp, n, tanh_approximation); }
extern "C" __global__ void gelu_backward_f32(float* dinp, const float* inp, const float* dout, long long n, int tanh_approximation) { gelu::backward(dinp, inp, dout, n, tanh_approximation); }
extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout, long long n, int tanh_approximation) { gelu::backward(dinp, inp, dout, n, tanh_approximation); }
