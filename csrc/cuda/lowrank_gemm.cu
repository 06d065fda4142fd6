// y = x·Wᵀ + s·u·Bᵀ (+ bias) in one GEMM on Hopper: a CUTLASS 3 warp-specialised (ping-pong) TMA GEMM whose
// epilogue adds each output element's rank-R term from u (M×R) and B (N×R) while the other consumer warp group
// runs its main loop. It replaces cuBLAS's y = s·u·Bᵀ (+ bias) then y += x·Wᵀ (beta = 1), which writes y and
// reads it back: two passes over the output that this kernel does not make.
// Built only where the CUTLASS headers are found (setup.py: LORA_KERNELS_WITH_CUTLASS); sm_90a only.
#ifdef LORA_KERNELS_WITH_CUTLASS
// CUTLASS's device-side asserts become calls that serialise the wgmma pipeline (ptxas C7510).
#ifndef NDEBUG
#define NDEBUG
#endif
#endif
#include "hash.h"
#include "ops.h"

#ifdef LORA_KERNELS_WITH_CUTLASS
// torch's extension flags hide cuda_fp16's operators, which CUTLASS's numeric types use.
#undef __CUDA_NO_HALF_OPERATORS__
#undef __CUDA_NO_HALF_CONVERSIONS__
#undef __CUDA_NO_BFLOAT16_CONVERSIONS__
#undef __CUDA_NO_HALF2_OPERATORS__

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace lora_kernels {
namespace {
using namespace cute;

// The tile scheduler's swizzle (tiles of up to this many rows of tiles visited together, for L2 reuse of the
// operands): LORA_KERNELS_CUTLASS_SWIZZLE, read once, for A/B runs; CUTLASS's default 1 otherwise.
int tile_swizzle() {
  static const int swizzle = [] {
    const char* v = std::getenv("LORA_KERNELS_CUTLASS_SWIZZLE");
    return v != nullptr ? std::max(1, std::atoi(v)) : 1;
  }();
  return swizzle;
}

// Up to kMaxRankChunks × 8 ranks per call (16-byte loads of 8 values); larger ranks take the cuBLAS form.
constexpr int kMaxRankChunks = 4;

// 8 16-bit values (one 16-byte load) as two float4s in shared memory.
template <class T>
__device__ __forceinline__ void to_float8(const uint4& v, float4* dst) {
  const T* p = reinterpret_cast<const T*>(&v);
  dst[0] = make_float4(float(p[0]), float(p[1]), float(p[2]), float(p[3]));
  dst[1] = make_float4(float(p[4]), float(p[5]), float(p[6]), float(p[7]));
}

// acc + a·b, one FMA per product
__device__ __forceinline__ float fma4(const float4& a, const float4& b, float acc) {
  return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, fmaf(a.x, b.x, acc))));
}

