// Dropout's mask applied inside the low-rank products, so dropout(x) is never written or read back
// (16-bit x, ranks up to 32, tensor cores):
//   masked_xa        x·Aᵀ with the mask put on x as it is loaded (the forward: one read of x), and from it
//                    the low-rank output s·(x·Aᵀ)·Bᵀ + bias that the big GEMM then accumulates into;
//   masked_backward  dA = s·gᵀ·dropout(x) and dx's low-rank term mask ⊙ s·g·A from one read of x and one
//                    write of dx (the big GEMM then adds dy·W into dx with beta = 1).
// The mask is hash.h's (seed, row, col) function, one hash per element serving both uses. Sums over rows
// (dA) go to per-slice float32 partials added in a fixed order by a second launch: no atomics, so runs are
// bit-reproducible.
//
// Fragment layout. A lane group of 4 (q = lane % 4) loads 8 consecutive columns of a row as one 16-byte
// access: lane q holds physical columns 8q .. 8q+7 of a 32-column chunk. The reduction order inside an mma
// is free, so those 8 columns feed the k slots (2q, 2q+1, 2q+8, 2q+9) of two k16 steps directly; where the
// columns are an output (n) index instead, n-tile t holds physical column 8(n/2) + 2t + n%2 for its n.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../hash.h"
#include "../ops.h"
#include "common.cuh"
#include "mma.cuh"

namespace lora_kernels {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRank = 32;  // ranks up to 16 are zero-padded to 16, up to 32 to 32 (R: the kernels' rank tile)
constexpr int kChunk = 32;    // columns per warp step: 8 per lane of a group of 4
constexpr int kBlocksPerSm = 2;  // the kernels' launch bounds: at most 128 registers a thread

__device__ inline uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// The mask of 8 consecutive columns (col a multiple of 8) as AND masks over the 4 packed 16-bit pairs holding
// them: hash.h's hash32 with its first step shared by the 8 columns, and (z >> 8) >= t compared as
// z >= t·2^8 (t < 2^24, masked_lowrank_supported).
__device__ inline void keep_words(uint32_t row_hash, int64_t col, uint32_t threshold, uint32_t (&keep)[4]) {
  const uint32_t h = row_hash ^ static_cast<uint32_t>(col);
  const uint32_t head = h ^ (h >> 16);
  const uint32_t bound = threshold << 8;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    keep[i] = (hash32_tail(head ^ (2 * i)) >= bound ? 0x0000FFFFu : 0u) |
              (hash32_tail(head ^ (2 * i + 1)) >= bound ? 0xFFFF0000u : 0u);
}

// 8 columns of a row from col on (zeros past the matrix: no access).
__device__ inline uint4 load_row8(const uint16_t* base, int64_t row, int64_t rows, int64_t col, int64_t cols) {
  return row < rows && col < cols ? load16(base + row * cols + col) : make_uint4(0, 0, 0, 0);
}

// The 8 columns as 4 words with dropped elements +0 (NaN or not, as the reference's where()).
__device__ inline void masked_words(const uint4& v, const uint32_t (&keep)[4], uint32_t (&out)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = word(v, i) & keep[i];
}

__device__ inline uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Loads go AHEAD steps ahead of use through compile-time ring slots (a loop unrolled by AHEAD), so each
// warp keeps several 16-byte loads per lane in flight without a barrier or a shared-memory staging pass.
// Rank tiles of 16 keep four steps in flight, of 32 two (the ring's registers grow with the rank).
template <int R>
constexpr int ahead_for_rank() { return R <= 16 ? 4 : 2; }

// The forward's low-rank output y = s·xa·Bᵀ (+ bias) in T, written by masked_xa's blocks right after their
// 16 rows of xa: no second launch reading xa back, no cuBLAS call. B is (N, r) in T; y (M, N), N a multiple
// of 8, 16-byte aligned.
struct LowRankOut {
  const uint16_t* B;
  const uint16_t* bias;  // (N,) in T or null
  uint16_t* y;           // null: xa only
  int64_t N;
  float s;
};

// Each warp takes 32-column chunks of y (w, w + 8, ...). B's columns are permuted as masked_backward's A
// (n-tile t holds physical column 8(n/2) + 2t + n%2), so a lane's four n-tiles are 8 consecutive columns of
// a row: one 16-byte store per row. xa (the rounded value the backward reads) is the A operand, as cuBLAS
// would take it: float32 sums of exact products, scaled by s, bias added, rounded once.
template <typename T, int R>
__device__ inline void lowrank_rows_out(const uint16_t (&xa_rows)[16][R], const LowRankOut& out, int64_t row0,
                                        int64_t M, int r, int warp, int grp, int q) {
  constexpr int KS = R / 16;
  uint32_t a[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int j = 16 * ks + 2 * q;
    auto pair = [&](int row, int jj) { return *reinterpret_cast<const uint32_t*>(&xa_rows[row][jj]); };
    a[ks][0] = pair(grp, j), a[ks][1] = pair(grp + 8, j), a[ks][2] = pair(grp, j + 8), a[ks][3] = pair(grp + 8, j + 8);
  }
  const int64_t N = out.N;
  auto b_pair = [&](int64_t c, int j) -> uint32_t {  // B[c][j], B[c][j + 1], zeros past N and r
    if (c >= N || j >= r) return 0u;
    const uint16_t* row = out.B + c * r;
    if (r % 2 == 0) return *reinterpret_cast<const uint32_t*>(row + j);  // even r: pairs 4-byte aligned
    return pack2(row[j], j + 1 < r ? row[j + 1] : uint16_t(0));
  };
  auto bias_at = [&](int64_t c) {
    return out.bias != nullptr ? static_cast<float>(FloatBits<T>::make(out.bias[c])) : 0.f;
  };
  const int64_t r0 = row0 + grp, r1 = row0 + grp + 8;
  for (int64_t chunk = static_cast<int64_t>(warp) * kChunk; chunk < N; chunk += kWarps * kChunk) {
    const int64_t col = chunk + 8 * q;
    uint32_t lo[4], hi[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int64_t c = chunk + 8 * (grp / 2) + 2 * t + grp % 2;
      float d4[4] = {};
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int j = 16 * ks + 2 * q;
        mma_16816<T>(d4, a[ks], b_pair(c, j), b_pair(c, j + 8));
      }
      const float b0 = col < N ? bias_at(col + 2 * t) : 0.f, b1 = col < N ? bias_at(col + 2 * t + 1) : 0.f;
      lo[t] = pack_rounded<T>(d4[0] * out.s + b0, d4[1] * out.s + b1);
      hi[t] = pack_rounded<T>(d4[2] * out.s + b0, d4[3] * out.s + b1);
    }
    if (col < N) {
      if (r0 < M) *reinterpret_cast<uint4*>(out.y + r0 * N + col) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      if (r1 < M) *reinterpret_cast<uint4*>(out.y + r1 * N + col) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    }
  }
}

