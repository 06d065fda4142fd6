// dropout(x) on CUDA with the shared (seed, row, col) mask; the seed is read on the device (no sync).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../hash.h"
#include "common.cuh"
#include "dropout_rows.cuh"

namespace lora_kernels {
namespace {

// Rows step over blockIdx.y, VEC consecutive columns per thread (see dropout_rows.cuh).
// x and out may be the same tensor (in place): each element is read, then written, by one thread.
template <typename T, int VEC>
__global__ void dropout_kernel(const T* x, T* out, const int64_t* __restrict__ seed,
                               int64_t rows, int64_t cols, uint32_t threshold, float scale) {
  dropout_rows<T, VEC>(x, out, rows, cols, *seed, threshold, scale, blockIdx.y, gridDim.y,
                       (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC,
                       static_cast<int64_t>(gridDim.x) * blockDim.x * VEC);
}

}  // namespace

// out = dropout(x); out may be x itself, for a pass in place. Both contiguous.
void dropout_into(const at::Tensor& x, at::Tensor& out, const at::Tensor& seed, double p) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor, got ", x.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p: expected a value in [0, 1), got ", p);
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed: expected one int64 on the GPU");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes() &&
                  out.scalar_type() == x.scalar_type(), "dropout: contiguous x and out of one shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor& xc = x;
  if (xc.numel() == 0) return;
  const int threads = 256;
  const int64_t rows = xc.size(0), cols = xc.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(x.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = cols % V == 0 && aligned16(xc.data_ptr()) && aligned16(out.data_ptr());
    auto launch = [&](auto kernel, int per_thread) {
      const int64_t col_blocks = (cols + threads * per_thread - 1) / (threads * per_thread);
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(col_blocks, 1024)),
                      static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
      kernel<<<grid, threads, 0, stream>>>(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), seed.data_ptr<int64_t>(),
                                           rows, cols, dropout_threshold(p), static_cast<float>(dropout_scale(p)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      launch(dropout_kernel<scalar_t, V>, V);
    else
      launch(dropout_kernel<scalar_t, 1>, 1);
  });
}

namespace {

at::Tensor dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  dropout_into(xc, out, seed, p);
  return out;
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("dropout", &lora_kernels::dropout_cuda); }