// Epilogue visitor node: element (m, n) of the tile gets s·Σ_r u[m, r]·B[n, r] + bias[n] (under dropout's mask
// where a seed is given). Once per output tile the warp group copies the tile's 128 rows of u and 128 rows of B
// (R values each) into shared memory as float32, its 16-byte loads all in flight at once; each epilogue subtile
// then computes a thread's elements from there, 4 ranks per step, rows that several of its elements share read
// once. The ping-pong kernel runs one warp group's epilogue at a time, so one staging area serves both.
// (Measured so far: slower than cuBLAS's pair of GEMMs, bench/NOTES.md; hence opt-in.)
template <class T, int kTileM, int kTileN>
struct LowRankNode {
  // Staged as float32 (converted once per tile, not once per use): a row is kMaxRankChunks × 8 floats plus one
  // float4 of padding, so the 8 rows that a quarter-warp's 16-byte loads touch fall in distinct banks.
  static constexpr int kRowQuads = kMaxRankChunks * 2 + 1;  // float4s per staged row
  struct SharedStorage {
    alignas(16) float4 u[kTileM * kRowQuads];
    alignas(16) float4 b[kTileN * kRowQuads];
    float bias[kTileN];
  };
  struct Arguments {
    const T* u = nullptr;     // M×R, row stride ldu
    const T* b = nullptr;     // N×R, row stride ldb
    const T* bias = nullptr;  // N or null
    float scale = 1.f;
    int rank_chunks = 0;      // R / 8
    int64_t ldu = 0, ldb = 0;
    const int64_t* seed = nullptr;  // with it, element (m, n)'s term is kept or zeroed by dropout's mask
    uint32_t threshold = 0;         // (hash.h; the kept scale 1/(1-p) is folded into scale)
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) { return args; }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.rank_chunks > 0 && args.rank_chunks <= kMaxRankChunks;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE LowRankNode() {}
  CUTLASS_HOST_DEVICE LowRankNode(Params const& params, SharedStorage const& shared)
      : params(params), smem(const_cast<SharedStorage*>(&shared)) {}
  Params params;
  SharedStorage* smem = nullptr;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::detail::EmptyProducerLoadCallbacks{};
  }

  template <class CTensor>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor tCcD, int m0, int n0, int res_m, int res_n, int tile_m0,
                                          int tile_n0, int M, int N, int thread, Params const& params,
                                          SharedStorage* smem)
        : tCcD(tCcD), m0(m0), n0(n0), res_m(res_m), res_n(res_n), tile_m0(tile_m0), tile_n0(tile_n0), M(M), N(N),
          thread(thread), params(params), smem(smem) {}
    CTensor tCcD;              // (CPY,CPY_M,CPY_N,EPI_M,EPI_N): coordinates relative to (m0, n0)
    int m0, n0, res_m, res_n;  // this thread's first element, and the rows / columns left from it
    int tile_m0, tile_n0, M, N, thread;
    Params const& params;
    SharedStorage* smem;
    // this thread's elements of one epilogue subtile
    static constexpr int kSub = decltype(cute::size(cute::take<0, 3>(
        cute::remove_cvref_t<decltype(std::declval<CTensor>().shape())>{})))::value;
    float sub[kSub];
    int64_t seed = 0;

    CUTLASS_DEVICE void begin() {
      // every load issued before the first store (fixed trip counts, unrolled): one L2 round trip per tile
      static_assert(kTileM == kTileN, "u's and B's rows are staged by one loop");
      constexpr int kPerThread = kTileM * kMaxRankChunks / 128;
      auto load = [&](const T* src, int64_t ld, int row, int rows, int k) {
        return k < params.rank_chunks && row < rows ? __ldg(reinterpret_cast<const uint4*>(src + int64_t(row) * ld) + k)
                                                    : make_uint4(0, 0, 0, 0);
      };
      uint4 vu[kPerThread], vb[kPerThread];
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kPerThread; ++j) {
        const int i = thread + 128 * j, row = i / kMaxRankChunks, k = i % kMaxRankChunks;
        vu[j] = load(params.u, params.ldu, tile_m0 + row, M, k);
        vb[j] = load(params.b, params.ldb, tile_n0 + row, N, k);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kPerThread; ++j) {
        const int i = thread + 128 * j, at = (i / kMaxRankChunks) * kRowQuads + 2 * (i % kMaxRankChunks);
        to_float8<T>(vu[j], smem->u + at);
        to_float8<T>(vb[j], smem->b + at);
      }
      for (int i = thread; i < kTileN; i += 128)
        smem->bias[i] = params.bias != nullptr && tile_n0 + i < N ? float(params.bias[tile_n0 + i]) : 0.f;
      seed = params.seed != nullptr ? __ldg(params.seed) : 0;
    }
    CUTLASS_DEVICE bool begin_sync_needed() const { return true; }  // the staged rows visible to the warp group

    CUTLASS_DEVICE void begin_loop(int epi_m, int epi_n) {
      Tensor c = tCcD(_, _, _, epi_m, epi_n);
      // rows / columns inside the tile, in [0, 128) for every element (the staged rows past M or N are zeros;
      // clamping to the residue instead gave negative rows to threads with none in range: out-of-bounds reads)
      auto row = [&](int i) { return int(get<0>(c(i))) + m0 - tile_m0; };
      auto col = [&](int i) { return int(get<1>(c(i))) + n0 - tile_n0; };
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kSub; ++i) sub[i] = 0.f;
      // A rolled loop over the rank: CUTLASS unrolls this function over every subtile of the tile, and fully
      // unrolled ranks made ~250 KB of straight-line code per tile (instruction fetch, the likely stall).