// xa = scale·(keep ⊙ x)·Aᵀ for ranks up to R (zero-padded). A block takes 16 rows; its warps split the
// columns (chunks w, w + 8, ...) and add their partial sums in shared memory in warp order. 37 µs at
// 8192×4096, R = 16, on an H100, where two 16-row tiles per block sharing A's loads (one block per SM)
// took 41 and two steps ahead ~38.
template <int R>
struct XaStep {
  uint4 a[R / 8];  // A rows h·8 + grp (n-tile h's j), this lane's 8 columns
  uint4 x[2];      // x rows grp and grp + 8
};

template <typename T, int R>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) masked_xa_kernel(
    const uint16_t* __restrict__ x, const uint16_t* __restrict__ A, T* __restrict__ xa, int64_t M, int64_t K, int r,
    const int64_t* __restrict__ seed, uint32_t threshold, float scale, LowRankOut out) {
  constexpr int NT = R / 8, AHEAD = ahead_for_rank<R>();
  wait_for_predecessor();
  allow_dependents();
  __shared__ float partial[kWarps][16][R];
  __shared__ __align__(16) uint16_t xa_rows[16][R];  // the block's x·Aᵀ rounded to T, for the low-rank output
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 4, q = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16;
  const uint32_t row_hash[2] = {dropout_row_hash(*seed, row0 + grp), dropout_row_hash(*seed, row0 + 8 + grp)};
  auto load = [&](XaStep<R>& st, int64_t c0) {
    const int64_t col = c0 + 8 * q;
#pragma unroll
    for (int h = 0; h < NT; ++h) st.a[h] = load_row8(A, h * 8 + grp, r, col, K);
#pragma unroll
    for (int h = 0; h < 2; ++h) st.x[h] = load_row8(x, row0 + h * 8 + grp, M, col, K);
  };
  constexpr int64_t kStride = kWarps * kChunk;
  const int64_t first = static_cast<int64_t>(warp) * kChunk;
  XaStep<R> ring[AHEAD];
#pragma unroll
  for (int d = 0; d < AHEAD; ++d) load(ring[d], first + d * kStride);
  float acc[NT][4] = {};
  for (int64_t c = first; c < K; c += AHEAD * kStride) {
#pragma unroll
    for (int d = 0; d < AHEAD; ++d) {
      const int64_t c0 = c + d * kStride;
      if (c0 >= K) break;  // warp-uniform
      const int64_t col = c0 + 8 * q;
      XaStep<R>& st = ring[d];
      uint32_t lo[4], hi[4], keep[4];
      keep_words(row_hash[0], col, threshold, keep);
      masked_words(st.x[0], keep, lo);
      keep_words(row_hash[1], col, threshold, keep);
      masked_words(st.x[1], keep, hi);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t a[4] = {lo[2 * half], hi[2 * half], lo[2 * half + 1], hi[2 * half + 1]};
#pragma unroll
        for (int h = 0; h < NT; ++h) mma_16816<T>(acc[h], a, word(st.a[h], 2 * half), word(st.a[h], 2 * half + 1));
      }
      load(st, c0 + AHEAD * kStride);
    }
  }
