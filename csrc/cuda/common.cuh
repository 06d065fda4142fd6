// Device helpers shared by the CUDA kernels: raw bits of a float type, and 16-byte vectors.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

namespace lora_kernels {

template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using type = uint32_t;
  __device__ static type get(float v) { return __float_as_uint(v); }
  __device__ static float make(type b) { return __uint_as_float(b); }
};
template <>
struct FloatBits<at::Half> {
  using type = uint16_t;
  __device__ static type get(at::Half v) { return v.x; }
  __device__ static at::Half make(type b) { return at::Half(b, at::Half::from_bits()); }
};
template <>
struct FloatBits<at::BFloat16> {
  using type = uint16_t;
  __device__ static type get(at::BFloat16 v) { return v.x; }
  __device__ static at::BFloat16 make(type b) { return at::BFloat16(b, at::BFloat16::from_bits()); }
};

// VEC consecutive elements moved as one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ inline Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ inline void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Calls f(T{}) for the three dtypes the kernels support (no float64 instantiations).
template <typename F>
void dispatch_kernel_dtype(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, what, ": dtype ", t, " is not supported by the CUDA kernels (float32/16, bfloat16)");
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace lora_kernels
