// The one-GEMM LoRA kernel's CUTLASS types (Hopper, sm_90a): y = a·wᵀ (or a·w) + u·vᵀ + bias, the rank-R term
// as the main loop's last K step. Included by the files that instantiate it, one tile shape each
// (lowrank_gemm_config.cuh), so that the shapes compile in parallel; lowrank_gemm.cu picks one per problem.
#pragma once
#ifdef LORA_KERNELS_WITH_CUTLASS
// CUTLASS's device-side asserts become calls that serialise the wgmma pipeline (ptxas C7510).
#ifndef NDEBUG
#define NDEBUG
#endif
// torch's extension flags hide cuda_fp16's operators, which CUTLASS's numeric types use.
#undef __CUDA_NO_HALF_OPERATORS__
#undef __CUDA_NO_HALF_CONVERSIONS__
#undef __CUDA_NO_BFLOAT16_CONVERSIONS__
#undef __CUDA_NO_HALF2_OPERATORS__

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "cutlass/cuda_host_adapter.hpp"

#include "../checks.h"

// CUTLASS looks the driver's cuTensorMapEncodeTiled up (cudaGetDriverEntryPoint) for every TMA descriptor it
// encodes, five per launch here; resolve it once instead (host time per call is what small layers pay).
namespace lora_kernels::driver {
template <class... Args>
CUresult cached_cuTensorMapEncodeTiled(Args... args) {
  static const auto fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status);
    return err == cudaSuccess && status == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p)
               : nullptr;
  }();
  return fn != nullptr ? fn(args...) : CUDA_ERROR_NOT_FOUND;
}
}  // namespace lora_kernels::driver
#undef CUTLASS_CUDA_DRIVER_WRAPPER_CALL
#define CUTLASS_CUDA_DRIVER_WRAPPER_CALL(func) lora_kernels::driver::cached_##func

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace lora_kernels {
namespace lowrank {
using namespace cute;

// The tile scheduler's swizzle (tiles of up to this many rows of tiles visited together, for L2 reuse of the
// operands): LORA_KERNELS_CUTLASS_SWIZZLE, read once, for A/B runs; CUTLASS's default 1 otherwise.
inline int tile_swizzle() {
  static const int swizzle = int(env_int("LORA_KERNELS_CUTLASS_SWIZZLE", 1, 1, 8));  // CUTLASS takes 1, 2, 4, 8
  return swizzle;
}

// LORA_KERNELS_CUTLASS_RASTER (read once; A/B runs of the tile order): 0, the default, is CUTLASS's own choice
// (along M where the output has more tile columns than tile rows, else along N), 1 along M, 2 along N. A plain
// CUTLASS GEMM of 8192×4096² read 1.13-1.18× cuBLAS on an H100 with the default order (bench/NOTES.md).
inline int tile_raster() {
  static const int raster = int(env_int("LORA_KERNELS_CUTLASS_RASTER", 0, 0, 2));
  return raster;
}

// Ranks past this take the cuBLAS pair (each 64 ranks cost one more K step of the tile).
constexpr int kMaxRank = 256;

// CUTLASS's TMA warp-specialised mainloop with the rank-R term as its last K step(s): the problem's K is a's K
// rounded up to the tile's K plus ceil(R / tile K) tiles more, and for those the producer warp loads u's and v's
// tiles (TMA, zero-filled past R) into the same pipeline stages that a's and w's tiles use. The consumer warp
// groups run the base mainloop unchanged, so acc = a·wᵀ + u·vᵀ costs one extra K step of tensor-core work and
// the epilogue is CUTLASS's own (bias only). The scale s is folded into v by the caller.
template <class Base>
struct LowRankTailMainloop : Base {
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using GmemTiledCopyA = typename Base::GmemTiledCopyA;
  using GmemTiledCopyB = typename Base::GmemTiledCopyB;

  struct Arguments : Base::Arguments {
    ElementA const* ptr_U = nullptr;  // M×R, the A operand's layout
    StrideA dU{};
    ElementB const* ptr_V = nullptr;  // N×R in the B operand's layout (K-major: N×R rows; MN-major: R×N rows)
    StrideB dV{};
    int k_main = 0;                   // a's and w's K (the problem's K adds the tail's tiles)
    int rank = 0;
  };
  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_u;
    typename Base::Params::TMA_B tma_load_v;
    int k_tiles_main = 0;
    int rank = 0;
  };

  static constexpr int kTileK = size<2>(TileShape{});
  static int problem_k(int k_main, int rank) {
    return (k_main + kTileK - 1) / kTileK * kTileK + (rank + kTileK - 1) / kTileK * kTileK;
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    Params p{Base::to_underlying_arguments(make_shape(M, N, args.k_main, L), args, workspace),
             make_tma_copy_A_sm90(GmemTiledCopyA{},
                                  make_tensor(reinterpret_cast<typename Base::InternalElementA const*>(args.ptr_U),
                                              make_layout(make_shape(M, args.rank, L), args.dU)),
                                  SmemLayoutA{}(_, _, Int<0>{}), TileShape{}, ClusterShape{}),
             make_tma_copy_B_sm90(GmemTiledCopyB{},
                                  make_tensor(reinterpret_cast<typename Base::InternalElementB const*>(args.ptr_V),
                                              make_layout(make_shape(N, args.rank, L), args.dV)),
                                  SmemLayoutB{}(_, _, Int<0>{}), TileShape{}, ClusterShape{}),
             (args.k_main + kTileK - 1) / kTileK, args.rank};
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    return args.rank > 0 && int(K) == problem_k(args.k_main, args.rank) &&
           Base::can_implement(make_shape(M, N, args.k_main, L), args) &&
           Base::can_implement(make_shape(M, N, args.rank, L), args);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_u.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_v.get_tma_descriptor());
  }

  // (a, w over the problem's K, whose tail tiles are never read from them; u, v over R)
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto [M, N, K, L] = problem_shape_MNKL;
    auto ab = Base::load_init(problem_shape_MNKL, params);
    Tensor gU = local_tile(params.tma_load_u.get_tma_tensor(make_shape(M, params.rank, L)), TileShape{},
                           make_coord(_, _, _), Step<_1, Underscore, _1>{});  // (BLK_M,BLK_K,m,k,l)
    Tensor gV = local_tile(params.tma_load_v.get_tma_tensor(make_shape(N, params.rank, L)), TileShape{},
                           make_coord(_, _, _), Step<Underscore, _1, _1>{});  // (BLK_N,BLK_K,n,k,l)
    return cute::make_tuple(get<0>(ab), get<1>(ab), gU, gV);
  }

  // The producer: Base::load's loop, its K steps past a's tiles reading u's and v's instead.
  template <class TensorA, class TensorB, class TensorU, class TensorV, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorU, TensorV> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)
    constexpr uint32_t cluster_x = get<0>(ClusterShape{});
    const uint2 cluster_id = {block_rank_in_cluster % cluster_x, block_rank_in_cluster / cluster_x};
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    auto tma_a = params.tma_load_a.get_slice(cluster_id.y), tma_u = params.tma_load_u.get_slice(cluster_id.y);
    auto tma_b = params.tma_load_b.get_slice(cluster_id.x), tma_v = params.tma_load_v.get_slice(cluster_id.x);
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));  // (TMA,TMA_M,TMA_K,k)
    Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tUgU = tma_u.partition_S(get<2>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tVgV = tma_v.partition_S(get<3>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAsA = tma_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE); u's tiles land in the same stages
    Tensor tBsB = tma_b.partition_D(sB);
    // the multicast masks: a's (and u's) tile goes to the cluster's blocks of one row, w's (v's) of one column
    uint16_t mcast_a = 0, mcast_b = 0;
    auto block_layout = Layout<ClusterShape>{};  // (m,n) -> block id
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>)
      for (int n = 0; n < size<1>(block_layout); ++n) mcast_a |= uint16_t(1) << block_layout(cluster_id.x, n, Int<0>{});
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>)
      for (int m = 0; m < size<0>(block_layout); ++m) mcast_b |= uint16_t(1) << block_layout(m, cluster_id.y, Int<0>{});
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++k_tile_iter) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k = int(*k_tile_iter);
      if (k < params.k_tiles_main) {
        copy(params.tma_load_a.with(*barrier, mcast_a), tAgA(_, _, _, k), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(*barrier, mcast_b), tBgB(_, _, _, k), tBsB(_, _, _, stage));
      } else {
        copy(params.tma_load_u.with(*barrier, mcast_a), tUgU(_, _, _, k - params.k_tiles_main), tAsA(_, _, _, stage));
        copy(params.tma_load_v.with(*barrier, mcast_b), tVgV(_, _, _, k - params.k_tiles_main), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }
};

