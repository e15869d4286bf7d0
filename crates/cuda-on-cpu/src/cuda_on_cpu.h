// CUDA's built-ins for kernels compiled as C++ and run by launcher.cpp: one OS thread per CUDA thread,
// one block at a time (see lib.rs). Force-included ahead of the kernel sources.
#pragma once

#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <atomic>
#include <cmath>
#include <deque>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// Blocks run one at a time, so a function's static variable is exactly its block's shared variable.
#define __shared__ static
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(cuda_on_cpu::dynamic_shared())

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace cuda_on_cpu {
void* dynamic_shared();
void syncthreads();
void syncwarp();
// This thread's index within its block (x fastest), and the block's per-thread exchange slots, SLOT_WORDS
// words each, that warp shuffles and tensor-core fragments pass through.
unsigned thread_in_block();
constexpr unsigned SLOT_WORDS = 4;
uint64_t* exchange_slots();

// Each lane publishes its value, the warp waits, each lane reads lane `source(lane)` (its own value
// where the source is out of range), and the warp waits again before the slots can be reused.
template <typename T, typename Source>
T shuffle(T value, Source source) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  const unsigned tid = thread_in_block(), lane = tid % 32, first = tid - lane;
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  exchange_slots()[tid * SLOT_WORDS] = bits;
  syncwarp();
  const int from = source((int)lane);
  T result = value;
  if (from >= 0 && from < 32 && first + from < threads) memcpy(&result, &exchange_slots()[(first + from) * SLOT_WORDS], sizeof(T));
  syncwarp();
  return result;
}

template <typename... A, size_t... I>
void invoke(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(params[I])...);
}

void add_kernel(const char* name, size_t arity, void (*thunk)(void* kernel, void** params), void* kernel);

template <typename... A>
void register_kernel(const char* name, void (*kernel)(A...)) {
  add_kernel(
      name, sizeof...(A),
      [](void* k, void** params) { invoke(reinterpret_cast<void (*)(A...)>(k), params, std::index_sequence_for<A...>{}); },
      reinterpret_cast<void*>(kernel));
}
}  // namespace cuda_on_cpu

inline void __syncthreads() { cuda_on_cpu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_on_cpu::syncwarp(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  return cuda_on_cpu::shuffle(value, [&](int lane) {
    const int from = lane ^ lane_mask;
    return from / width > lane / width ? lane : from;
  });
}
template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  return cuda_on_cpu::shuffle(value, [&](int lane) { return lane % width + (int)delta < width ? lane + (int)delta : lane; });
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta, int width = 32) {
  return cuda_on_cpu::shuffle(value, [&](int lane) { return lane % width >= (int)delta ? lane - (int)delta : lane; });
}
template <typename T>
T __shfl_sync(unsigned, T value, int source_lane, int width = 32) {
  return cuda_on_cpu::shuffle(value, [&](int lane) { return lane / width * width + source_lane % width; });
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.0f), 1.0f); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// bf16 as the GPU stores it: the top half of an IEEE float, rounded to nearest even.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = (uint32_t)h.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1);
  return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

#define __align__(n) __attribute__((aligned(n)))

