// Forward for small batches (M <= kDecodeMaxRows): memory bound on W, so one launch streams W once and
// serves every row of x from it, 16-bit or NF4 W on tensor cores (mma_decode_kernel), float32 by FMAs
// (decode_kernel, 2 rows); the LoRA term s·(x·Aᵀ)·Bᵀ joins the epilogue. x·Aᵀ comes from one small kernel
// launched before it. Larger M goes to cuBLAS (composite).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "../ops.h"
#include "common.cuh"

namespace lora_kernels {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxRows = static_cast<int>(kDecodeMaxRows);
constexpr int kFmaDecodeMaxRows = 2;  // decode_kernel's rows: past 2 it re-read x more than cuBLAS reads W
constexpr int kNF4Rows = static_cast<int>(kNF4DecodeMaxRows);

// Programmatic dependent launch (Hopper): a kernel launched with the programmatic-serialization attribute may
// start while the kernel before it runs, up to its pdl_wait (which waits for that kernel's completion and
// its writes). Both are no-ops without the attribute and before sm_90.
__device__ inline void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ inline void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// xa[m, j] = Σ_k x[m, k]·A[j, k] in float32, with A's values rounded to x's dtype as the composite path
// rounds them: one block per rank index j. Replaces a cuBLAS GEMM, its split-K reduction and two casts
// (four launches, 9 µs of the 19 µs that M = 1 took on an H100) with one launch.
template <typename T, typename TA, int ROWS>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    lowrank_rows_kernel(const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ xa, int M, int64_t K,
                        int R) {
  __shared__ float partial[ROWS][kWarpsPerBlock];
  pdl_launch_dependents();  // the 4-bit decode streams W meanwhile and waits for xa only at its end
  const int j = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float acc[ROWS];
#pragma unroll
  for (int m = 0; m < ROWS; ++m) acc[m] = 0.f;
  const TA* arow = A + static_cast<int64_t>(j) * K;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < K; k += kWarpsPerBlock * 32) {
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
    xa[threadIdx.x * R + j] = v;
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

// The 4-bit (NF4, bitsandbytes layout) decode on tensor cores. A block owns 16 columns n of W and its warps
// split K: each step of a warp covers 128 k (64 bytes per column), lane (g, i) = (lane / 4, lane % 4) holding
// 16 bytes of columns g and g + 8 and 32 k of x's row g, which is exactly what eight mma.m16n8k16 need when
// the k order is permuted the same way for W and x (k = 32i + 4·step + {0..3} of the 128). Each code is
// looked up in a shared-memory table held once per bank (value q of lane l at codes[q][l]: no bank
// conflicts), scaled by its block's absmax and rounded to T as every other path rounds W (two per cvt), and
// fed to the mma as it is; x's bf16/fp16 pairs are the B fragment without conversion. ~4.5 instructions per
// element, where the warp-per-column form with float32 FMAs took 8.8 (and 10.8 µs at 1×4096×4096).
// Shared address of the code in bits [BIT, BIT + 4) of w for this lane. The table is 2 KB aligned, so
// ((w >> BIT) & 15)·128 | (table + lane·4) is one shift and one three-input logic op.
template <int BIT>
__device__ inline uint32_t code_addr(uint32_t w, uint32_t lane_base) {
  const uint32_t off = BIT >= 7 ? (w >> (BIT - 7)) & 0x780u : (w << (7 - BIT)) & 0x780u;
  return off | lane_base;
}

__device__ inline float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}

// Two floats rounded to T (bf16 / fp16) and packed, the first in the low half.
template <typename T>
__device__ inline uint32_t pack_rounded(float lo, float hi) {
  uint32_t w;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}

// c += a·b on tensor cores, float32 accumulation: a 16×16 (row), b 16×8 (col), T = bf16 or fp16.
template <typename T>
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, at::BFloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The A fragments of two mma steps from one 32-bit word of a column's bytes (byte b: high nibble k = 2b, low
// nibble 2b + 1), scaled by the block's absmax and rounded. half selects the step's two bytes in the word.
template <typename T, int HALF>
__device__ inline void decode_pairs(uint32_t w, uint32_t lane_base, float am, uint32_t& k01, uint32_t& k23) {
  constexpr int B = HALF * 16;
  k01 = pack_rounded<T>(lds_f32(code_addr<B + 4>(w, lane_base)) * am, lds_f32(code_addr<B>(w, lane_base)) * am);
  k23 = pack_rounded<T>(lds_f32(code_addr<B + 12>(w, lane_base)) * am,
                        lds_f32(code_addr<B + 8>(w, lane_base)) * am);
}

__device__ inline uint32_t word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// W's formats for the tensor-core decode: 16-bit values as stored, or NF4 codes with float32 absmaxes or
// double-quantised ones.
enum class WFormat { kDense, kNF4, kNF4DQ };

template <WFormat F>
struct MmaDecode {
  static constexpr bool kNF4 = F != WFormat::kDense;
  // 16-byte chunks of W per lane, column and 128-k step: NF4 32 codes in one, 16-bit W 8 values in each of four
  static constexpr int kChunks = kNF4 ? 1 : 4;
  static constexpr int kStepBytes = kNF4 ? 64 : 256;  // a column's bytes per step
  // warps per block (splitting K), two blocks per SM: NF4 decodes in registers (64 per thread), 16-bit W
  // holds twice the bytes in flight instead (128)
  static constexpr int kWarps = kNF4 ? 16 : 8;
  static constexpr int kUnroll = 2;  // steps whose loads a warp issues before it computes on them
};

// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias for up to 8 rows of x (bf16 / fp16) on tensor cores. A block owns 16 columns
// n of W and its warps split K in steps of 128 k; in a step lane (g, i) = (lane / 4, lane % 4) holds 32 k of
// columns g and g + 8 and of x's row g, which are the fragments of eight mma.m16n8k16 when W and x take the
// same permutation of k (k = 32i + 4·t + {0..3} for mma t of the step). NF4 codes are looked up in a
// shared-memory table held once per bank (value q of lane l at codes[q][l]: no bank conflicts), scaled by
// their block's absmax and rounded to T as every other path rounds W (two per cvt); 16-bit W and x go to the
// tensor cores as loaded. The x·Aᵀ kernel runs beside this one (programmatic dependent launch) and xa is
// read only in the epilogue. absmax: float32 per 64-element block, or (kNF4DQ) a uint8 code per block,
// decoded as code2[q]·absmax2[block / 256] + offset with no contraction (nf4.NF4Weight.block_absmax's bits).
template <typename T, typename TB, WFormat F>
__global__ void __launch_bounds__(MmaDecode<F>::kWarps * 32, 2)
    mma_decode_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const void* __restrict__ absmax,
                      const float* __restrict__ code, const float* __restrict__ code2,
                      const float* __restrict__ absmax2, float offset, const float* __restrict__ xa,
                      const TB* __restrict__ lora_B, const T* __restrict__ bias, T* __restrict__ y, int M, int64_t K,
                      int64_t N, int R, float scale) {
  using P = MmaDecode<F>;
  constexpr int U = P::kUnroll, C = P::kChunks;
  constexpr bool DQ = F == WFormat::kNF4DQ;
  __shared__ float smem[P::kNF4 ? 1024 + (DQ ? 256 : 0) : 1];  // the code tables (below)
  __shared__ float partial[P::kWarps][16][8];  // each warp's 16 columns × 8 rows, summed at the end
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, i = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const bool col_lo = n0 + g < N, col_hi = n0 + g + 8 < N, x_row = g < M;
  const int64_t row_bytes = P::kNF4 ? K / 2 : K * static_cast<int64_t>(sizeof(T));
  const uint8_t* w_lo = w + (n0 + g) * row_bytes + i * (P::kStepBytes / 4);
  const uint8_t* w_hi = w_lo + 8 * row_bytes;
  const T* xrow = x + static_cast<int64_t>(g) * K + 32 * i;
  // the last step may be partial: K % 64 == 0 (NF4, lanes i < 2 only) or K % 8 == 0 (whole 16-byte chunks)
  const int64_t steps = (K + 127) / 128;
  // U steps: this lane's chunks of both columns and of x's row g, and the absmaxes (double-quantised: their
  // codes and second-level scales, decoded once the code table is in shared memory)
  uint4 wl[U][C], wh[U][C], xv[U][4];
  float al[U], ah[U];
  uint32_t ql[U], qh[U];
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  auto live = [&](int64_t s0, int u, int j) {  // chunk j of x (8 k) in step s0 + kWarps·u
    const int64_t s = s0 + static_cast<int64_t>(P::kWarps) * u;
    return s < steps && s * 128 + 32 * i + (P::kNF4 ? 0 : 8 * j) < K;  // NF4: K % 64 == 0, all four or none
  };
  auto load_w = [&](int64_t s0) {  // W's bytes: the stream that sets the pace
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t at = (s0 + static_cast<int64_t>(P::kWarps) * u) * P::kStepBytes;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const bool on = live(s0, u, j);
        wl[u][j] = on && col_lo ? *reinterpret_cast<const uint4*>(w_lo + at + 16 * j) : zero;
        wh[u][j] = on && col_hi ? *reinterpret_cast<const uint4*>(w_hi + at + 16 * j) : zero;
      }
    }
  };
  auto load_rest = [&](int64_t s0) {  // x and the absmaxes: small, mostly from L2
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t s = s0 + static_cast<int64_t>(P::kWarps) * u, k = s * 128 + 32 * i;
      if constexpr (P::kNF4) {
        const bool on = live(s0, u, 0);
        const int64_t blk_lo = (n0 + g) * (K / 64) + k / 64, blk_hi = blk_lo + 8 * (K / 64);
        if constexpr (DQ) {
          ql[u] = on && col_lo ? static_cast<const uint8_t*>(absmax)[blk_lo] : 0u;
          qh[u] = on && col_hi ? static_cast<const uint8_t*>(absmax)[blk_hi] : 0u;
          al[u] = on && col_lo ? absmax2[blk_lo / 256] : 0.f;
          ah[u] = on && col_hi ? absmax2[blk_hi / 256] : 0.f;
        } else {
          al[u] = on && col_lo ? static_cast<const float*>(absmax)[blk_lo] : 0.f;
          ah[u] = on && col_hi ? static_cast<const float*>(absmax)[blk_hi] : 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
        xv[u][j] = live(s0, u, j) && x_row ? *reinterpret_cast<const uint4*>(xrow + s * 128 + 8 * j) : zero;
    }
  };
  load_w(warp);  // W's first bytes in flight before the tables are built
  uint32_t lane_base = 0;
  float* code2_s = smem + 1024;
  if constexpr (P::kNF4) {
    // The codes, 16 × 32 lanes, at the first 2 KB boundary inside 4 KB (the alignment of static shared memory
    // stops at 1 KB: the block's window starts after a reserved 1 KB); then, double-quantised, the 256 absmax
    // codes.
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    float* codes = smem + (((raw + 2047u) & ~2047u) - raw) / 4;
    for (int b = threadIdx.x; b < 512; b += blockDim.x) codes[b] = code[b / 32];
    if constexpr (DQ) {
      for (int b = threadIdx.x; b < 256; b += blockDim.x) code2_s[b] = code2[b];
    }
    __syncthreads();
    lane_base = static_cast<uint32_t>(__cvta_generic_to_shared(codes + lane));
  }
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t s0 = warp; s0 < steps; s0 += P::kWarps * U) {
    load_rest(s0);
    if constexpr (DQ) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        al[u] = __fadd_rn(__fmul_rn(code2_s[ql[u]], al[u]), offset);
        ah[u] = __fadd_rn(__fmul_rn(code2_s[qh[u]], ah[u]), offset);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // x's chunk j: mma steps 2j and 2j + 1
        uint32_t a[4];
        if constexpr (P::kNF4) {  // word j of each column's chunk
          const uint32_t lo = word(wl[u][0], j), hi = word(wh[u][0], j);
          decode_pairs<T, 0>(lo, lane_base, al[u], a[0], a[2]);
          decode_pairs<T, 0>(hi, lane_base, ah[u], a[1], a[3]);
          mma_16816<T>(c, a, xv[u][j].x, xv[u][j].y);
          decode_pairs<T, 1>(lo, lane_base, al[u], a[0], a[2]);
          decode_pairs<T, 1>(hi, lane_base, ah[u], a[1], a[3]);
        } else {  // chunk j of each column, as loaded
          a[0] = wl[u][j].x, a[1] = wh[u][j].x, a[2] = wl[u][j].y, a[3] = wh[u][j].y;
          mma_16816<T>(c, a, xv[u][j].x, xv[u][j].y);
          a[0] = wl[u][j].z, a[1] = wh[u][j].z, a[2] = wl[u][j].w, a[3] = wh[u][j].w;
        }
        mma_16816<T>(c, a, xv[u][j].z, xv[u][j].w);
      }
    }
    if (s0 + P::kWarps * U < steps) load_w(s0 + P::kWarps * U);
  }
  // c: (column g, x row 2i), (g, 2i + 1), (g + 8, 2i), (g + 8, 2i + 1); summed over the warps, then the LoRA
  // term s·Σ_j xa[m, j]·B[n, j] and the bias, one store per (row, column).
  partial[warp][g][2 * i] = c[0], partial[warp][g][2 * i + 1] = c[1];
  partial[warp][g + 8][2 * i] = c[2], partial[warp][g + 8][2 * i + 1] = c[3];
  __syncthreads();
  const int col = threadIdx.x % 16, m = threadIdx.x / 16;
  const int64_t n = n0 + col;
  if (m < M && n < N) {
    pdl_wait();  // xa: written by the x·Aᵀ kernel, which may have run until now beside this one
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < P::kWarps; ++w) v += partial[w][col][m];
    for (int j = 0; j < R; ++j) v = fmaf(scale * static_cast<float>(lora_B[n * R + j]), xa[m * R + j], v);
    y[m * N + n] = static_cast<T>(bias != nullptr ? v + static_cast<float>(bias[n]) : v);
  }
}