// The kernel's shape: tile, cluster and schedule (the mainloop's and the epilogue's must agree), and the tile
// scheduler (void: CUTLASS's persistent one; StreamKScheduler: K split over blocks, cooperative only).
template <int TM, int TN, int CM, int CN, bool kCooperative, class Scheduler = void>
struct GemmConfig {
  using TileScheduler = Scheduler;
  using TileShape = Shape<Int<TM>, Int<TN>, _64>;
  using ClusterShape = Shape<Int<CM>, Int<CN>, _1>;
  using KernelSchedule = std::conditional_t<kCooperative, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                            cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using EpilogueSchedule = std::conditional_t<kCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                              cutlass::epilogue::TmaWarpSpecialized>;
};
using PingpongConfig = GemmConfig<128, 128, 2, 1, false>;

// WeightLayout: ColumnMajor for x·Wᵀ with W (N×K) row-major; RowMajor for dy·W with W as the (K_out × N) operand.
template <class T, class WeightLayout, class Config = PingpongConfig>
struct LowRankGemm {
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  static constexpr int kAlign = 8;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlign, T,
      cutlass::layout::RowMajor, kAlign, typename Config::EpilogueSchedule,
      cutlass::epilogue::fusion::LinCombPerColBias<T, float, T>>::CollectiveOp;
  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, cutlass::layout::RowMajor, kAlign, T, WeightLayout,
      kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;
  using Mainloop = LowRankTailMainloop<BaseMainloop>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      typename Config::TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // out = a·w(ᵀ) + u·vᵀ + bias, v already scaled (N×R, or R×N for the RowMajor weight)
  static void run(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& v,
                  const at::Tensor* bias, at::Tensor& out) {
    const int M = int(a.size(0)), K = int(a.size(1)), N = int(out.size(1)), R = int(u.size(1));
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    constexpr bool kKMajorB = std::is_same_v<WeightLayout, cutlass::layout::ColumnMajor>;
    StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, make_shape(M, K, 1));
    get<0>(sa) = a.stride(0);
    StrideA su = cutlass::make_cute_packed_stride(StrideA{}, make_shape(M, R, 1));
    get<0>(su) = u.stride(0);
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K, 1));
    StrideB sv = cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, R, 1));
    get<kKMajorB ? 0 : 1>(sv) = v.stride(0);
    StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(M, N, 1));
    typename Mainloop::Arguments ml;
    static_cast<typename BaseMainloop::Arguments&>(ml) = {reinterpret_cast<const T*>(a.data_ptr()), sa,
                                                          reinterpret_cast<const T*>(w.data_ptr()), sb};
    ml.ptr_U = reinterpret_cast<const T*>(u.data_ptr()), ml.dU = su;
    ml.ptr_V = reinterpret_cast<const T*>(v.data_ptr()), ml.dV = sv;
    ml.k_main = K, ml.rank = R;
    typename Epilogue::Arguments ep{};
    ep.thread.alpha = 1.f, ep.thread.beta = 0.f;
    ep.thread.bias_ptr = bias != nullptr ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
    ep.ptr_D = reinterpret_cast<T*>(out.data_ptr()), ep.dD = sd;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, Mainloop::problem_k(K, R), 1}, ml, ep};
    args.hw_info.device_id = a.get_device();
    args.hw_info.sm_count = at::cuda::getDeviceProperties(a.get_device())->multiProcessorCount;
    args.scheduler.max_swizzle_size = tile_swizzle();
    using RasterOrder = decltype(args.scheduler.raster_order);
    const int raster = tile_raster();
    args.scheduler.raster_order = raster == 1 ? RasterOrder::AlongM : raster == 2 ? RasterOrder::AlongN : RasterOrder::Heuristic;
    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
                "lowrank_gemm: the CUTLASS kernel cannot take these shapes / strides");
    const size_t ws_bytes = Gemm::get_workspace_size(args);
    at::Tensor ws;  // stream-K's partial tiles and flags; none for the persistent scheduler
    if (ws_bytes > 0) ws = at::empty({int64_t(ws_bytes)}, a.options().dtype(at::kByte));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(args, ws_bytes > 0 ? ws.data_ptr() : nullptr, stream) == cutlass::Status::kSuccess,
                "lowrank_gemm: CUTLASS initialize failed");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "lowrank_gemm: CUTLASS launch failed");
  }
};

}  // namespace lowrank

