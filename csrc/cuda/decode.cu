// Forward for small batches (M <= kDecodeMaxRows): memory bound on W, so one launch streams W once and
// serves every row of x from it, 16-bit (up to 16 rows; 9-16 outside CUDA-graph captures) or NF4 W (up to 8)
// on tensor cores (mma_decode_kernel), float32 by FMAs (decode_kernel, 2 rows); the LoRA term s·(x·Aᵀ)·Bᵀ
// joins the epilogue. x·Aᵀ comes from one small kernel launched before it. Larger M goes to cuBLAS (composite).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../checks.h"
#include "../ops.h"
#include "common.cuh"
#include "mma_decode.cuh"

namespace lora_kernels {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMmaRows = 8;    // x's rows as the 8 columns of each tensor-core product; beyond, X16 (16 rows)
constexpr int kX16Rows = static_cast<int>(kDecodeMaxRows);
constexpr int64_t kSliceK = 512;  // X16's x·Aᵀ: R·K/512 blocks (128 at r = 16, K = 4096) where R took 20.8 µs
constexpr int kFmaDecodeMaxRows = 2;  // decode_kernel's rows: past 2 it re-read x more than cuBLAS reads W
constexpr int kNF4Rows = static_cast<int>(kNF4DecodeMaxRows);

// xa[m, j] = Σ_k x[m, k]·A[j, k] in float32, with A's values rounded to x's dtype as the composite path
// rounds them: one block per rank index j (and per slice of K, blockIdx.y, whose partial sum goes to
// xa + slice·M·R). Replaces a cuBLAS GEMM, its split-K reduction and two casts (four launches, 9 µs of the
// 19 µs that M = 1 took on an H100) with one launch; 16 rows in one slice took 20.8 µs on an H200.
template <typename T, typename TA, int ROWS>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    lowrank_rows_kernel(const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ xa, int M, int64_t K,
                        int R, int64_t slice_k) {
  __shared__ float partial[ROWS][kWarpsPerBlock];
  allow_dependents();  // the decode kernel streams W meanwhile and waits for xa only at its end
  const int j = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float acc[ROWS];
#pragma unroll
  for (int m = 0; m < ROWS; ++m) acc[m] = 0.f;
  const TA* arow = A + static_cast<int64_t>(j) * K;
  const int64_t k_end = std::min(K, (blockIdx.y + 1) * slice_k);
#pragma unroll 4
  for (int64_t k = blockIdx.y * slice_k + threadIdx.x; k < k_end; k += kWarpsPerBlock * 32) {
    const float a = static_cast<float>(static_cast<T>(arow[k]));
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
      if (m < M) acc[m] = fmaf(static_cast<float>(x[m * K + k]), a, acc[m]);
  }
#pragma unroll
  for (int m = 0; m < ROWS; ++m) {
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
    xa[(static_cast<int64_t>(blockIdx.y) * M + threadIdx.x) * R + j] = v;
  }
}

// The end of a decode warp's column n: the LoRA term s·Σ_j xa[m, j]·B[n, j] (lanes striding over the rank, B
// in its own dtype), the warp's sum, the bias, one store per row.
template <typename T, typename TB, int ROWS>
__device__ inline void finish_column(float (&acc)[ROWS], const float* __restrict__ xa, const TB* __restrict__ lora_B,
                                     const T* __restrict__ bias, T* __restrict__ y, int M, int64_t N, int R,
                                     int64_t n, int lane, float scale) {
  for (int j = lane; j < R; j += 32) {
    const float b = scale * static_cast<float>(lora_B[n * R + j]);
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
      if (m < M) acc[m] = fmaf(b, xa[m * R + j], acc[m]);
  }
#pragma unroll
  for (int m = 0; m < ROWS; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < M) y[m * N + n] = static_cast<T>(bias != nullptr ? v + static_cast<float>(bias[n]) : v);
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
  float acc[kFmaDecodeMaxRows];
#pragma unroll
  for (int m = 0; m < kFmaDecodeMaxRows; ++m) acc[m] = 0.f;

  const T* wrow = w + n * K;
#pragma unroll 4
  for (int64_t k = static_cast<int64_t>(lane) * VEC; k < K; k += 32 * VEC) {
    const Vec<T, VEC> wv = load_vec<T, VEC>(wrow + k);
#pragma unroll
    for (int m = 0; m < kFmaDecodeMaxRows; ++m) {
      if (m < M) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + m * K + k);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[m] = fmaf(static_cast<float>(wv.v[v]), static_cast<float>(xv.v[v]), acc[m]);
      }
    }
  }
  finish_column<T, TB, kFmaDecodeMaxRows>(acc, xa, lora_B, bias, y, M, N, R, n, lane, scale);
}

// Adapters come in x's dtype or in float32 (the Python layer's contract); the kernels read them as they are.
template <typename T, typename F>
void dispatch_adapter_dtype(at::ScalarType t, F&& f) {
  if (t == at::kFloat)
    f(float{});
  else
    f(T{});
}

