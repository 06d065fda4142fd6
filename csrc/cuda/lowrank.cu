// The LoRA-side work of the composite path in as few launches as possible (every launch costs host time,
// and at the shapes of a LoRA fine-tune the host is the bottleneck; the GEMMs stay with cuBLAS):
//   prepare_lora_inputs  dropout(x) and the adapters' casts to x's dtype in ONE launch (was three);
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../hash.h"
#include "../ops.h"
#include "common.cuh"
#include "dropout_rows.cuh"

namespace lora_kernels {
namespace {

constexpr int kThreads = 256;

template <typename T, typename TA>
__device__ void cast_range(const TA* __restrict__ src, T* __restrict__ dst, int64_t n, int64_t first, int64_t step) {
  for (int64_t i = first; i < n; i += step) dst[i] = static_cast<T>(static_cast<float>(src[i]));
}

// Blocks [0, x_blocks) drop out x row by row; the rest cast A then B (n_a + n_b elements).
template <typename T, typename TA, int VEC>
__global__ void __launch_bounds__(kThreads) prepare_kernel(const T* __restrict__ x, T* __restrict__ xd, int64_t rows,
                                                           int64_t cols, const int64_t* __restrict__ seed,
                                                           uint32_t threshold, float scale, int x_blocks,
                                                           const TA* __restrict__ a, T* __restrict__ a_out, int64_t n_a,
                                                           const TA* __restrict__ b, T* __restrict__ b_out, int64_t n_b) {
  wait_for_predecessor();
  allow_dependents();
  if (static_cast<int>(blockIdx.x) < x_blocks) {
    dropout_rows<T, VEC>(x, xd, rows, cols, *seed, threshold, scale, blockIdx.x, x_blocks,
                         static_cast<int64_t>(threadIdx.x) * VEC, static_cast<int64_t>(blockDim.x) * VEC);
    return;
  }
  const int64_t first = static_cast<int64_t>(blockIdx.x - x_blocks) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x - x_blocks) * blockDim.x;
  cast_range(a, a_out, n_a, first, step);
  cast_range(b, b_out, n_b, first, step);
}

}  // namespace

PreparedInputs prepare_lora_inputs_cuda(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                        double p, const c10::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = x.scalar_type();
  const bool drop = p > 0.0 && seed.has_value();
  const bool cast = lora_A.scalar_type() != dt;
  PreparedInputs out{drop ? at::empty_like(x) : x, cast ? at::empty(lora_A.sizes(), x.options()) : lora_A,
                     cast ? at::empty(lora_B.sizes(), x.options()) : lora_B};
  if (!drop && !cast) return out;
  TORCH_CHECK(x.is_contiguous() && lora_A.is_contiguous() && lora_B.is_contiguous(), "prepare: contiguous inputs");
  const int64_t rows = x.size(0), cols = x.size(1);
  const int x_blocks = drop ? static_cast<int>(std::min<int64_t>(std::max<int64_t>(rows, 1), 4096)) : 0;
  const int64_t n_cast = cast ? std::max(lora_A.numel(), lora_B.numel()) : 0;
  const int cast_blocks = static_cast<int>(std::min<int64_t>((n_cast + kThreads - 1) / kThreads, 1024));
  if (x_blocks + cast_blocks == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(dt, "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    auto run = [&](auto adapter_tag) {
      using adapter_t = decltype(adapter_tag);
      constexpr int V = 16 / sizeof(scalar_t);
      const bool vec = cols % V == 0 && aligned16(x.data_ptr()) && aligned16(out.x.data_ptr());
      auto launch = [&](auto kernel) {
        launch_dependent(
            kernel, dim3(x_blocks + cast_blocks), dim3(kThreads), 0, stream, x.data_ptr<scalar_t>(),
            drop ? out.x.data_ptr<scalar_t>() : nullptr, rows, cols, drop ? seed->data_ptr<int64_t>() : nullptr,
            dropout_threshold(p), static_cast<float>(dropout_scale(p)), x_blocks,
            cast ? lora_A.data_ptr<adapter_t>() : nullptr, cast ? out.A.data_ptr<scalar_t>() : nullptr,
            cast ? lora_A.numel() : 0, cast ? lora_B.data_ptr<adapter_t>() : nullptr,
            cast ? out.B.data_ptr<scalar_t>() : nullptr, cast ? lora_B.numel() : 0);
      };
      if (vec)
        launch(prepare_kernel<scalar_t, adapter_t, V>);
      else
        launch(prepare_kernel<scalar_t, adapter_t, 1>);
    };
    if (!cast || lora_A.scalar_type() == dt)
      run(scalar_t{});
    else if (lora_A.scalar_type() == at::kFloat)
      run(float{});
    else
      TORCH_CHECK(false, "lora_A: dtype ", lora_A.scalar_type(), " must be x's dtype or float32");
  });
  return out;
}

}  // namespace lora_kernels