// Asynchronous copies to shared memory (CUDA's <cuda_pipeline.h>, cp.async), landing at one of the two ends of
// what the hardware allows, as the launch asks (lib.rs's CopyLanding). Early: as issued, so that a copy over a
// tile that another warp may still read corrupts it. Late: an issued copy only joins this thread's open group,
// `__pipeline_commit` closes the group, `__pipeline_wait_prior(n)` completes every closed group but the newest n,
// and the copies completed land at the thread's next `__syncthreads`, before it arrives there; so a kernel that
// reads a tile before its wait, or before the barrier that must follow every thread's wait, reads what was there
// before (each block's shared memory starts as 0xff bytes, bf16 NaNs). Late is stricter than the hardware in one
// case: there a thread sees its own completed copies right after its wait, which no kernel here relies on.
// Copies still pending when the thread's kernel returns land then. The last `zfill` of `size` bytes are zeros
// rather than copied.
namespace cuda_on_cpu {
bool copies_land_early();
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t size, zfill;
};
struct AsyncCopies {
  std::vector<AsyncCopy> open, completed;
  std::deque<std::vector<AsyncCopy>> committed;
};
inline AsyncCopies& async_copies() {
  thread_local AsyncCopies copies;
  return copies;
}
inline void land(std::vector<AsyncCopy>& copies) {
  for (const AsyncCopy& c : copies) {
    memcpy(c.dst, c.src, c.size - c.zfill);
    memset(static_cast<char*>(c.dst) + (c.size - c.zfill), 0, c.zfill);
  }
  copies.clear();
}
// At a barrier: the copies this thread's waits completed.
inline void land_completed_copies() { land(async_copies().completed); }
// When the thread's kernel returns: every copy it issued.
inline void land_pending_copies() {
  AsyncCopies& copies = async_copies();
  land(copies.completed);
  for (auto& group : copies.committed) land(group);
  copies.committed.clear();
  land(copies.open);
}
}  // namespace cuda_on_cpu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill = 0) {
  assert((size == 4 || size == 8 || size == 16) && zfill <= size && "cp.async copies 4, 8 or 16 bytes");
  assert((uintptr_t)dst % size == 0 && (uintptr_t)src % size == 0 && "cp.async needs addresses aligned to its size");
  cuda_on_cpu::async_copies().open.push_back({dst, src, size, zfill});
  if (cuda_on_cpu::copies_land_early()) cuda_on_cpu::land(cuda_on_cpu::async_copies().open);
}
inline void __pipeline_commit() {
  cuda_on_cpu::AsyncCopies& copies = cuda_on_cpu::async_copies();
  copies.committed.push_back(std::move(copies.open));
  copies.open.clear();
}
inline void __pipeline_wait_prior(size_t newest) {
  cuda_on_cpu::AsyncCopies& copies = cuda_on_cpu::async_copies();
  for (; copies.committed.size() > newest; copies.committed.pop_front())
    copies.completed.insert(copies.completed.end(), copies.committed.front().begin(), copies.committed.front().end());
}

// PTX's mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, d += a b, for the calling warp (all 32 lanes).
// The fragments' layout is PTX's documented one, which kernels rely on (common.cuh's mma_16x8x16 spells it
// out): every lane publishes its registers, then computes its own four results from the whole A (16 x 16)
// and B (16 x 8), products exact in float, summed in float along k.
namespace cuda_on_cpu {
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned tid = thread_in_block(), lane = tid % 32, first = tid - lane;
  uint32_t* mine = reinterpret_cast<uint32_t*>(exchange_slots() + tid * SLOT_WORDS);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  syncwarp();
  // Element `half` (0: the lower 16 bits) of register `reg` of lane `source`.
  const auto element = [&](unsigned source, int reg, int half) {
    const uint32_t word = reinterpret_cast<const uint32_t*>(exchange_slots() + (first + source) * SLOT_WORDS)[reg];
    return __bfloat162float(__nv_bfloat16{(uint16_t)(half ? word >> 16 : word & 0xffffu)});
  };
  const auto a_at = [&](int row, int k) { return element((row % 8) * 4 + (k % 8) / 2, (row >= 8) + 2 * (k >= 8), k % 2); };
  const auto b_at = [&](int k, int col) { return element(col * 4 + (k % 8) / 2, 4 + (k >= 8), k % 2); };
  const int g = (int)lane / 4, t = (int)lane % 4;
  float result[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = d[e];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    result[e] = sum;
  }
  syncwarp();  // every lane has read the slots before any of them is reused
  for (int e = 0; e < 4; ++e) d[e] = result[e];
}
}  // namespace cuda_on_cpu

// PTX's ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for the calling warp (all 32 lanes): lane i gives
// the address of row i % 8 of 8 x 8 matrix i / 8 (eight 16-bit elements); register m of lane l receives,
// of matrix m, elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1), or with `transpose` (2 (l % 4), l / 4)
// and (2 (l % 4) + 1, l / 4), the first in the lower half.
namespace cuda_on_cpu {
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool transpose) {
  const unsigned tid = thread_in_block(), lane = tid % 32, first = tid - lane;
  exchange_slots()[tid * SLOT_WORDS] = (uint64_t)(uintptr_t)row;
  syncwarp();
  const auto at = [&](unsigned matrix, unsigned i, unsigned j) {
    const uint16_t* row_i = reinterpret_cast<const uint16_t*>((uintptr_t)exchange_slots()[(first + 8 * matrix + i) * SLOT_WORDS]);
    return (uint32_t)row_i[j];
  };
  const unsigned a = lane / 4, b = 2 * (lane % 4);
  for (unsigned m = 0; m < 4; ++m)
    r[m] = transpose ? at(m, b, a) | at(m, b + 1, a) << 16 : at(m, a, b) | at(m, a, b + 1) << 16;
  syncwarp();  // every lane has read the addresses before any of them is reused
}
}  // namespace cuda_on_cpu
