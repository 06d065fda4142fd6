// The LoRA-side work of the composite path in as few launches as possible (every launch costs host time,
// and at the shapes of a LoRA fine-tune the host is the bottleneck; the GEMMs stay with cuBLAS):
//   prepare_lora_inputs  dropout(x) and the adapters' casts to x's dtype in ONE launch (was three);
//   lowrank_up           s·mask⊙(G·A)/(1-p) for dx in one pass that writes the M×K result once
//                        (was a GEMM writing G·A, then a dropout pass reading and writing it again).
//                        16-bit types take the tensor cores: with scalar FMAs the R products per element
//                        cost as much issue time as the write, and the pass ran at 1/4 of the bandwidth.
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <type_traits>
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

// out[m, k] = s·keep(m, k)·Σ_j G[m, j]·A[j, k] (keep folds 1/(1-p)), fp32 accumulation, one rounding.
// Each thread: ROWS rows × VEC consecutive columns, so each 16-byte load of A serves ROWS rows.
template <typename T, int VEC, int ROWS>
__global__ void __launch_bounds__(kThreads) lowrank_up_kernel(const T* __restrict__ g, const T* __restrict__ A,
                                                              T* __restrict__ out, int64_t M, int64_t K, int R,
                                                              const int64_t* __restrict__ seed, uint32_t threshold,
                                                              float keep_scale, float s) {
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (k0 >= K) return;
  const int64_t sd = seed != nullptr ? *seed : 0;
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * ROWS; m0 < M; m0 += static_cast<int64_t>(gridDim.y) * ROWS) {
    float acc[ROWS][VEC];
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[i][v] = 0.f;
    for (int j = 0; j < R; ++j) {
      const Vec<T, VEC> a = load_vec<T, VEC>(A + static_cast<int64_t>(j) * K + k0);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        const float gv = m0 + i < M ? static_cast<float>(g[(m0 + i) * R + j]) : 0.f;
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[i][v] = fmaf(gv, static_cast<float>(a.v[v]), acc[i][v]);
      }
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      if (m0 + i >= M) break;
      Vec<T, VEC> o;
      const uint32_t row_hash = dropout_row_hash(sd, m0 + i);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const bool keep = seed == nullptr || dropout_keep_row(row_hash, k0 + v, threshold);
        o.v[v] = static_cast<T>(keep ? acc[i][v] * s * keep_scale : 0.f);
      }
      store_vec<T, VEC>(out + (m0 + i) * K + k0, o);
    }
  }
}

// The same pass on the tensor cores (16-bit T, sm_80 and later): a block computes a kTileM × kTileN tile of
// G·A, R in steps of 16 through shared memory (zero-padded past R, M and K), stages the float32 tile in shared
// memory, then applies scale and mask and writes it in 16-byte rows (VEC = 8) or element by element (VEC = 1).
constexpr int kTileM = 64, kTileN = 128, kStepR = 16;

template <typename T> struct MmaType { using type = T; };
template <> struct MmaType<at::BFloat16> { using type = __nv_bfloat16; };
template <> struct MmaType<at::Half> { using type = __half; };

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) lowrank_up_mma_kernel(const T* __restrict__ g, const T* __restrict__ A,
                                                                  T* __restrict__ out, int64_t M, int64_t K, int R,
                                                                  const int64_t* __restrict__ seed, uint32_t threshold,
                                                                  float keep_scale, float s) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using MT = typename MmaType<T>::type;
  constexpr int kPadT = 8, kPadF = 4;  // row padding against shared-memory bank conflicts
  __shared__ __align__(32) T sg[kTileM][kStepR + kPadT];
  __shared__ __align__(32) T sa[kStepR][kTileN + kPadT];
  __shared__ __align__(32) float sout[kTileM][kTileN + kPadF];
  const int warp = threadIdx.x / 32;
  const int wm = warp % 4, wn = warp / 4;  // 4 × 2 warps, each 16 rows × 64 columns (4 fragments)
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t sd = seed != nullptr ? *seed : 0;
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM; m0 < M; m0 += static_cast<int64_t>(gridDim.y) * kTileM) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
    for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int j0 = 0; j0 < R; j0 += kStepR) {
      for (int i = threadIdx.x; i < kTileM * kStepR; i += kThreads) {
        const int r = i / kStepR, j = i % kStepR;
        sg[r][j] = m0 + r < M && j0 + j < R ? g[(m0 + r) * R + j0 + j] : static_cast<T>(0.f);
      }
      for (int i = threadIdx.x * VEC; i < kStepR * kTileN; i += kThreads * VEC) {
        const int j = i / kTileN, c = i % kTileN;
        if (VEC > 1 && j0 + j < R && n0 + c + VEC <= K) {
          store_vec<T, VEC>(&sa[j][c], load_vec<T, VEC>(A + static_cast<int64_t>(j0 + j) * K + n0 + c));
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            sa[j][c + v] = j0 + j < R && n0 + c + v < K ? A[static_cast<int64_t>(j0 + j) * K + n0 + c + v]
                                                        : static_cast<T>(0.f);
        }
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, reinterpret_cast<const MT*>(&sg[wm * 16][0]), kStepR + kPadT);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, reinterpret_cast<const MT*>(&sa[0][wn * 64 + f * 16]), kTileN + kPadT);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
      __syncthreads();  // the next step's loads overwrite sg / sa
    }
