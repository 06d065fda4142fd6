// dropout(x) on CUDA with the shared (seed, row, col) mask; the seed is read on the device (no sync).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../hash.h"
#include "common.cuh"

namespace lora_kernels {
namespace {

template <typename T>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ out, const int64_t* __restrict__ seed,
                               int64_t rows, int64_t cols, uint32_t threshold, float scale) {
  const int64_t s = *seed;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = dropout_keep(s, r, c, threshold) ? static_cast<T>(static_cast<float>(x[i]) * scale) : static_cast<T>(0.f);
  }
}

at::Tensor dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor, got ", x.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p: expected a value in [0, 1), got ", p);
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed: expected one int64 on the GPU");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((xc.numel() + threads - 1) / threads, 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(x.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    dropout_kernel<scalar_t><<<blocks, threads, 0, stream>>>(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                             seed.data_ptr<int64_t>(), xc.size(0), xc.size(1),
                                                             dropout_threshold(p), static_cast<float>(dropout_scale(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("dropout", &lora_kernels::dropout_cuda); }
