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

// out = a b + c for a (32x48), b (48x16) bf16 and c, out (32x16) float, all row-major, through mma_16x8x16:
// a warp per 16 rows, both 8-column tiles, three steps along k, the operands taken from shared memory by
// ldmatrix as common.cuh lays them out (b transposed on the way).
extern "C" __global__ void check_mma(float* out, const bf16* a, const bf16* b, const float* c) {
  constexpr int M = 32, N = 16, K = 48, LD_A = K + 8, LD_B = N + 8;
  __shared__ __align__(16) bf16 a_tile[M * LD_A];
  __shared__ __align__(16) bf16 b_tile[K * LD_B];
  for (int i = threadIdx.x; i < M * K; i += blockDim.x) a_tile[i / K * LD_A + i % K] = a[i];
  for (int i = threadIdx.x; i < K * N; i += blockDim.x) b_tile[i / N * LD_B + i % N] = b[i];
  __syncthreads();
  const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4, row0 = threadIdx.x / WARP_SIZE * 16;
  float d[2][4];
  for (int e = 0; e < 8; ++e) d[e / 4][e % 4] = c[(row0 + g + 8 * (e % 4 / 2)) * N + 8 * (e / 4) + 2 * t + e % 2];
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t fa[4], fb[4];
    ldmatrix_x4(fa, a_tile + (row0 + lane % 16) * LD_A + k0 + 8 * (lane / 16));
    ldmatrix_x4_transposed(fb, b_tile + (k0 + lane % 8 + 8 * (lane / 8 % 2)) * LD_B + 8 * (lane / 16));
    const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
    mma_16x8x16(d[0], fa, b0);
    mma_16x8x16(d[1], fa, b1);
  }
  for (int e = 0; e < 8; ++e) out[(row0 + g + 8 * (e % 4 / 2)) * N + 8 * (e / 4) + 2 * t + e % 2] = d[e / 4][e % 4];
}

// Each thread copies two 16-byte rows of `in` to dynamic shared memory with cp.async, as two groups (row t, then
// row n + t, which thread 0 zero-fills instead), and records the first word of its neighbour's rows as it finds
// them: before any wait, after waiting for the older group (and the barrier after), and after waiting for both.
extern "C" __global__ void check_async_copies(unsigned* seen, const uint4* in) {
  DYNAMIC_SHARED(uint4, rows);
  const unsigned t = threadIdx.x, n = blockDim.x, next = (t + 1) % n;
  __pipeline_memcpy_async(&rows[t], &in[t], 16);
  __pipeline_commit();
  __pipeline_memcpy_async(&rows[n + t], &in[n + t], 16, t == 0 ? 16 : 0);
  __pipeline_commit();
  __syncthreads();
  seen[4 * t] = rows[next].x;
  __syncthreads();
  __pipeline_wait_prior(1);
  __syncthreads();
  seen[4 * t + 1] = rows[next].x;
  seen[4 * t + 2] = rows[n + next].x;
  __syncthreads();
  __pipeline_wait_prior(0);
  __syncthreads();
  seen[4 * t + 3] = rows[n + next].x;
}
