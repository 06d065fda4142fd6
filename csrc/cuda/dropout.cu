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

// Rows step over blockIdx.y, VEC consecutive columns per thread (see dropout_rows.cuh). With y, the same
// mask also goes on y in place (each element read, then written, by one thread).
template <typename T, int VEC>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ out, T* y, const int64_t* __restrict__ seed,
                               int64_t rows, int64_t cols, uint32_t threshold, float scale) {
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  dropout_rows<T, VEC>(x, out, rows, cols, *seed, threshold, scale, blockIdx.y, gridDim.y, col0, col_step);
  if (y != nullptr)
    dropout_rows<T, VEC>(y, y, rows, cols, *seed, threshold, scale, blockIdx.y, gridDim.y, col0, col_step);
}

// out = dropout(x), and with y defined the same mask on y in place: x, out, y contiguous, of one shape.
void dropout_launch(const at::Tensor& x, at::Tensor& out, at::Tensor* y, const at::Tensor& seed, double p) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor, got ", x.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p: expected a value in [0, 1), got ", p);
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed: expected one int64 on the GPU");
  for (const at::Tensor* t : {&out, y})
    TORCH_CHECK(t == nullptr || (t->is_contiguous() && t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type()),
                "dropout: outputs contiguous, of x's shape and dtype");
  TORCH_CHECK(x.is_contiguous(), "dropout: x must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return;
  const int threads = 256;
  const int64_t rows = x.size(0), cols = x.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(x.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = cols % V == 0 && aligned16(x.data_ptr()) && aligned16(out.data_ptr()) &&
                     (y == nullptr || aligned16(y->data_ptr()));
    auto launch = [&](auto kernel, int per_thread) {
      const int64_t col_blocks = (cols + threads * per_thread - 1) / (threads * per_thread);
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(col_blocks, 1024)),
                      static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
      kernel<<<grid, threads, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                           y != nullptr ? y->data_ptr<scalar_t>() : nullptr, seed.data_ptr<int64_t>(),
                                           rows, cols, dropout_threshold(p), static_cast<float>(dropout_scale(p)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      launch(dropout_kernel<scalar_t, V>, V);
    else
      launch(dropout_kernel<scalar_t, 1>, 1);
  });
}

at::Tensor dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  dropout_launch(xc, out, nullptr, seed, p);
  return out;
}

}  // namespace

void dropout_pair_into(const at::Tensor& x, at::Tensor& out, at::Tensor& y, const at::Tensor& seed, double p) {
  dropout_launch(x, out, &y, seed, p);
}

}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("dropout", &lora_kernels::dropout_cuda); }