// Launches mma_decode_kernel<F> as a programmatic dependent of the x·Aᵀ kernel just launched on the stream.
template <typename T, typename TB, WFormat F>
void launch_mma_decode(const T* x, const void* w, const void* absmax, const float* code, const float* code2,
                       const float* absmax2, float offset, const float* xa, const TB* lora_B, const T* bias, T* y,
                       int64_t M, int64_t K, int64_t N, int R, float scale, cudaStream_t stream) {
  cudaLaunchAttribute pdl[1];
  pdl[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>((N + 15) / 16));
  cfg.blockDim = dim3(MmaDecode<F>::kWarps * 32);
  cfg.stream = stream;
  cfg.attrs = pdl;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, mma_decode_kernel<T, TB, F>, x, static_cast<const uint8_t*>(w), absmax,
                                    code, code2, absmax2, offset, xa, lora_B, bias, y, static_cast<int>(M), K, N, R,
                                    scale));
}

// Adapters come in x's dtype or in float32 (the Python layer's contract); the kernels read them as they are.
template <typename T, typename F>
void dispatch_adapter_dtype(at::ScalarType t, F&& f) {
  if (t == at::kFloat)
    f(float{});
  else
    f(T{});
}

// x's dtype and the adapters' dispatched, x·Aᵀ (float32, at most ROWS rows) launched, then
// launch(scalar tag, adapter tag) launches the caller's kernel, which reads xa.
template <int ROWS, typename F>
void after_lowrank_rows(const at::Tensor& xc, const at::Tensor& Ac, at::Tensor& xa, F&& launch) {
  const int64_t M = xc.size(0), K = xc.size(1);
  const int R = static_cast<int>(Ac.size(0));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(xc.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_adapter_dtype<scalar_t>(Ac.scalar_type(), [&](auto adapter_tag) {
      using adapter_t = decltype(adapter_tag);
      lowrank_rows_kernel<scalar_t, adapter_t, ROWS><<<R, kWarpsPerBlock * 32, 0, stream>>>(
          xc.data_ptr<scalar_t>(), Ac.data_ptr<adapter_t>(), xa.data_ptr<float>(), static_cast<int>(M), K, R);
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
  const at::Tensor Ac = lora_A.contiguous(), Bc = lora_B.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(dt).contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int R = static_cast<int>(lora_A.size(0));
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  after_lowrank_rows<kMaxRows>(xc, Ac, xa, [&](auto tag, auto adapter_tag) {
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
