// The optimizer step over the flat f32 buffers (parameters, gradients, both moments), as optim.rs's
// FlatAdamW: the global gradient norm, then one AdamW pass that clips by it on the device, so the
// host never waits for the GPU within a step.

// partials[blockIdx.x] = the sum of squares of this block's share of grads[0..n]. The host launches a
// fixed grid for a given n (adamw.rs), so each partial covers the same elements, added in the same order,
// every run. Indices are 64-bit: the flat buffers of a large model pass 2^31 elements. Each thread adds in
// double: it adds thousands of squares for such a model, and the adds cost nothing in a kernel bound by memory.
extern "C" __global__ void grad_norm_squared_partials(float* partials, const float* grads, long long n) {
  __shared__ float scratch[WARP_SIZE];
  const long long stride = (long long)gridDim.x * blockDim.x;
  double s = 0.0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = grads[i];
    s += (double)g * g;
  }
  const float block_total = block_sum((float)s, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
}

// *norm_squared = the sum of partials[0..count], by one block: the second half of the deterministic norm.
extern "C" __global__ void grad_norm_squared_total(float* norm_squared, const float* partials, int count) {
  __shared__ float scratch[WARP_SIZE];
  float s = 0.0f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *norm_squared = s;
}

namespace adamw {

// The parameter tensor holding element i: the first of the sorted exclusive ends past i. A binary
// search (about 8 steps over GPT-2's 150 tensors) rather than a per-chunk map: the table is 9 bytes per
// tensor (1.4 KB for GPT-2) whatever the parameter count, it stays in L1, and every lane of a warp takes
// the same steps unless the warp straddles a boundary; the element's DRAM loads are issued before the
// search, so it runs under their latency.
static __device__ __forceinline__ int tensor_of(long long i, const long long* tensor_ends, int tensors) {
  int lo = 0, hi = tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (tensor_ends[mid] > i) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// One element per thread: the step reads 16 and writes 12 bytes (plus the compute copy) per element,
// so it is bound by memory bandwidth, and a flat grid keeps every access coalesced. The n elements start
// at element `first` of the table's layout (ZeRO-1's shard of this rank; 0 otherwise).
template <typename X>
__device__ void update(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, X* params_copy, long long n,
                       long long first, const long long* tensor_ends, const unsigned char* tensor_decays, int tensors, float beta1,
                       float beta2, float eps, float decay_keep, float step_size, float bias_correction2_sqrt,
                       float grad_scale, const float* grad_norm_squared, float max_norm) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float p0 = params[i], g = grads[i], m0 = exp_avg[i], v0 = exp_avg_sq[i];
  // torch.nn.utils.clip_grad_norm_'s coefficient, max_norm / (norm + 1e-6), whenever it is below one, for
  // the norm of the gradients once multiplied by grad_scale (as GradScaler.unscale_ precedes clipping).
  const float clip = grad_norm_squared ? fminf(1.0f, max_norm / (sqrtf(*grad_norm_squared) * grad_scale + 1e-6f)) : 1.0f;
  const float keep = tensor_decays[tensor_of(first + i, tensor_ends, tensors)] ? decay_keep : 1.0f;
  // kernels/adamw.rs's arithmetic, term for term.
  const float gi = g * (grad_scale * clip);
  const float m = beta1 * m0 + (1.0f - beta1) * gi;
  const float v = beta2 * v0 + (1.0f - beta2) * gi * gi;
  const float p = p0 * keep - step_size * m / (sqrtf(v) / bias_correction2_sqrt + eps);
  exp_avg[i] = m;
  exp_avg_sq[i] = v;
  params[i] = p;
  if (params_copy) params_copy[i] = from_float<X>(p);
}

}  // namespace adamw

extern "C" __global__ void adamw_f32(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, float* params_copy, long long n, long long first, const long long* tensor_ends, const unsigned char* tensor_decays, int tensors, float beta1, float beta2, float eps, float decay_keep, float step_size, float bias_correction2_sqrt, float grad_scale, const float* grad_norm_squared, float max_norm) {
  adamw::update(params, grads, exp_avg, exp_avg_sq, params_copy, n, first, tensor_ends, tensor_decays, tensors, beta1, beta2, eps,
                decay_keep, step_size, bias_correction2_sqrt, grad_scale, grad_norm_squared, max_norm);
}
extern "C" __global__ void adamw_bf16(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, bf16* params_copy, long long n, long long first, const long long* tensor_ends, const unsigned char* tensor_decays, int tensors, float beta1, float beta2, float eps, float decay_keep, float step_size, float bias_correction2_sqrt, float grad_scale, const float* grad_norm_squared, float max_norm) {
  adamw::update(params, grads, exp_avg, exp_avg_sq, params_copy, n, first, tensor_ends, tensor_decays, tensors, beta1, beta2, eps,
                decay_keep, step_size, bias_correction2_sqrt, grad_scale, grad_norm_squared, max_norm);
}

// copy[i] = params[i] rounded to bf16: the compute copy of weights that other ranks updated (ZeRO-1's all-gather
// brings their f32 master weights).
extern "C" __global__ void round_params_bf16(bf16* copy, const float* params, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) copy[i] = from_float<bf16>(params[i]);
}