#pragma unroll
  for (int h = 0; h < NT; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][grp + (e / 2) * 8][h * 8 + 2 * q + e % 2] = acc[h][e];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * R; i += kThreads) {
    const int row = i / R, j = i % R;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][row][j];
    const T rounded = static_cast<T>(sum * scale);
    if (row0 + row < M && j < r) xa[(row0 + row) * r + j] = rounded;
    xa_rows[row][j] = j < r ? FloatBits<T>::get(rounded) : uint16_t(0);
  }
  if (out.y == nullptr) return;
  __syncthreads();
  lowrank_rows_out<T, R>(xa_rows, out, row0, M, r, warp, grp, q);
}

// One 16-row step of the backward: x's rows grp and grp + 8 (this lane's 8 columns) and g's A-operand
// fragments, one per 16 ranks (rows grp / grp + 8, ranks 16s + 2q, +1 and 16s + 2q + 8, +9).
template <int R>
struct BackwardStep {
  uint4 lo, hi;
  uint32_t g[R / 16][4];
};

template <int R>
__device__ inline void load_backward_step(BackwardStep<R>& st, const uint16_t* x, const uint16_t* g, int64_t m,
                                          int64_t m_end, int64_t col, int64_t K, int r, int grp, int q) {
  const int64_t r0 = m + grp, r1 = m + grp + 8;
  st.lo = load_row8(x, r0, m_end, col, K);
  st.hi = load_row8(x, r1, m_end, col, K);
#pragma unroll
  for (int s = 0; s < R / 16; ++s) {
    const int j = 16 * s + 2 * q;
    if (r == R) {  // rows of 2R bytes: the pairs as 4-byte loads
      auto pair = [&](int64_t row, int jj) {
        return row < m_end ? *reinterpret_cast<const uint32_t*>(g + row * R + jj) : 0u;
      };
      st.g[s][0] = pair(r0, j), st.g[s][1] = pair(r1, j), st.g[s][2] = pair(r0, j + 8), st.g[s][3] = pair(r1, j + 8);
    } else {
      auto at = [&](int64_t row, int jj) -> uint16_t {
        return row < m_end && jj < r ? g[row * r + jj] : uint16_t(0);
      };
      st.g[s][0] = pack2(at(r0, j), at(r0, j + 1)), st.g[s][1] = pack2(at(r1, j), at(r1, j + 1));
      st.g[s][2] = pack2(at(r0, j + 8), at(r0, j + 9)), st.g[s][3] = pack2(at(r1, j + 8), at(r1, j + 9));
    }
  }
}

