// Token plus position embedding with the embedding dropout fused in (kernels/embedding.rs). The dropout
// mask is the Embedding site's, element (b*T + t)*C + c of the (B, T, C) output.
namespace encoder {
// out[b, t, c] = dropout(wte[tokens[b, t], c] + wpe[t, c]): one thread per output element, consecutive
// threads on consecutive channels, so the loads of both tables' rows and the store are coalesced.
template <typename X>
__device__ void forward(X* out, const int* tokens, const X* wte, const X* wpe, int B, int T, int C, uint64_t stream,
                        uint32_t threshold, float keep_scale) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)B * T * C) return;
  const long long row = i / C;
  const int c = (int)(i % C), t = (int)(row % T);
  const float sum = to_float(wte[(long long)tokens[row] * C + c]) + to_float(wpe[(long long)t * C + c]);
  out[i] = from_float<X>(sum * dropout_scale(stream, threshold, keep_scale, (uint64_t)i));
}

// One thread per (t, c): it applies the mask to dout[b, t, c] in place for every b (dout becomes the
// gradient of the sum before dropout), adds each to its token's row of dwte, and their sum to dwpe[t, c].
// dwpe's sum is over b in order, so it is deterministic. dwte takes atomicAdd: tokens repeat within a batch,
// so several threads may add to one row at once; the order of those float additions, and so dwte's last
// bits, can change from run to run (a deterministic version would sort positions by token first).
template <typename X>
__device__ void backward(float* dwte, float* dwpe, X* dout, const int* tokens, int B, int T, int C, uint64_t stream,
                         uint32_t threshold, float keep_scale) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)T * C) return;
  const int t = (int)(i / C), c = (int)(i % C);
  float position_sum = 0.0f;
  for (int b = 0; b < B; ++b) {
    const long long row = (long long)b * T + t, at = row * C + c;
    const float d = to_float(dout[at]) * dropout_scale(stream, threshold, keep_scale, (uint64_t)at);
    dout[at] = from_float<X>(d);
    position_sum += d;
    atomicAdd(&dwte[(long long)tokens[row] * C + c], d);
  }
  dwpe[i] += position_sum;
}
}  // namespace encoder

extern "C" __global__ void encoder_forward_f32(float* out, const int* tokens, const float* wte, const float* wpe, int B, int T, int C, uint64_t stream, uint32_t threshold, float keep_scale) { encoder::forward(out, tokens, wte, wpe, B, T, C, stream, threshold, keep_scale); }
extern "C" __global__ void encoder_forward_bf16(bf16* out, const int* tokens, const bf16* wte, const bf16* wpe, int B, int T, int C, uint64_t stream, uint32_t threshold, float keep_scale) { encoder::forward(out, tokens, wte, wpe, B, T, C, stream, threshold, keep_scale); }
extern "C" __global__ void encoder_backward_f32(float* dwte, float* dwpe, float* dout, const int* tokens, int B, int T, int C, uint64_t stream, uint32_t threshold, float keep_scale) { encoder::backward(dwte, dwpe, dout, tokens, B, T, C, stream, threshold, keep_scale); }
extern "C" __global__ void encoder_backward_bf16(float* dwte, float* dwpe, bf16* dout, const int* tokens, int B, int T, int C, uint64_t stream, uint32_t threshold, float keep_scale) { encoder::backward(dwte, dwpe, dout, tokens, B, T, C, stream, threshold, keep_scale); }
