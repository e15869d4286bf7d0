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

// out = 2 (a b + c) for a (32x48), b (48x16) bf16 and c, out (32x16) float, through wmma m16n16k16: a warp
// per 16 rows, three steps along k, the factor 2 applied element-wise through x[i]. All four matrices are
// row-major, or all column-major when `column_major`. They pass through static shared memory.
extern "C" __global__ void check_wmma(float* out, const bf16* a, const bf16* b, const float* c, int column_major) {
  using namespace nvcuda;
  constexpr int M = 32, N = 16, K = 48;
  __shared__ __align__(32) bf16 a_tile[M * K];
  __shared__ __align__(32) bf16 b_tile[K * N];
  __shared__ __align__(32) float c_tile[M * N];
  for (int i = threadIdx.x; i < M * K; i += blockDim.x) a_tile[i] = a[i];
  for (int i = threadIdx.x; i < K * N; i += blockDim.x) b_tile[i] = b[i];
  for (int i = threadIdx.x; i < M * N; i += blockDim.x) c_tile[i] = c[i];
  __syncthreads();
  const int row0 = (int)threadIdx.x / WARP_SIZE * 16;
  const wmma::layout_t layout = column_major ? wmma::mem_col_major : wmma::mem_row_major;
  float* c_block = column_major ? c_tile + row0 : c_tile + row0 * N;
  const unsigned c_ld = column_major ? M : N;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, c_block, c_ld, layout);
  for (int k0 = 0; k0 < K; k0 += 16) {
    if (column_major) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a_tile + k0 * M + row0, M);
      wmma::load_matrix_sync(fb, b_tile + k0, K);
      wmma::mma_sync(acc, fa, fb, acc);
    } else {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, a_tile + row0 * K + k0, K);
      wmma::load_matrix_sync(fb, b_tile + k0 * N, N);
      wmma::mma_sync(acc, fa, fb, acc);
    }
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 2.0f;
  __syncthreads();  // every warp's accumulator is loaded before c_tile is overwritten with the results
  wmma::store_matrix_sync(c_block, acc, c_ld, layout);
  __syncthreads();
  for (int i = threadIdx.x; i < M * N; i += blockDim.x) out[i] = c_tile[i];
}
