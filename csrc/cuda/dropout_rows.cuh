// The dropout pass over rows of a 2-D tensor, shared by the dropout kernel and the fused input preparation.
#pragma once
#include "../hash.h"
#include "common.cuh"

namespace lora_kernels {

// Rows row0, row0 + row_step, ...; in each, columns col0, col0 + col_step, ... in groups of VEC (16-byte
// accesses when VEC > 1). The row's hash is computed once per row; no 64-bit division per element.
template <typename T, int VEC>
__device__ inline void dropout_rows(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t cols,
                                    int64_t seed, uint32_t threshold, float scale, int64_t row0, int64_t row_step,
                                    int64_t col0, int64_t col_step) {
  for (int64_t r = row0; r < rows; r += row_step) {
    const uint32_t row_hash = dropout_row_hash(seed, r);
    const T* xr = x + r * cols;
    T* outr = out + r * cols;
    for (int64_t c = col0; c < cols; c += col_step) {
      Vec<T, VEC> v = load_vec<T, VEC>(xr + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        v.v[i] = dropout_keep_row(row_hash, c + i, threshold) ? static_cast<T>(static_cast<float>(v.v[i]) * scale)
                                                              : static_cast<T>(0.f);
      store_vec<T, VEC>(outr + c, v);
    }
  }
}

}  // namespace lora_kernels
