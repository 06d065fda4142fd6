// Tensor-core building blocks shared by the kernels: mma.sync m16n8k16 with float32 accumulation, packing
// of rounded pairs, and the warp's 8×8 transpose of 16-bit fragments.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <type_traits>

namespace lora_kernels {
namespace {

// Two floats rounded to T (bf16 / fp16) and packed, the first in the low half.
template <typename T>
__device__ inline uint32_t pack_rounded(float lo, float hi) {
  uint32_t w;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}

// c += a·b on tensor cores, float32 accumulation: a 16×16 (row), b 16×8 (col), T = bf16 or fp16.
template <typename T>
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, at::BFloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Word j of a 16-byte vector.
__device__ inline uint32_t word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// The 8×8 16-bit matrix held one row pair per lane (lane l: row l/4, columns 2(l%4), +1), transposed.
__device__ inline uint32_t transpose_8x8(uint32_t v) {
  uint32_t out;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(out) : "r"(v));
  return out;
}

}  // namespace
}  // namespace lora_kernels