#pragma unroll 1
      for (int q = 0; q < 2 * params.rank_chunks; ++q) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kSub; ++i)
          sub[i] = fma4(smem->u[row(i) * kRowQuads + q], smem->b[col(i) * kRowQuads + q], sub[i]);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kSub; ++i) {
        const auto crd = c(i);
        const int m = m0 + int(get<0>(crd)), n = n0 + int(get<1>(crd));
        const float bias = smem->bias[n - tile_n0];
        const bool keep = params.seed == nullptr || dropout_keep(seed, m, n, params.threshold);
        sub[i] = int(get<0>(crd)) < res_m && int(get<1>(crd)) < res_n ? fmaf(keep ? sub[i] : 0.f, params.scale, bias)
                                                                       : 0.f;
      }
    }

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(cutlass::Array<ElementAccumulator, FragmentSize> const&,
                                                             int epi_v, int, int) {
      cutlass::Array<float, FragmentSize> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) out[i] = sub[epi_v * FragmentSize + i];
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [tm, tn, tk, tl] = args.tile_coord_mnkl;
    const int res_m = int(get<0>(args.residue_tCcD)), res_n = int(get<1>(args.residue_tCcD));
    return ConsumerStoreCallbacks<decltype(args.tCcD)>(args.tCcD, int(M) - res_m, int(N) - res_n, res_m, res_n,
                                                       int(tm) * kTileM, int(tn) * kTileN, int(M), int(N),
                                                       args.thread_idx % 128, params, smem);
  }
};

// D = acc + low-rank term, rounded once to T.
template <class T>
using LowRankEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, T, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90AccFetch, LowRankNode<T, 128, 128>>;

// WeightLayout: ColumnMajor for x·Wᵀ with W (N×K) row-major; RowMajor for dy·W with W as the (K_out × N) operand.
template <class T, class WeightLayout>
struct LowRankGemm {
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  static constexpr int kAlign = 8;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlign, T,
      cutlass::layout::RowMajor, kAlign, cutlass::epilogue::TmaWarpSpecialized, LowRankEpilogue<T>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, cutlass::layout::RowMajor, kAlign, T, WeightLayout,
      kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                  const at::Tensor* bias, double scale, const at::Tensor* seed, double p, at::Tensor& out) {
    const int M = int(a.size(0)), K = int(a.size(1)), N = int(out.size(1));
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, make_shape(M, K, 1));
    get<0>(sa) = a.stride(0);
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K, 1));
    StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(M, N, 1));
    typename LowRankNode<T, 128, 128>::Arguments lr;
    lr.u = reinterpret_cast<const T*>(u.data_ptr());
    lr.b = reinterpret_cast<const T*>(b.data_ptr());
    lr.bias = bias != nullptr ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
    lr.scale = float(scale);
    lr.rank_chunks = int(u.size(1) / 8);
    lr.ldu = u.stride(0), lr.ldb = b.stride(0);
    if (seed != nullptr) {
      lr.seed = seed->data_ptr<int64_t>();
      lr.threshold = dropout_threshold(p);
      lr.scale = float(scale * dropout_scale(p));
    }
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {reinterpret_cast<const T*>(a.data_ptr()), sa,
                                   reinterpret_cast<const T*>(w.data_ptr()), sb},
                                  {{{}, lr, {}}, nullptr, sd, reinterpret_cast<T*>(out.data_ptr()), sd}};
    args.scheduler.max_swizzle_size = tile_swizzle();
    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
                "lowrank_gemm: the CUTLASS kernel cannot take these shapes / strides");
    const size_t ws_bytes = Gemm::get_workspace_size(args);
    at::Tensor ws;  // none allocated when the kernel needs none (the usual case: no split-K / stream-K)
    if (ws_bytes > 0) ws = at::empty({int64_t(ws_bytes)}, a.options().dtype(at::kByte));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(args, ws_bytes > 0 ? ws.data_ptr() : nullptr, stream) == cutlass::Status::kSuccess,
                "lowrank_gemm: CUTLASS initialize failed");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "lowrank_gemm: CUTLASS launch failed");
  }
};

}  // namespace