#pragma unroll
    for (int f = 0; f < 4; ++f)
      wmma::store_matrix_sync(&sout[wm * 16][wn * 64 + f * 16], acc[f], kTileN + kPadF, wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x * VEC; i < kTileM * kTileN; i += kThreads * VEC) {
      const int r = i / kTileN, c = i % kTileN;
      const int64_t m = m0 + r, k = n0 + c;
      if (m >= M || k >= K) continue;
      const uint32_t row_hash = dropout_row_hash(sd, m);
      float val[VEC];
      if constexpr (VEC % 4 == 0) {  // 16-byte reads: 2-way bank conflicts instead of 8-way
#pragma unroll
        for (int v = 0; v < VEC; v += 4)
          *reinterpret_cast<float4*>(&val[v]) = *reinterpret_cast<const float4*>(&sout[r][c + v]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) val[v] = sout[r][c + v];
      }
      Vec<T, VEC> o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const bool keep = seed == nullptr || dropout_keep_row(row_hash, k + v, threshold);
        o.v[v] = static_cast<T>(keep ? val[v] * s * keep_scale : 0.f);
      }
      if (VEC == 1 || k + VEC <= K) {
        store_vec<T, VEC>(out + m * K + k, o);
      } else {
        for (int v = 0; v < VEC && k + v < K; ++v) out[m * K + k + v] = o.v[v];
      }
    }
    __syncthreads();  // sout is rewritten by the next row tile
  }
#endif
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
        kernel<<<x_blocks + cast_blocks, kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), drop ? out.x.data_ptr<scalar_t>() : nullptr, rows, cols,
            drop ? seed->data_ptr<int64_t>() : nullptr, dropout_threshold(p), static_cast<float>(dropout_scale(p)),
            x_blocks, cast ? lora_A.data_ptr<adapter_t>() : nullptr, cast ? out.A.data_ptr<scalar_t>() : nullptr,
            cast ? lora_A.numel() : 0, cast ? lora_B.data_ptr<adapter_t>() : nullptr,
            cast ? out.B.data_ptr<scalar_t>() : nullptr, cast ? lora_B.numel() : 0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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

at::Tensor lowrank_up_cuda(const at::Tensor& g, const at::Tensor& A, double scaling, double p,
                           const c10::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(g.device());
  TORCH_CHECK(g.is_contiguous() && A.is_contiguous() && g.scalar_type() == A.scalar_type(), "lowrank_up: inputs");
  const int64_t M = g.size(0), K = A.size(1);
  const int R = static_cast<int>(A.size(0));
  at::Tensor out = at::empty({M, K}, g.options());
  if (M == 0 || K == 0) return out;
  const bool drop = p > 0.0 && seed.has_value();
  constexpr int kRows = 4;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(g.scalar_type(), "dy", [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = K % V == 0 && aligned16(A.data_ptr()) && aligned16(out.data_ptr());
    auto launch = [&](auto kernel, int per_thread) {
      const dim3 grid(static_cast<unsigned>((K + kThreads * per_thread - 1) / (kThreads * per_thread)),
                      static_cast<unsigned>(std::min<int64_t>((M + kRows - 1) / kRows, 65535)));
      kernel<<<grid, kThreads, 0, stream>>>(g.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                             M, K, R, drop ? seed->data_ptr<int64_t>() : nullptr,
                                             dropout_threshold(drop ? p : 0.0),
                                             static_cast<float>(dropout_scale(drop ? p : 0.0)),
                                             static_cast<float>(scaling));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (at::cuda::getCurrentDeviceProperties()->major >= 8) {
        auto launch_mma = [&](auto kernel) {
          // 41 KB of static shared memory per block: without the hint the driver may size the carveout for
          // one or two blocks per SM, and each block's load latency is then paid in sequence (a hint, set per
          // launch: it is per function and device)
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                              cudaSharedmemCarveoutMaxShared));
          const dim3 grid(static_cast<unsigned>((K + kTileN - 1) / kTileN),
                          static_cast<unsigned>(std::min<int64_t>((M + kTileM - 1) / kTileM, 65535)));
          kernel<<<grid, kThreads, 0, stream>>>(g.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                                 out.data_ptr<scalar_t>(), M, K, R,
                                                 drop ? seed->data_ptr<int64_t>() : nullptr,
                                                 dropout_threshold(drop ? p : 0.0),
                                                 static_cast<float>(dropout_scale(drop ? p : 0.0)),
                                                 static_cast<float>(scaling));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (vec)
          launch_mma(lowrank_up_mma_kernel<scalar_t, V>);
        else
          launch_mma(lowrank_up_mma_kernel<scalar_t, 1>);
        return;
      }
    }
    if (vec)
      launch(lowrank_up_kernel<scalar_t, V, kRows>, V);
    else
      launch(lowrank_up_kernel<scalar_t, 1, kRows>, 1);
  });
  return out;
}

}  // namespace lora_kernels