// x's dtype and the adapters' dispatched, x·Aᵀ (float32, at most ROWS rows; in slices of slice_k columns of
// K when xa has room for more than one, see kSliceK) launched, then launch(scalar tag, adapter tag) launches
// the caller's kernel, which reads xa.
template <int ROWS, typename F>
void after_lowrank_rows(const at::Tensor& xc, const at::Tensor& Ac, at::Tensor& xa, F&& launch,
                        int64_t slice_k = 0) {
  const int64_t M = xc.size(0), K = xc.size(1);
  const int R = static_cast<int>(Ac.size(0));
  if (slice_k <= 0) slice_k = std::max<int64_t>(K, 1);
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>((K + slice_k - 1) / slice_k));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(xc.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_adapter_dtype<scalar_t>(Ac.scalar_type(), [&](auto adapter_tag) {
      using adapter_t = decltype(adapter_tag);
      lowrank_rows_kernel<scalar_t, adapter_t, ROWS><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          xc.data_ptr<scalar_t>(), Ac.data_ptr<adapter_t>(), xa.data_ptr<float>(), static_cast<int>(M), K, R,
          slice_k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch(tag, adapter_tag);
    });
  });
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
  // 16-bit x and W in 16-byte chunks: the tensor-core kernel (up to 8 rows); else the FMA kernel (2 rows)
  const bool mma = (dt == at::kBFloat16 || dt == at::kHalf) && x.size(1) % 8 == 0 && aligned16(xc.data_ptr()) &&
                   aligned16(wc.data_ptr());
  if (!mma && x.size(0) > kFmaDecodeMaxRows)
    return linear_forward_composite(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed);
  // 9 to 16 rows: the 16-row form (ranks up to kSlicedMaxRank) in eager mode, where its two launches cost
  // ~1.1× the one-row decode's wall per call and the composite's three GEMMs ~1.6× (bench/profile_cases.py, H200
  // hosts: 37 µs where the composite would take ~54). Inside a CUDA-graph capture the host
  // cost is gone and the composite's GPU time is as low or lower (16×4096×14336: 1.34× cuBLAS against the
  // 16-row form's 1.94, x re-read from L2 once per 16 columns), so captures keep the composite.
  const bool x16 = x.size(0) > kMmaRows;
  if (x16 && (lora_A.size(0) > kSlicedMaxRank || weight.size(0) == 0 ||
              c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None))
    return linear_forward_composite(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed);
  const at::Tensor Ac = lora_A.contiguous(), Bc = lora_B.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(dt).contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int R = static_cast<int>(lora_A.size(0));
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (x16) {
    const int64_t slices = (K + kSliceK - 1) / kSliceK;
    at::Tensor xa_parts = at::empty({slices, M, R}, x.options().dtype(at::kFloat));
    after_lowrank_rows<kX16Rows>(xc, Ac, xa_parts, [&](auto tag, auto adapter_tag) {
      using scalar_t = decltype(tag);
      using adapter_t = decltype(adapter_tag);
      if constexpr (sizeof(scalar_t) == 2) {  // mma: 16-bit x (checked above)
        launch_mma_decode<scalar_t, adapter_t, WFormat::kDense, true>(
            xc.data_ptr<scalar_t>(), wc.data_ptr(), nullptr, nullptr, nullptr, nullptr, 0.f,
            xa_parts.data_ptr<float>(), Bc.data_ptr<adapter_t>(), bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
            y.data_ptr<scalar_t>(), M, K, N, R, static_cast<float>(scaling), stream, static_cast<int>(slices),
            xa.data_ptr<float>());
      }
    }, kSliceK);
    return {y, xa};
  }
  after_lowrank_rows<kMmaRows>(xc, Ac, xa, [&](auto tag, auto adapter_tag) {
    using scalar_t = decltype(tag);
    using adapter_t = decltype(adapter_tag);
    const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    if (N == 0) return;
    if constexpr (sizeof(scalar_t) == 2) {
      if (mma) {
        launch_mma_decode<scalar_t, adapter_t, WFormat::kDense>(
            xc.data_ptr<scalar_t>(), wc.data_ptr(), nullptr, nullptr, nullptr, nullptr, 0.f, xa.data_ptr<float>(),
            Bc.data_ptr<adapter_t>(), bp, y.data_ptr<scalar_t>(), M, K, N, R, static_cast<float>(scaling), stream);
        return;
      }
    }
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = K % V == 0 && aligned16(xc.data_ptr()) && aligned16(wc.data_ptr());
    auto run = [&](auto kernel) {
      kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                                       xa.data_ptr<float>(), Bc.data_ptr<adapter_t>(), bp,
                                                       y.data_ptr<scalar_t>(), static_cast<int>(M), K, N, R,
                                                       static_cast<float>(scaling));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      run(decode_kernel<scalar_t, V, adapter_t>);
    else
      run(decode_kernel<scalar_t, 1, adapter_t>);
  });
  return {y, xa};
}