bool lowrank_gemm_supported(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, bool weight_kmajor) {
  if (!a.is_cuda() || a.dim() != 2 || u.dim() != 2 || a.size(1) == 0) return false;
  const auto dt = a.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || w.scalar_type() != dt || u.scalar_type() != dt) return false;
  const int64_t r = u.size(1);
  if (r % 8 != 0 || r / 8 > kMaxRankChunks) return false;
  const auto* props = at::cuda::getDeviceProperties(a.get_device());
  if (props->major != 9) return false;  // sm_90a code only
  // TMA: 16-byte aligned bases and row strides, unit inner strides
  auto aligned = [](const at::Tensor& t) {
    return t.stride(1) == 1 && t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  return aligned(a) && aligned(u) && w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 &&
         (weight_kmajor ? w.size(1) : w.size(0)) % 8 == 0 && (weight_kmajor ? w.size(0) : w.size(1)) % 8 == 0;
}

at::Tensor lowrank_gemm_cuda(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                             const c10::optional<at::Tensor>& bias, double scale, bool weight_kmajor,
                             const c10::optional<at::Tensor>& seed, double p) {
  TORCH_CHECK(lowrank_gemm_supported(a, w, u, weight_kmajor), "lowrank_gemm: unsupported inputs");
  const int64_t N = weight_kmajor ? w.size(0) : w.size(1);
  TORCH_CHECK(w.size(weight_kmajor ? 1 : 0) == a.size(1), "lowrank_gemm: inner dimensions differ");
  TORCH_CHECK(u.size(0) == a.size(0) && b.size(0) == N && b.size(1) == u.size(1), "lowrank_gemm: factor shapes");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor bc = b.to(a.scalar_type()).contiguous();
  at::Tensor bias_c;
  if (bias.has_value()) bias_c = bias->to(a.scalar_type()).contiguous();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(bc.data_ptr()) % 16 == 0, "lowrank_gemm: B misaligned");
  at::Tensor out = at::empty({a.size(0), N}, a.options());
  if (a.size(0) == 0 || N == 0) return out;
  const at::Tensor* bp = bias.has_value() ? &bias_c : nullptr;
  const bool masked = seed.has_value() && p > 0.0;
  TORCH_CHECK(!masked || (seed->is_cuda() && seed->scalar_type() == at::kLong && seed->numel() == 1 &&
                          dropout_threshold(p) < (1u << 24)),
              "lowrank_gemm: seed must be one int64 on the GPU and p below 1 - 2^-25");
  const at::Tensor* sp = masked ? &*seed : nullptr;
  if (a.scalar_type() == at::kBFloat16) {
    if (weight_kmajor)
      LowRankGemm<cutlass::bfloat16_t, cutlass::layout::ColumnMajor>::run(a, w, u, bc, bp, scale, sp, p, out);
    else
      LowRankGemm<cutlass::bfloat16_t, cutlass::layout::RowMajor>::run(a, w, u, bc, bp, scale, sp, p, out);
  } else {
    if (weight_kmajor)
      LowRankGemm<cutlass::half_t, cutlass::layout::ColumnMajor>::run(a, w, u, bc, bp, scale, sp, p, out);
    else
      LowRankGemm<cutlass::half_t, cutlass::layout::RowMajor>::run(a, w, u, bc, bp, scale, sp, p, out);
  }
  return out;
}

}  // namespace lora_kernels
#endif  // LORA_KERNELS_WITH_CUTLASS
