// Kernels that exercise each CUDA built-in the emulator provides, for its own tests (tests/emulator.rs).

// out[i] = the block's sum of in[] (through block_sum: shuffles, shared memory, __syncthreads), per block.
extern "C" __global__ void check_block_sum(float* out, const float* in) {
  __shared__ float scratch[32];
  const float total = block_sum(in[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

// Each thread writes its index to dynamic shared memory and reads its neighbour's after a barrier.
extern "C" __global__ void check_shared_rotation(int* out) {
  DYNAMIC_SHARED(int, slots);
  slots[threadIdx.x] = (int)(blockIdx.x * 1000 + threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// Every thread adds 1 to one counter, and threads past `active` return before the barrier.
extern "C" __global__ void check_atomics_and_early_exit(float* counter, int* after_barrier, int active) {
  atomicAdd(counter, 1.0f);
  if ((int)threadIdx.x >= active) return;
  __syncthreads();
  atomicAdd(after_barrier, 1);
}

// Lane l gets the value of lane l + 1 (down), l ^ 3 (xor) and lane 5 (broadcast), and bf16 round trips.
extern "C" __global__ void check_shuffles(int* down, int* xored, int* broadcast, float* rounded, const float* in) {
  const int t = (int)threadIdx.x;
  down[t] = __shfl_down_sync(0xffffffffu, t, 1);
  xored[t] = __shfl_xor_sync(0xffffffffu, t, 3);
  broadcast[t] = __shfl_sync(0xffffffffu, t, 5);
  rounded[t] = to_float(from_float<bf16>(in[t]));
}

// out = a b + c for a (32x48, row-major), b (48x16, stored as its row-major transpose) bf16 and c, out
// (32x16, row-major) float, through mma_16x8x16: a warp per 16 rows, two 8-column tiles, three steps along
// k, each lane loading its fragments from global memory as common.cuh lays them out.
extern "C" __global__ void check_mma(float* out, const bf16* a, const bf16* b_transposed, const float* c) {
  constexpr int N = 16, K = 48;
  const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4, row0 = threadIdx.x / WARP_SIZE * 16;
  for (int n0 = 0; n0 < N; n0 += 8) {
    float d[4];
    for (int e = 0; e < 4; ++e) d[e] = c[(row0 + g + 8 * (e / 2)) * N + n0 + 2 * t + e % 2];
    for (int k0 = 0; k0 < K; k0 += 16) {
      const bf16* at = a + (row0 + g) * K + k0 + 2 * t;
      const uint32_t fa[4] = {load_bf16_pair(at), load_bf16_pair(at + 8 * K), load_bf16_pair(at + 8), load_bf16_pair(at + 8 * K + 8)};
      const bf16* bt = b_transposed + (n0 + g) * K + k0 + 2 * t;
      const uint32_t fb[2] = {load_bf16_pair(bt), load_bf16_pair(bt + 8)};
      mma_16x8x16(d, fa, fb);
    }
    for (int e = 0; e < 4; ++e) out[(row0 + g + 8 * (e / 2)) * N + n0 + 2 * t + e % 2] = d[e];
  }
}
