// Device helpers shared by the CUDA kernels: raw bits of a float type, and 16-byte vectors.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cstdint>
#include <cstdlib>
#include <utility>

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

// Programmatic dependent launch (compute capability 9.0 and up). A kernel launched through
// launch_dependent may be scheduled while its predecessor in the stream is still draining: it must call
// wait_for_predecessor() before it reads or writes global memory, and it calls allow_dependents() so that
// its own successor can be scheduled the same way. The launch latency and block scheduling between two
// short kernels then overlap the first one's tail. On older GPUs (or with LORA_KERNELS_PDL=0) the launch is
// an ordinary stream-ordered one and both calls do nothing.
__device__ inline void wait_for_predecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ inline void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool dependent_launch_enabled() {
  static const bool off = [] {
    const char* v = std::getenv("LORA_KERNELS_PDL");
    return v != nullptr && v[0] == '0';
  }();
  return !off && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent_launch_enabled() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(std::forward<Args>(args))...));
}

}  // namespace lora_kernels
