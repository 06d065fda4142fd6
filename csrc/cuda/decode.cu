// Forward for small batches (M <= kDecodeMaxRows): memory bound on W, so one launch streams each
// row of W once (16-byte loads, one warp per output column) and serves every row of x from it;
// the LoRA term s·(x·Aᵀ)·Bᵀ joins the same warp reduction. x·Aᵀ comes from one small kernel before it.
// Larger M goes to cuBLAS (composite).
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

// xa[m, j] = Σ_k x[m, k]·A[j, k] in float32, with A's values rounded to x's dtype as the composite path
// rounds them: one block per rank index j. Replaces a cuBLAS GEMM, its split-K reduction and two casts
// (four launches, 9 µs of the 19 µs that M = 1 took on an H100) with one launch.
template <typename T, typename TA>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    lowrank_rows_kernel(const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ xa, int M, int64_t K,
                        int R) {
  __shared__ float partial[kMaxRows][kWarpsPerBlock];
  const int j = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;
  const TA* arow = A + static_cast<int64_t>(j) * K;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < K; k += kWarpsPerBlock * 32) {
    const float a = static_cast<float>(static_cast<T>(arow[k]));
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m)
      if (m < M) acc[m] = fmaf(static_cast<float>(x[m * K + k]), a, acc[m]);
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) partial[m][warp] = v;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < M) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) v += partial[threadIdx.x][w];
    xa[threadIdx.x * R + j] = v;
  }
}

template <typename T, int VEC, typename TB>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    decode_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ xa,
                  const TB* __restrict__ lora_B, const T* __restrict__ bias, T* __restrict__ y, int M, int64_t K,
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
  // LoRA: s·Σ_j xa[m, j]·B[n, j], lanes striding over the rank; B read in its own dtype.
  for (int j = lane; j < R; j += 32) {
    const float b = scale * static_cast<float>(lora_B[n * R + j]);
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

// Adapters come in x's dtype or in float32 (the Python layer's contract); the kernels read them as they are.
template <typename T, typename F>
void dispatch_adapter_dtype(at::ScalarType t, F&& f) {
  if (t == at::kFloat)
    f(float{});
  else
    f(T{});
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       const c10::optional<at::Tensor>& bias, double scaling,
                                                       double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_linear(x, weight, lora_A, lora_B, bias);
  const auto dt = x.scalar_type();
  const auto adapter_ok = [&](const at::Tensor& t) { return t.scalar_type() == dt || t.scalar_type() == at::kFloat; };
  if (x.size(0) > kDecodeMaxRows || x.size(0) == 0 || dt == at::kDouble || dropout_p > 0.0 || !adapter_ok(lora_A) ||
      !adapter_ok(lora_B) || lora_A.scalar_type() != lora_B.scalar_type())
    return linear_forward_composite(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor Ac = lora_A.contiguous(), Bc = lora_B.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(dt).contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int R = static_cast<int>(lora_A.size(0));
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(dt, "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_adapter_dtype<scalar_t>(Ac.scalar_type(), [&](auto adapter_tag) {
      using adapter_t = decltype(adapter_tag);
      lowrank_rows_kernel<scalar_t, adapter_t><<<R, kWarpsPerBlock * 32, 0, stream>>>(
          xc.data_ptr<scalar_t>(), Ac.data_ptr<adapter_t>(), xa.data_ptr<float>(), static_cast<int>(M), K, R);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      constexpr int V = 16 / sizeof(scalar_t);
      const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
      const bool vec = K % V == 0 && aligned16(xc.data_ptr()) && aligned16(wc.data_ptr());
      auto run = [&](auto kernel) {
        kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                                         xa.data_ptr<float>(), Bc.data_ptr<adapter_t>(), bp,
                                                         y.data_ptr<scalar_t>(), static_cast<int>(M), K, N, R,
                                                         static_cast<float>(scaling));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (N == 0)
        return;
      if (vec)
        run(decode_kernel<scalar_t, V, adapter_t>);
      else
        run(decode_kernel<scalar_t, 1, adapter_t>);
    });
  });
  return {y, xa};
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("linear_forward", &lora_kernels::linear_forward_cuda); }