// One 32-column chunk per warp (8 warps: 256 columns per block), rows [y·rows_per_slice, +rows_per_slice)
// in steps of 16, no barrier. Per step: x's 16×32 tile read once and masked; dx's tile written as
// keep·ds·(g·A); gᵀ·(masked x) accumulated for dA (x's fragments transposed in registers to serve as the
// mma's B operand). Ranks up to R, zero-padded: R / 16 k16 steps for g·A, R / 16 row tiles of dA.
template <typename T, bool WRITE_DX, int R>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) masked_backward_kernel(
    const uint16_t* __restrict__ x, const uint16_t* __restrict__ g, const uint16_t* __restrict__ A,
    uint16_t* __restrict__ dx, float* __restrict__ partial, int64_t M, int64_t K, int r, int64_t rows_per_slice,
    const int64_t* __restrict__ seed, uint32_t threshold, float ds) {
  constexpr int KS = R / 16, AHEAD = ahead_for_rank<R>();
  wait_for_predecessor();
  allow_dependents();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 4, q = lane % 4;
  const int64_t chunk0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kChunk;
  const int64_t col = chunk0 + 8 * q;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t m_end = m_begin + rows_per_slice < M ? m_begin + rows_per_slice : M;
  BackwardStep<R> ring[AHEAD];
#pragma unroll
  for (int d = 0; d < AHEAD; ++d) load_backward_step<R>(ring[d], x, g, m_begin + 16 * d, m_end, col, K, r, grp, q);
  // g·A's B operand for n-tile t and rank slice s: A[j][column of (grp, t)] for j = 16s + 2q, +1 (first
  // word) and 16s + 2q + 8, +9.
  uint32_t bA[4][KS][2];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int64_t c = chunk0 + 8 * (grp / 2) + 2 * t + grp % 2;
    auto at = [&](int j) -> uint16_t { return j < r && c < K ? A[j * K + c] : uint16_t(0); };
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      const int j = 16 * s + 2 * q;
      bA[t][s][0] = pack2(at(j), at(j + 1));
      bA[t][s][1] = pack2(at(j + 8), at(j + 9));
    }
  }
  const int64_t s = *seed;
  float acc[KS][4][4] = {};  // dA[16·ks + j][col + 2t + e]: j = grp (e < 2), grp + 8 (e >= 2)
  for (int64_t m = m_begin; m < m_end; m += 16 * AHEAD) {
#pragma unroll
    for (int d = 0; d < AHEAD; ++d) {
      const int64_t mm = m + 16 * d;
      if (mm >= m_end) break;  // warp-uniform
      BackwardStep<R>& st = ring[d];
      const int64_t r0 = mm + grp, r1 = mm + grp + 8;
      uint32_t lo[4], hi[4], keep_lo[4], keep_hi[4];
      keep_words(dropout_row_hash(s, r0), col, threshold, keep_lo);
      keep_words(dropout_row_hash(s, r1), col, threshold, keep_hi);
      masked_words(st.lo, keep_lo, lo);
      masked_words(st.hi, keep_hi, hi);
      if constexpr (WRITE_DX) {
        uint32_t out_lo[4], out_hi[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          float d4[4] = {};
#pragma unroll
          for (int ks = 0; ks < KS; ++ks) mma_16816<T>(d4, st.g[ks], bA[t][ks][0], bA[t][ks][1]);
          out_lo[t] = pack_rounded<T>(d4[0] * ds, d4[1] * ds) & keep_lo[t];
          out_hi[t] = pack_rounded<T>(d4[2] * ds, d4[3] * ds) & keep_hi[t];
        }
        if (col < K) {
          if (r0 < m_end)
            *reinterpret_cast<uint4*>(dx + r0 * K + col) = make_uint4(out_lo[0], out_lo[1], out_lo[2], out_lo[3]);
          if (r1 < m_end)
            *reinterpret_cast<uint4*>(dx + r1 * K + col) = make_uint4(out_hi[0], out_hi[1], out_hi[2], out_hi[3]);
        }
      }
      uint32_t xt[4][2];  // masked x as the B operand of gᵀ·x, per n-tile
#pragma unroll
      for (int t = 0; t < 4; ++t) xt[t][0] = transpose_8x8(lo[t]), xt[t][1] = transpose_8x8(hi[t]);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        // gᵀ as the A operand: the transposes of g's four 8×8 blocks, (j, m) quadrants in mma order.
        const uint32_t gt[4] = {transpose_8x8(st.g[ks][0]), transpose_8x8(st.g[ks][2]),
                                transpose_8x8(st.g[ks][1]), transpose_8x8(st.g[ks][3])};
#pragma unroll
        for (int t = 0; t < 4; ++t) mma_16816<T>(acc[ks][t], gt, xt[t][0], xt[t][1]);
      }
      load_backward_step<R>(st, x, g, mm + 16 * AHEAD, m_end, col, K, r, grp, q);
    }
  }
  if (col < K) {
    float* out = partial + static_cast<int64_t>(blockIdx.y) * R * K + col;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* row = out + (16 * ks + grp + 8 * h) * K;
        const float(&a)[4][4] = acc[ks];
        *reinterpret_cast<float4*>(row) = make_float4(a[0][2 * h], a[0][2 * h + 1], a[1][2 * h], a[1][2 * h + 1]);
        *reinterpret_cast<float4*>(row + 4) = make_float4(a[2][2 * h], a[2][2 * h + 1], a[3][2 * h], a[3][2 * h + 1]);
      }
  }
}

