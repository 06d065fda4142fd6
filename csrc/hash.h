// The dropout mask as a pure function of (seed, row, col): the same lowbias32 hash as
// lora_kernels/reference.py and lora_kernels/triton/dropout.py, so every backend drops the same elements.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__
#else
#define LK_HOST_DEVICE
#endif

namespace lora_kernels {

// hash32 after its first step (x ^= x >> 16): kernels that hash 8 aligned columns of a row share that step
// (for col a multiple of 8 and i < 8, y ^ (y >> 16) with y = h ^ (col + i) is (h' ^ (h' >> 16)) ^ i, h' = h ^ col).
LK_HOST_DEVICE inline uint32_t hash32_tail(uint32_t x) {
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

LK_HOST_DEVICE inline uint32_t hash32(uint32_t x) { return hash32_tail(x ^ (x >> 16)); }

// The row's half of the hash; a kernel computes it once per row, not per element.
LK_HOST_DEVICE inline uint32_t dropout_row_hash(int64_t seed, int64_t row) {
  return hash32(static_cast<uint32_t>(row) ^ static_cast<uint32_t>(seed & 0x7FFFFFFF));
}

// Kept when the top 24 bits of the hash reach the threshold round(p·2^24).
LK_HOST_DEVICE inline bool dropout_keep_row(uint32_t row_hash, int64_t col, uint32_t threshold) {
  return (hash32(row_hash ^ static_cast<uint32_t>(col)) >> 8) >= threshold;
}

LK_HOST_DEVICE inline bool dropout_keep(int64_t seed, int64_t row, int64_t col, uint32_t threshold) {
  return dropout_keep_row(dropout_row_hash(seed, row), col, threshold);
}

inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0 + 0.5); }

inline double dropout_scale(double p) {
  return 16777216.0 / (16777216.0 - static_cast<double>(dropout_threshold(p)));
}

}  // namespace lora_kernels