// The shapes built into the package (bench/sweep/lowrank_gemm_sweep.py times more): none wins everywhere on an
// H100 (bench/NOTES.md), so lowrank_gemm.cu times the first kPickedConfigs of them, and the cuBLAS pair, on a
// problem's first call. The stream-K shape (K split over the GPU's blocks, for few rows: at 256 rows 128×128
// tiles give 128 output tiles for 132 SMs, each walking all of K) runs only where forced or with
// LORA_KERNELS_CUTLASS_STREAMK=1: its 128×64 tiles read 1.02× cuBLAS at 256×4096² in the sweep, but 1.16× in the
// package, no better than the pair, on an H100 (bench/NOTES.md, 2026-12-08).
using LowRankConfigs = std::tuple<lowrank::GemmConfig<128, 128, 2, 1, false>, lowrank::GemmConfig<128, 128, 1, 2, false>,
                                  lowrank::GemmConfig<256, 128, 2, 1, true>,
                                  lowrank::GemmConfig<128, 64, 1, 1, true, cutlass::gemm::StreamKScheduler>>;
constexpr int kLowRankConfigs = std::tuple_size_v<LowRankConfigs>;
constexpr int kPickedConfigs = 3;
inline const char* const kLowRankConfigNames[] = {"ping-pong 128x128, cluster 2x1", "ping-pong 128x128, cluster 1x2",
                                                   "cooperative 256x128, cluster 2x1",
                                                   "cooperative 128x64, stream-K"};

// out = a·wᵀ (weight_kmajor) or a·w, + u·vᵀ + bias with config I (16-bit a; v scaled, in the weight's layout).
// Defined in lowrank_gemm_config<I>.cu.
template <int I>
void run_lowrank_config(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& v,
                        const at::Tensor* bias, bool weight_kmajor, at::Tensor& out);
}  // namespace lora_kernels
#endif  // LORA_KERNELS_WITH_CUTLASS