// dA[j][k] = scale·Σ_slices partial[slice][j][k] (R rows per slice), slices added in order.
template <typename TO>
__global__ void reduce_slices_kernel(const float* __restrict__ partial, TO* __restrict__ dA, int slices, int R,
                                     int r, int64_t K, float scale) {
  wait_for_predecessor();
  allow_dependents();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= r * K) return;
  const int64_t j = i / K, k = i % K;
  float sum = 0.f;
  for (int sl = 0; sl < slices; ++sl) sum += partial[(static_cast<int64_t>(sl) * R + j) * K + k];
  dA[i] = static_cast<TO>(sum * scale);
}

template <typename F>
void dispatch_16bit(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16)
    f(at::BFloat16{});
  else
    f(at::Half{});
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace

bool masked_lowrank_supported(const at::Tensor& x, int64_t rank, double p) {
  const auto dt = x.scalar_type();
  return dropout_threshold(p) < (1u << 24) && x.is_cuda() && (dt == at::kBFloat16 || dt == at::kHalf) &&
         x.dim() == 2 && rank <= kMaxRank && x.size(1) % 8 == 0 && x.numel() > 0 && x.is_contiguous() &&
         aligned16(x.data_ptr()) && at::cuda::getCurrentDeviceProperties()->major >= 8;
}

namespace {
// A in x's dtype, contiguous and 16-byte aligned (a copy only for an odd view).
at::Tensor adapter_rows(const at::Tensor& x, const at::Tensor& A) {
  TORCH_CHECK(masked_lowrank_supported(x, A.size(0), 0.0) && A.scalar_type() == x.scalar_type() && A.dim() == 2 &&
                  A.size(1) == x.size(1),
              "masked low-rank kernels: unsupported inputs");
  return A.is_contiguous() && aligned16(A.data_ptr()) ? A : A.clone(at::MemoryFormat::Contiguous);
}
}  // namespace

at::Tensor masked_xa_cuda(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& seed, double p,
                          at::Tensor* y, const at::Tensor* B, const at::Tensor* bias, double s) {
  TORCH_CHECK(dropout_threshold(p) < (1u << 24), "masked_xa: dropout_p too close to 1");
  const at::Tensor A = adapter_rows(x, lora_A);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  const int r = static_cast<int>(A.size(0));
  at::Tensor xa = at::empty({M, r}, x.options());
  LowRankOut out{nullptr, nullptr, nullptr, 0, static_cast<float>(s)};
  at::Tensor b_rows;
  if (y != nullptr) {
    TORCH_CHECK(B != nullptr && B->dim() == 2 && B->size(1) == r && B->scalar_type() == x.scalar_type(),
                "masked_xa: B must be (N, r) in x's dtype");
    const int64_t N = B->size(0);
    TORCH_CHECK(N % 8 == 0 && y->is_contiguous() && y->sizes() == at::IntArrayRef({M, N}) &&
                    y->scalar_type() == x.scalar_type() && aligned16(y->data_ptr()),
                "masked_xa: y must be a contiguous, 16-byte aligned (M, N) tensor of x's dtype, N a multiple of 8");
    TORCH_CHECK(bias == nullptr ||
                    (bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == x.scalar_type()),
                "masked_xa: bias must be a contiguous (N,) tensor of x's dtype");
    // B's row pairs are read as 4-byte words: a contiguous copy only for an odd view
    b_rows = B->is_contiguous() && reinterpret_cast<uintptr_t>(B->data_ptr()) % 4 == 0
                 ? *B : B->clone(at::MemoryFormat::Contiguous);
    out = LowRankOut{reinterpret_cast<const uint16_t*>(b_rows.data_ptr()),
                     bias != nullptr ? reinterpret_cast<const uint16_t*>(bias->data_ptr()) : nullptr,
                     reinterpret_cast<uint16_t*>(y->data_ptr()), N, static_cast<float>(s)};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16bit(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel, int rows_per_block) {
      launch_dependent(kernel, dim3(static_cast<unsigned>((M + rows_per_block - 1) / rows_per_block)), dim3(kThreads),
                       0, stream, reinterpret_cast<const uint16_t*>(x.data_ptr()),
                       reinterpret_cast<const uint16_t*>(A.data_ptr()), xa.data_ptr<T>(), M, K, r,
                       seed.data_ptr<int64_t>(), dropout_threshold(p), static_cast<float>(dropout_scale(p)), out);
    };
    if (r <= 16)
      launch(masked_xa_kernel<T, 16>, 16);
    else
      launch(masked_xa_kernel<T, 32>, 16);
  });
  return xa;
}

