// The tensor-core decode kernel (16-bit or NF4 W, up to 8 rows of 16-bit x; 16-bit W up to 16 rows) and its
// launcher; included by decode.cu, which launches the x·Aᵀ kernel it runs beside.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace lora_kernels {
namespace {

// NF4 codes are looked up in a shared-memory table held once per bank (value q of lane l at codes[q][l]: no
// bank conflicts), scaled by their block's absmax and rounded to T (two per cvt) into the mma's A fragments:
// ~6 SASS instructions per element, where a warp-per-column form with float32 FMAs took 8.8.
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

// The A fragments of two mma steps from one 32-bit word of a column's bytes (byte b: high nibble k = 2b, low
// nibble 2b + 1), scaled by the block's absmax and rounded. half selects the step's two bytes in the word.
template <typename T, int HALF>
__device__ inline void decode_pairs(uint32_t w, uint32_t lane_base, float am, uint32_t& k01, uint32_t& k23) {
  constexpr int B = HALF * 16;
  k01 = pack_rounded<T>(lds_f32(code_addr<B + 4>(w, lane_base)) * am, lds_f32(code_addr<B>(w, lane_base)) * am);
  k23 = pack_rounded<T>(lds_f32(code_addr<B + 12>(w, lane_base)) * am,
                        lds_f32(code_addr<B + 8>(w, lane_base)) * am);
}


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

// 9 to 16 rows (16-bit W only): x's rows are the mma's 16 rows and W's columns its two 8-column tiles, so a
// lane's chunks of columns g and g + 8 are B fragments as loaded and W is still read once. Their x·Aᵀ comes
// in slices of K (partial sums, added in a fixed order here); ranks up to kSlicedMaxRank.
constexpr int kSlicedMaxRank = 64;

// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias for up to 8 rows of x (bf16 / fp16) on tensor cores. A block owns 16 columns
// n of W and its warps split K in steps of 128 k; in a step lane (g, i) = (lane / 4, lane % 4) holds 32 k of
// columns g and g + 8 and of x's row g, which are the fragments of eight mma.m16n8k16 when W and x take the
// same permutation of k (k = 32i + 4·t + {0..3} for mma t of the step). NF4 codes are looked up in a
// shared-memory table held once per bank (value q of lane l at codes[q][l]: no bank conflicts), scaled by
// their block's absmax and rounded to T as every other path rounds W (two per cvt); 16-bit W and x go to the
// tensor cores as loaded. The x·Aᵀ kernel runs beside this one (programmatic dependent launch) and xa is
// read only in the epilogue. absmax: float32 per 64-element block, or (kNF4DQ) a uint8 code per block,
// decoded as code2[q]·absmax2[block / 256] + offset with no contraction (nf4.NF4Weight.block_absmax's bits).
// X16 (16-bit W): up to 16 rows, x as the mma's A operand (see kSlicedMaxRank); xa then holds xa_slices
// partial sums of x·Aᵀ, which the block adds in shared memory, and block 0 writes the sum to xa_out.
template <typename T, typename TB, WFormat F, bool X16>
__global__ void __launch_bounds__(MmaDecode<F>::kWarps * 32, 2)
    mma_decode_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const void* __restrict__ absmax,
                      const float* __restrict__ code, const float* __restrict__ code2,
                      const float* __restrict__ absmax2, float offset, const float* __restrict__ xa,
                      const TB* __restrict__ lora_B, const T* __restrict__ bias, T* __restrict__ y, int M, int64_t K,
                      int64_t N, int R, float scale, int xa_slices, float* __restrict__ xa_out) {
  using P = MmaDecode<F>;
  static_assert(!X16 || !P::kNF4, "the 16-row form takes 16-bit W");
  constexpr int U = P::kUnroll, C = P::kChunks, ROWS = X16 ? 16 : 8;
  constexpr bool DQ = F == WFormat::kNF4DQ;
  __shared__ float smem[P::kNF4 ? 1024 + (DQ ? 256 : 0) : 1];  // the code tables (below)
  __shared__ float partial[P::kWarps][16][ROWS];  // each warp's 16 columns × its rows, summed at the end
  __shared__ float xa_sum[X16 ? 16 * kSlicedMaxRank : 1];
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
  float c[4] = {0.f, 0.f, 0.f, 0.f}, c_hi[4] = {0.f, 0.f, 0.f, 0.f};  // c_hi: X16's columns g + 8
  if constexpr (X16) {
    // x's rows g and g + 8, loaded per step (L2) while W's batch is in flight: a 16×16 A fragment per 16 k,
    // multiplied into both 8-column tiles (columns g and g + 8 of W as B fragments, chunks as loaded)
    const T* xrow_hi = xrow + 8 * K;
    const bool x_row_hi = g + 8 < M;
    for (int64_t s0 = warp; s0 < steps; s0 += P::kWarps * U) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t s = s0 + static_cast<int64_t>(P::kWarps) * u;
        uint4 xl[4], xh[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool on = live(s0, u, j);
          xl[j] = on && x_row ? *reinterpret_cast<const uint4*>(xrow + s * 128 + 8 * j) : zero;
          xh[j] = on && x_row_hi ? *reinterpret_cast<const uint4*>(xrow_hi + s * 128 + 8 * j) : zero;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t a[4] = {xl[j].x, xh[j].x, xl[j].y, xh[j].y};
          mma_16816<T>(c, a, wl[u][j].x, wl[u][j].y);
          mma_16816<T>(c_hi, a, wh[u][j].x, wh[u][j].y);
          a[0] = xl[j].z, a[1] = xh[j].z, a[2] = xl[j].w, a[3] = xh[j].w;
          mma_16816<T>(c, a, wl[u][j].z, wl[u][j].w);
          mma_16816<T>(c_hi, a, wh[u][j].z, wh[u][j].w);
        }
      }
      if (s0 + P::kWarps * U < steps) load_w(s0 + P::kWarps * U);
    }
  } else {
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
  }
  // c (8 rows): (column g, x row 2i), (g, 2i + 1), (g + 8, 2i), (g + 8, 2i + 1); X16: c (columns 2i, 2i + 1
  // of rows g, g + 8) and c_hi (the same, 8 columns on). Summed over the warps, then the LoRA term
  // s·Σ_j xa[m, j]·B[n, j] and the bias, one store per (row, column).
  if constexpr (X16) {
    partial[warp][2 * i][g] = c[0], partial[warp][2 * i + 1][g] = c[1];
    partial[warp][2 * i][g + 8] = c[2], partial[warp][2 * i + 1][g + 8] = c[3];
    partial[warp][2 * i + 8][g] = c_hi[0], partial[warp][2 * i + 9][g] = c_hi[1];
    partial[warp][2 * i + 8][g + 8] = c_hi[2], partial[warp][2 * i + 9][g + 8] = c_hi[3];
    wait_for_predecessor();  // the x·Aᵀ slices: written by the kernel that may have run until now beside this one
    for (int t = threadIdx.x; t < M * R; t += blockDim.x) {
      float v = 0.f;
      for (int sl = 0; sl < xa_slices; ++sl) v += xa[static_cast<int64_t>(sl) * M * R + t];
      xa_sum[t] = v;
      if (blockIdx.x == 0) xa_out[t] = v;
    }
  } else {
    partial[warp][g][2 * i] = c[0], partial[warp][g][2 * i + 1] = c[1];
    partial[warp][g + 8][2 * i] = c[2], partial[warp][g + 8][2 * i + 1] = c[3];
  }
  __syncthreads();
  const int col = threadIdx.x % 16, m = threadIdx.x / 16;
  const int64_t n = n0 + col;
  if (m < M && n < N) {
    // xa: written by the x·Aᵀ kernel, which may have run until now beside this one
    if constexpr (!X16) wait_for_predecessor();
    const float* xam = X16 ? xa_sum + m * R : xa + m * R;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < P::kWarps; ++w) v += partial[w][col][m];
    for (int j = 0; j < R; ++j) v = fmaf(scale * static_cast<float>(lora_B[n * R + j]), xam[j], v);
    y[m * N + n] = static_cast<T>(bias != nullptr ? v + static_cast<float>(bias[n]) : v);
  }
}

// Launches mma_decode_kernel<F, X16> as a programmatic dependent of the x·Aᵀ kernel just launched on the stream.
template <typename T, typename TB, WFormat F, bool X16 = false>
void launch_mma_decode(const T* x, const void* w, const void* absmax, const float* code, const float* code2,
                       const float* absmax2, float offset, const float* xa, const TB* lora_B, const T* bias, T* y,
                       int64_t M, int64_t K, int64_t N, int R, float scale, cudaStream_t stream, int xa_slices = 1,
                       float* xa_out = nullptr) {
  launch_dependent(mma_decode_kernel<T, TB, F, X16>, dim3(static_cast<unsigned>((N + 15) / 16)),
                   dim3(MmaDecode<F>::kWarps * 32), 0, stream, x, static_cast<const uint8_t*>(w), absmax, code, code2,
                   absmax2, offset, xa, lora_B, bias, y, static_cast<int>(M), K, N, R, scale, xa_slices, xa_out);
}

}  // namespace
}  // namespace lora_kernels
