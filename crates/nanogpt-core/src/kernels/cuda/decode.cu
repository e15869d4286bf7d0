// Generation with a KV cache (decode_cuda.rs, the GPU's counterpart of decode.rs): new positions' keys and
// values appended to the cache, each new query attending to the cache, and each sequence's last row picked out
// for the output layer. The cache holds, per sequence and layer, a (block, C) matrix of keys and one of values:
// element (s, l, p, c) at ((s * L + l) * block + p) * C + c.
namespace decode {
// One thread per element of the new rows' keys (and the same element of their values): row r of qkv (B*T rows
// of 3C: query, key, value) is position pos0 + r % T of sequence r / T.
template <typename X>
__device__ void kv_append(X* keys, X* values, const X* qkv, int rows, int t, int pos0, int c, long long layer_offset, long long seq_stride) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)rows * c) return;
  const int row = (int)(i / c), col = (int)(i % c);
  const long long slot = (row / t) * seq_stride + layer_offset + (long long)(pos0 + row % t) * c + col;
  keys[slot] = qkv[(long long)row * 3 * c + c + col];
  values[slot] = qkv[(long long)row * 3 * c + 2 * c + col];
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : -INFINITY);
}

// One block per (new position i, head h, sequence s): the query of row s * T + i, at position pos0 + i, against
// the cache's positions 0 to pos0 + i of its sequence (keys and values point at the layer's matrices of the
// first sequence), into out (B*T, C). Dynamic shared memory: hs + block + 32 floats (the scaled query, the
// scores, the reductions' scratch). blockDim.x is a multiple of 32.
template <typename X>
__device__ void attend(X* out, const X* qkv, const X* keys, const X* values, int t, int pos0, int c, int nh, int block, long long seq_stride) {
  DYNAMIC_SHARED(float, shared);
  const int i = blockIdx.x, h = blockIdx.y, s = blockIdx.z, hs = c / nh;
  const int len = pos0 + i + 1;
  const long long row = (long long)s * t + i;
  float* query = shared;
  float* scores = shared + hs;
  float* scratch = scores + block;
  const float scale = rsqrtf((float)hs);
  for (int d = threadIdx.x; d < hs; d += blockDim.x) query[d] = to_float(qkv[row * 3 * c + h * hs + d]) * scale;
  __syncthreads();
  const X* k = keys + s * seq_stride + h * hs;
  const X* v = values + s * seq_stride + h * hs;
  float local_max = -INFINITY;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    float score = 0.0f;
    for (int d = 0; d < hs; ++d) score += query[d] * to_float(k[(long long)j * c + d]);
    scores[j] = score;
    local_max = fmaxf(local_max, score);
  }
  const float max_score = block_max(local_max, scratch);
  float local_sum = 0.0f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const float p = expf(scores[j] - max_score);
    scores[j] = p;
    local_sum += p;
  }
  const float total = block_sum(local_sum, scratch);
  __syncthreads();  // every score written before any thread reads them all
  for (int d = threadIdx.x; d < hs; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < len; ++j) acc += scores[j] * to_float(v[(long long)j * c + d]);
    out[row * c + h * hs + d] = from_float<X>(acc / total);
  }
}

// dst (B, C) = row s * T + T - 1 of src (B*T, C) for each sequence s.
template <typename X>
__device__ void last_rows(X* dst, const X* src, int b, int t, int c) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)b * c) return;
  const int s = (int)(i / c), col = (int)(i % c);
  dst[i] = src[((long long)s * t + t - 1) * c + col];
}
}  // namespace decode

extern "C" __global__ void kv_append_f32(float* keys, float* values, const float* qkv, int rows, int t, int pos0, int c, long long layer_offset, long long seq_stride) { decode::kv_append(keys, values, qkv, rows, t, pos0, c, layer_offset, seq_stride); }
extern "C" __global__ void kv_append_bf16(bf16* keys, bf16* values, const bf16* qkv, int rows, int t, int pos0, int c, long long layer_offset, long long seq_stride) { decode::kv_append(keys, values, qkv, rows, t, pos0, c, layer_offset, seq_stride); }
extern "C" __global__ void attend_to_cache_f32(float* out, const float* qkv, const float* keys, const float* values, int t, int pos0, int c, int nh, int block, long long seq_stride) { decode::attend(out, qkv, keys, values, t, pos0, c, nh, block, seq_stride); }
extern "C" __global__ void attend_to_cache_bf16(bf16* out, const bf16* qkv, const bf16* keys, const bf16* values, int t, int pos0, int c, int nh, int block, long long seq_stride) { decode::attend(out, qkv, keys, values, t, pos0, c, nh, block, seq_stride); }
extern "C" __global__ void last_rows_f32(float* dst, const float* src, int b, int t, int c) { decode::last_rows(dst, src, b, t, c); }
extern "C" __global__ void last_rows_bf16(bf16* dst, const bf16* src, int b, int t, int c) { decode::last_rows(dst, src, b, t, c); }
