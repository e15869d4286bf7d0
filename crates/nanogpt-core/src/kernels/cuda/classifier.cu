// Cross-entropy of the logits (N, V) against their targets, fused with its softmax and its gradient, as
// kernels/cross_entropy.rs: training overwrites each row of logits with the row's gradient, so the
// classifier needs no second logits-sized buffer (for GPT-2 at B=12, T=1024 one is 1.2 GB in f32).

namespace classifier {

// A running log-sum-exp: the largest logit seen and the sum of exp(logit - max) over the logits seen,
// so that one read of a row yields its log-sum-exp without overflowing.
struct SoftmaxState {
  float max;
  float sum;
};

static __device__ __forceinline__ SoftmaxState add_logit(SoftmaxState s, float x) {
  if (x > s.max) return {x, s.sum * __expf(s.max - x) + 1.0f};
  return {s.max, s.sum + __expf(x - s.max)};
}

// Commutative (both operands are treated alike), so every lane of a butterfly ends with the same state.
static __device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  const float max = fmaxf(a.max, b.max);
  if (max == -INFINITY) return a;  // neither has seen a logit
  return {max, a.sum * __expf(a.max - max) + b.sum * __expf(b.max - max)};
}

static __device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState s) {
  for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
    const SoftmaxState other = {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset)};
    s = merge(s, other);
  }
  return s;
}

// The state of the whole block (blockDim.x a multiple of 32), returned to every thread.
static __device__ __forceinline__ SoftmaxState block_merge(SoftmaxState s) {
  __shared__ float maxima[WARP_SIZE];
  __shared__ float sums[WARP_SIZE];
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
  s = warp_merge(s);
  if (lane == 0) {
    maxima[warp] = s.max;
    sums[warp] = s.sum;
  }
  __syncthreads();
  const SoftmaxState mine = lane < warps ? SoftmaxState{maxima[lane], sums[lane]} : SoftmaxState{-INFINITY, 0.0f};
  return warp_merge(mine);
}

// P consecutive logits, read or written in one access: 16 bytes (one 128-bit load or store) on the fast
// path, one logit where the rows are not 16-byte aligned.
template <typename X, int P>
struct alignas(sizeof(X) * P) Pack {
  X v[P];
};

// The loss of the row `x` and, with write_gradient, its gradient in its place, P logits at a time
// (V is a multiple of P, and x aligned to P logits).
template <int P, typename X>
__device__ void cross_entropy_row(X* x, float* loss, int target, int V, float grad_scale, int write_gradient) {
  typedef Pack<X, P> Packed;
  // A target past the vocabulary cannot be checked on the host without a copy; it makes the loss NaN,
  // which the logged loss shows, instead of reading outside the row.
  const bool in_vocab = target < V;
  // Read before block_merge's barrier: after it, other threads overwrite the row with its gradient.
  const float target_logit = threadIdx.x == 0 && in_vocab ? to_float(x[target]) : 0.0f;
  SoftmaxState s = {-INFINITY, 0.0f};
  for (int i = threadIdx.x * P; i < V; i += blockDim.x * P) {
    const Packed logits = *reinterpret_cast<const Packed*>(x + i);
    for (int k = 0; k < P; ++k) s = add_logit(s, to_float(logits.v[k]));
  }
  s = block_merge(s);
  const float lse = s.max + logf(s.sum);
  if (threadIdx.x == 0) *loss = in_vocab ? lse - target_logit : NAN;
  if (!write_gradient) return;
  // (softmax - one_hot(target)) * grad_scale, subtracting the scale as the CPU kernel does.
  for (int i = threadIdx.x * P; i < V; i += blockDim.x * P) {
    Packed values = *reinterpret_cast<const Packed*>(x + i);
    for (int k = 0; k < P; ++k) {
      float g = __expf(to_float(values.v[k]) - lse) * grad_scale;
      if (i + k == target) g -= grad_scale;
      values.v[k] = from_float<X>(g);
    }
    *reinterpret_cast<Packed*>(x + i) = values;
  }
}

// One block per row: the row's reductions stay in the block (no second launch, no atomics), and a
// 50304-wide row gives 1024 threads about 50 coalesced logits each, in 128-bit accesses when the rows
// are 16-byte aligned (GPT-2's 50304 is a multiple of 8).
template <typename X>
__device__ void cross_entropy(X* logits, float* losses, const int* targets, int N, int V, float grad_scale, int write_gradient) {
  const int row = blockIdx.x;
  if (row >= N) return;
  X* x = logits + (size_t)row * V;
  const int target = targets[row];
  if (target < 0) {  // ignored (PyTorch's ignore_index=-1): no loss, no gradient
    if (threadIdx.x == 0) losses[row] = 0.0f;
    if (write_gradient)
      for (int i = threadIdx.x; i < V; i += blockDim.x) x[i] = from_float<X>(0.0f);
    return;
  }
  constexpr int P = 16 / sizeof(X);
  if (V % P == 0 && (uintptr_t)logits % 16 == 0)
    cross_entropy_row<P>(x, losses + row, target, V, grad_scale, write_gradient);
  else
    cross_entropy_row<1>(x, losses + row, target, V, grad_scale, write_gradient);
}

}  // namespace classifier

extern "C" __global__ void cross_entropy_f32(float* logits, float* losses, const int* targets, int N, int V, float grad_scale, int write_gradient) {
  classifier::cross_entropy(logits, losses, targets, N, V, grad_scale, write_gradient);
}
extern "C" __global__ void cross_entropy_bf16(bf16* logits, float* losses, const int* targets, int N, int V, float grad_scale, int write_gradient) {
  classifier::cross_entropy(logits, losses, targets, N, V, grad_scale, write_gradient);
}

// *total = the sum of losses[0..n], in one block so that the order of additions, and the result, are
// the same every run; the host reads this one number only when it logs the loss.
extern "C" __global__ void loss_sum(float* total, const float* losses, int n) {
  __shared__ float scratch[WARP_SIZE];
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *total = s;
}
