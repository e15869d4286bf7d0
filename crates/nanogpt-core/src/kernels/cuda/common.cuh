// Shared by the engine's CUDA kernels. nvcc compiles them to PTX for the `cuda` build; the crate
// `cuda-on-cpu` compiles the same sources as C++ for the CPU, with its own definitions of CUDA's
// built-ins (threadIdx, __syncthreads, warp shuffles, atomics, bf16), so the kernels' tests run anywhere.
//
// Conventions of every kernel (see mod.rs):
// - X, the activation type, is float or bf16; each kernel is instantiated twice, `name_f32` and `name_bf16`.
// - Arithmetic is in float. Parameter gradients, LayerNorm statistics and losses are float, and parameter
//   gradients are always added to: the training step zeroes them once per optimizer step.
// - Kernel entry points are `extern "C" __global__ void name(...)` (or `... void __launch_bounds__(..) name(`),
//   one per line start, so the CPU build can find and register them.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <stdint.h>
#include <type_traits>
#define DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename X>
__device__ __forceinline__ X from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16(x); }

constexpr int WARP_SIZE = 32;

// Elements in one 16-byte pack (8 bf16 or 4 floats): elementwise kernels load and store a pack as one access
// where the buffers are 16-byte aligned, an eighth (bf16) of the memory instructions of one element at a time.
template <typename X>
constexpr int PACK = 16 / sizeof(X);

__device__ __forceinline__ bool aligned16(const void* p) { return (uintptr_t)p % 16 == 0; }

// P elements from memory at src into v, and back: one 16-byte access where P is a pack (src or dst then
// 16-byte aligned), else one element. The bits pass through a uint4 by memcpy, not by casting v's address:
// a compiler may assume that a uint4 store and X loads of the same array do not alias (the CPU build's
// does), and drop the stores.
template <typename X, int P>
__device__ __forceinline__ void load_pack(X (&v)[P], const X* src) {
  static_assert(P == 1 || P == PACK<X>, "a pack is one element or 16 bytes");
  if constexpr (P == 1) {
    v[0] = *src;
  } else {
    const uint4 bits = *reinterpret_cast<const uint4*>(src);
    memcpy(v, &bits, sizeof(bits));
  }
}
template <typename X, int P>
__device__ __forceinline__ void store_pack(X* dst, const X (&v)[P]) {
  static_assert(P == 1 || P == PACK<X>, "a pack is one element or 16 bytes");
  if constexpr (P == 1) {
    *dst = v[0];
  } else {
    uint4 bits;
    memcpy(&bits, v, sizeof(bits));
    *reinterpret_cast<uint4*>(dst) = bits;
  }
}

// 2^x as the hardware approximates it (one MUFU.EX2 instruction; 2^-inf = 0), exp2f on the emulator. Softmax
// kernels take e^(s - m) as 2^(s log2 e - m log2 e), folding log2 e into a scale they apply anyway, where
// __expf would multiply by log2 e itself.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDACC__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// f(std::bool_constant<a>, std::bool_constant<b>) for run-time a and b: a body written as a generic lambda
// over two cases is compiled once for each of the four, with the branches on them resolved at compile
// time, and the run-time tests are made once, here, rather than per element.
template <typename F>
__device__ __forceinline__ void with_cases(bool a, bool b, const F& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The sum over a 1-D block (blockDim.x a multiple of 32), returned to every thread. `scratch` is 32
// floats of shared memory; the first barrier lets a previous call's readers finish before it is reused.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

// Dropout decisions, bit for bit those of kernels/dropout.rs's `Mask::scale`: element i of a site is
// dropped when the top 24 bits of a hash of (stream, i) fall below `threshold`. The host derives `stream`,
// `threshold` and `keep_scale` from (seed, micro-step, site, p) and passes them as three kernel arguments
// (`Arg::dropout`); threshold 0 keeps everything.
__device__ __forceinline__ uint64_t dropout_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ float dropout_scale(uint64_t stream, uint32_t threshold, float keep_scale, uint64_t i) {
  const uint32_t u = (uint32_t)(dropout_mix(stream ^ (i * 0x9E3779B97F4A7C15ull)) >> 40);
  return u < threshold ? 0.0f : keep_scale;
}

// d += a b on tensor cores for one 16 x 8 x 16 tile (PTX's mma.sync m16n8k16: A 16 x 16 row-major, B 16 x 8
// column-major, bf16 operands, float accumulators). The fragments' layout is documented (unlike wmma's),
// so a kernel can work on rows of a product (a softmax) in registers. With g = lane / 4 and
// t = lane % 4, each operand register holds two bf16, the lower half at the lower column (A) or k (B):
//   a[0] A(g, 2t..2t+1)   a[1] A(g+8, 2t..2t+1)   a[2] A(g, 2t+8..2t+9)   a[3] A(g+8, 2t+8..2t+9)
//   b[0] B(2t..2t+1, g)   b[1] B(2t+8..2t+9, g)
//   d[0], d[1] D(g, 2t), D(g, 2t+1)   d[2], d[3] D(g+8, 2t), D(g+8, 2t+1)
// Two adjacent D tiles (columns 0..7 and 8..15) are thus, packed to bf16 in that order, an A operand.
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDACC__
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  cuda_on_cpu::mma_m16n8k16_bf16(d, a, b);
#endif
}

// Two bf16 as one operand register, `lower` in the lower half.
__device__ __forceinline__ uint32_t pack_bf16(bf16 lower, bf16 upper) {
  uint16_t lo, hi;
  memcpy(&lo, &lower, 2);
  memcpy(&hi, &upper, 2);
  return (uint32_t)lo | ((uint32_t)hi << 16);
}
__device__ __forceinline__ uint32_t pack_bf16(float lower, float upper) {
#ifdef __CUDACC__
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lower, upper);  // one conversion instruction for both
  return *reinterpret_cast<const uint32_t*>(&pair);
#else
  return pack_bf16(from_float<bf16>(lower), from_float<bf16>(upper));
#endif
}

// Four 8 x 8 bf16 matrices from shared memory into operand registers, one instruction for the warp (PTX's
// ldmatrix .x4): lane i gives the address of row i % 8 of matrix i / 8 (16-byte aligned), and register m
// of lane l receives matrix m's elements (l / 4, 2 (l % 4)..+1), or transposed, (2 (l % 4)..+1, l / 4).
// That is mma_16x8x16's layout: matrices (rows 0-7, 8-15) x (columns 0-7, 8-15) in column order are an A
// operand; two matrices of a row-major K x N tile, transposed, are a B operand.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* row) {
#ifdef __CUDACC__
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"((uint32_t)__cvta_generic_to_shared(row)));
#else
  cuda_on_cpu::ldmatrix_x4(r, row, false);
#endif
}
__device__ __forceinline__ void ldmatrix_x4_transposed(uint32_t (&r)[4], const bf16* row) {
#ifdef __CUDACC__
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"((uint32_t)__cvta_generic_to_shared(row)));
#else
  cuda_on_cpu::ldmatrix_x4(r, row, true);
#endif
}