// y = x·dequant(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias for M <= kNF4DecodeMaxRows, and xa = x·Aᵀ (float32). packed: uint8,
// N·K/2 bytes; absmax: float32, one per 64 elements, or uint8 codes with code2, absmax2 and offset (double
// quantisation, decoded in the kernel: no launch of its own); code: the 16 NF4 values (float32).
std::tuple<at::Tensor, at::Tensor> nf4_decode_cuda(const at::Tensor& x, const at::Tensor& packed,
                                                   const at::Tensor& absmax, const at::Tensor& code, int64_t N,
                                                   const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                   const c10::optional<at::Tensor>& bias, double scaling,
                                                   const c10::optional<at::Tensor>& code2,
                                                   const c10::optional<at::Tensor>& absmax2, double offset) {
  check_float(x, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "x: the 4-bit decode kernel takes bfloat16 or float16 "
              "(its tensor cores' inputs), got ", dt);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kNF4DecodeMaxRows, "x: expected 1 to ",
              kNF4DecodeMaxRows, " rows, got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 64 == 0 && K > 0, "x: in_features must be a positive multiple of 64, got ", K);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == N * K / 2 && packed.is_contiguous() &&
                  aligned16(packed.data_ptr()),
              "packed: expected ", N * K / 2, " contiguous, 16-byte aligned uint8 values");
  const bool dq = absmax.scalar_type() == at::kByte;  // double-quantised: uint8 codes of the absmaxes
  const int64_t blocks = N * K / 64;
  TORCH_CHECK((absmax.scalar_type() == at::kFloat || dq) && absmax.numel() == blocks && absmax.is_contiguous(),
              "absmax: expected ", blocks, " contiguous float32 values, or uint8 codes (double quantisation)");
  if (dq) {
    TORCH_CHECK(code2.has_value() && code2->scalar_type() == at::kFloat && code2->numel() == 256 &&
                    code2->is_contiguous(),
                "code2: double-quantised absmaxes need the 256 float32 values of their code");
    TORCH_CHECK(absmax2.has_value() && absmax2->scalar_type() == at::kFloat &&
                    absmax2->numel() == (blocks + 255) / 256 && absmax2->is_contiguous(),
                "absmax2: expected ", (blocks + 255) / 256, " contiguous float32 values (one per 256 blocks)");
    check_same_device(*code2, x, "code2");
    check_same_device(*absmax2, x, "absmax2");
  }
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "code: expected the 16 float32 NF4 values");
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_B.dim() == 2 && lora_B.size(0) == N &&
                  lora_B.size(1) == lora_A.size(0),
              "lora_A / lora_B: expected (r, ", K, ") and (", N, ", r), got ", lora_A.sizes(), " and ", lora_B.sizes());
  TORCH_CHECK(lora_A.scalar_type() == lora_B.scalar_type() &&
                  (lora_A.scalar_type() == dt || lora_A.scalar_type() == at::kFloat),
              "lora_A / lora_B: expected one dtype, x's or float32");
  for (const at::Tensor* t : {&packed, &absmax, &code, &lora_A, &lora_B}) check_same_device(*t, x, "4-bit operand");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape (", N, "), got ", bias->sizes());
    check_same_device(*bias, x, "bias");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), Ac = lora_A.contiguous(), Bc = lora_B.contiguous(), cc = code.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(dt).contiguous() : at::Tensor();
  TORCH_CHECK(aligned16(xc.data_ptr()), "x: expected a 16-byte aligned start");
  const int R = static_cast<int>(lora_A.size(0));
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  if (N == 0) return {y, xa};
  auto stream = at::cuda::getCurrentCUDAStream();
  after_lowrank_rows<kNF4Rows>(xc, Ac, xa, [&](auto tag, auto adapter_tag) {
    using scalar_t = decltype(tag);
    using adapter_t = decltype(adapter_tag);
    if constexpr (sizeof(scalar_t) == 2) {  // bf16 / fp16: the tensor cores' input types
      auto run = [&](auto format) {
        launch_mma_decode<scalar_t, adapter_t, decltype(format)::value>(
            xc.data_ptr<scalar_t>(), packed.data_ptr(), absmax.data_ptr(), cc.data_ptr<float>(),
            dq ? code2->data_ptr<float>() : nullptr, dq ? absmax2->data_ptr<float>() : nullptr,
            static_cast<float>(offset), xa.data_ptr<float>(), Bc.data_ptr<adapter_t>(),
            bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), M, K, N, R,
            static_cast<float>(scaling), stream);
      };
      if (dq)
        run(std::integral_constant<WFormat, WFormat::kNF4DQ>{});
      else
        run(std::integral_constant<WFormat, WFormat::kNF4>{});
    }
  });
  return {y, xa};
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("linear_forward", &lora_kernels::linear_forward_cuda);
  m.impl("nf4_decode", &lora_kernels::nf4_decode_cuda);
}
