// GELU (kernels/gelu.rs): exact, with erf (PyTorch's nn.GELU()), or the tanh approximation (OpenAI's GPT-2).
// Elementwise, one thread per element: consecutive threads touch consecutive elements, so every warp's
// loads and stores are coalesced; the erf/tanh arithmetic is small beside the memory traffic.
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

template <typename X>
__device__ void forward(X* out, const X* inp, long long n, int tanh_approximation) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_float<X>(value(to_float(inp[i]), tanh_approximation != 0));
}

// dinp may be dout (the gradient replaced in place): each thread reads its element before writing it.
template <typename X>
__device__ void backward(X* dinp, const X* inp, const X* dout, long long n, int tanh_approximation) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dinp[i] = from_float<X>(to_float(dout[i]) * slope(to_float(inp[i]), tanh_approximation != 0));
}
}  // namespace gelu

extern "C" __global__ void gelu_forward_f32(float* out, const float* inp, long long n, int tanh_approximation) { gelu::forward(out, inp, n, tanh_approximation); }
extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, long long n, int tanh_approximation) { gelu::forward(out, inp, n, tanh_approximation); }
extern "C" __global__ void gelu_backward_f32(float* dinp, const float* inp, const float* dout, long long n, int tanh_approximation) { gelu::backward(dinp, inp, dout, n, tanh_approximation); }
extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout, long long n, int tanh_approximation) { gelu::backward(dinp, inp, dout, n, tanh_approximation); }
