// Forward for small batches (M <= kDecodeMaxRows): memory bound on W, so one launch streams each
// row of W once (16-byte loads, one warp per output column) and serves every row of x from it;
// the LoRA term s·(x·Aᵀ)·Bᵀ joins the same warp reduction. Larger M goes to cuBLAS (composite).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ops.h"
#include "common.cuh"

namespace lora_kernels {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxRows = static_cast<int>(kDecodeMaxRows);

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    decode_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ xa,
                  const float* __restrict__ lora_B, const T* __restrict__ bias, T* __restrict__ y, int M, int64_t K,
                  int64_t N, int R, float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;

  const T* wrow = w + n * K;
#pragma unroll 4
  for (int64_t k = static_cast<int64_t>(lane) * VEC; k < K; k += 32 * VEC) {
    const Vec<T, VEC> wv = load_vec<T, VEC>(wrow + k);
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m < M) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + m * K + k);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[m] = fmaf(static_cast<float>(wv.v[v]), static_cast<float>(xv.v[v]), acc[m]);
      }
    }
  }
  // LoRA: s·Σ_j xa[m, j]·B[n, j], lanes striding over the rank.
  for (int j = lane; j < R; j += 32) {
    const float b = scale * lora_B[n * R + j];
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m)
      if (m < M) acc[m] = fmaf(b, xa[m * R + j], acc[m]);
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < M) y[m * N + n] = static_cast<T>(bias != nullptr ? v + static_cast<float>(bias[n]) : v);
  }
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       const c10::optional<at::Tensor>& bias, double scaling,
                                                       double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_linear(x, weight, lora_A, lora_B, bias);
  if (x.size(0) > kDecodeMaxRows || x.size(0) == 0 || x.scalar_type() == at::kDouble || dropout_p > 0.0)
    return linear_forward_composite(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor xa = at::mm(xc, lora_A.to(x.scalar_type()).t()).to(at::kFloat);
  const at::Tensor Bf = lora_B.to(at::kFloat).contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(x.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    const bool vec = K % V == 0 && aligned16(xc.data_ptr()) && aligned16(wc.data_ptr());
    auto run = [&](auto kernel) {
      kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), xa.data_ptr<float>(), Bf.data_ptr<float>(), bp,
          y.data_ptr<scalar_t>(), static_cast<int>(M), K, N, static_cast<int>(lora_A.size(0)),
          static_cast<float>(scaling));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      run(decode_kernel<scalar_t, V>);
    else
      run(decode_kernel<scalar_t, 1>);
  });
  return {y, xa};
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("linear_forward", &lora_kernels::linear_forward_cuda); }
