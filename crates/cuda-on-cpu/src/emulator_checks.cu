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