at::Tensor masked_lowrank_backward_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& lora_A,
                                        at::Tensor* dx, const at::Tensor& seed, double p, double s,
                                        at::ScalarType a_dtype) {
  TORCH_CHECK(dropout_threshold(p) < (1u << 24), "masked_backward: dropout_p too close to 1");
  const at::Tensor A = adapter_rows(x, lora_A);
  const int64_t M = x.size(0), K = x.size(1);
  const int r = static_cast<int>(A.size(0));
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && g.is_contiguous() && g.sizes() == at::IntArrayRef({M, r}),
              "masked_backward: g must be a contiguous (M, r) tensor of x's dtype");
  TORCH_CHECK(dx == nullptr || (dx->is_contiguous() && dx->sizes() == x.sizes() &&
                                dx->scalar_type() == x.scalar_type() && aligned16(dx->data_ptr())),
              "masked_backward: dx must be contiguous, aligned, of x's shape and dtype");
  TORCH_CHECK(a_dtype == at::kFloat || a_dtype == x.scalar_type(), "masked_backward: dA in float32 or x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  // Row slices for one wave of blocks (kBlocksPerSm per SM, the launch bounds' occupancy): equal blocks in
  // 1.5 waves left a third of the SMs idle for the last one. Each slice leaves one R×K float32 partial.
  const int R = r <= 16 ? 16 : 32;
  const int64_t col_blocks = (K + kWarps * kChunk - 1) / (kWarps * kChunk);
  const int64_t row_tiles = (M + 15) / 16;
  const int64_t per_col_block = kBlocksPerSm * sm_count() / col_blocks;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(row_tiles, per_col_block));
  const int64_t rows_per_slice = (row_tiles + want - 1) / want * 16;
  const int64_t slices = (M + rows_per_slice - 1) / rows_per_slice;
  at::Tensor partial = at::empty({slices, R, K}, x.options().dtype(at::kFloat));
  at::Tensor dA = at::empty({r, K}, x.options().dtype(a_dtype));
  const float scale = static_cast<float>(s * dropout_scale(p));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16bit(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      launch_dependent(kernel, dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(slices)), dim3(kThreads),
                       0, stream, reinterpret_cast<const uint16_t*>(x.data_ptr()),
                       reinterpret_cast<const uint16_t*>(g.data_ptr()), reinterpret_cast<const uint16_t*>(A.data_ptr()),
                       dx != nullptr ? reinterpret_cast<uint16_t*>(dx->data_ptr()) : nullptr,
                       partial.data_ptr<float>(), M, K, r, rows_per_slice, seed.data_ptr<int64_t>(),
                       dropout_threshold(p), scale);
    };
    if (R == 16)
      dx != nullptr ? launch(masked_backward_kernel<T, true, 16>) : launch(masked_backward_kernel<T, false, 16>);
    else
      dx != nullptr ? launch(masked_backward_kernel<T, true, 32>) : launch(masked_backward_kernel<T, false, 32>);
    const unsigned blocks = static_cast<unsigned>((r * K + 255) / 256);
    auto reduce = [&](auto out_tag) {
      using TO = decltype(out_tag);
      launch_dependent(reduce_slices_kernel<TO>, dim3(blocks), dim3(256), 0, stream, partial.data_ptr<float>(),
                       dA.data_ptr<TO>(), static_cast<int>(slices), R, r, K, scale);
    };
    if (a_dtype == at::kFloat)
      reduce(float{});
    else
      reduce(T{});
  });
  return dA;
}

}  // namespace lora_kernels
