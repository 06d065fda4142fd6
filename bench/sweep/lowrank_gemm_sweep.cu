// Tile / cluster / schedule variants of the one-GEMM kernel (csrc/cuda/lowrank_gemm.cu), bf16 forward form only,
// for bench/sweep/lowrank_gemm_sweep.py: the package builds four (LowRankConfigs); this module builds nine,
// three of them with CUTLASS's stream-K scheduler (K split over the GPU's blocks: the few-row problems).
#include "cuda/lowrank_gemm.cuh"

#include <torch/extension.h>

namespace lora_kernels {
namespace {
template <int TM, int TN, int CM, int CN, bool kCooperative>
using SweepConfig = lowrank::GemmConfig<TM, TN, CM, CN, kCooperative>;
template <int TM, int TN, int CM, int CN>
using StreamKConfig = lowrank::GemmConfig<TM, TN, CM, CN, true, cutlass::gemm::StreamKScheduler>;

template <class Config>
void run_config(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& v, at::Tensor& out) {
  lowrank::LowRankGemm<cutlass::bfloat16_t, cutlass::layout::ColumnMajor, Config>::run(a, w, u, v, nullptr, out);
}

const char* kNames[] = {"pingpong 128x128 c2x1", "pingpong 128x128 c1x2", "cooperative 256x128 c2x1",
                        "cooperative 128x256 c2x1", "cooperative 128x256 c1x2", "pingpong 64x256 c2x1",
                        "stream-K 128x128 c1x1", "stream-K 128x64 c1x1", "stream-K 128x128 c2x1"};

// out = a·wᵀ + u·vᵀ (v already scaled; N×R)
at::Tensor sweep_gemm(int64_t config, const at::Tensor& a, const at::Tensor& w, const at::Tensor& u,
                      const at::Tensor& v) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && a.is_cuda(), "sweep: bf16 CUDA tensors");
  at::Tensor out = at::empty({a.size(0), w.size(0)}, a.options());
  switch (config) {
    case 0: run_config<SweepConfig<128, 128, 2, 1, false>>(a, w, u, v, out); break;
    case 1: run_config<SweepConfig<128, 128, 1, 2, false>>(a, w, u, v, out); break;
    case 2: run_config<SweepConfig<256, 128, 2, 1, true>>(a, w, u, v, out); break;
    case 3: run_config<SweepConfig<128, 256, 2, 1, true>>(a, w, u, v, out); break;
    case 4: run_config<SweepConfig<128, 256, 1, 2, true>>(a, w, u, v, out); break;
    case 5: run_config<SweepConfig<64, 256, 2, 1, false>>(a, w, u, v, out); break;
    case 6: run_config<StreamKConfig<128, 128, 1, 1>>(a, w, u, v, out); break;
    case 7: run_config<StreamKConfig<128, 64, 1, 1>>(a, w, u, v, out); break;
    case 8: run_config<StreamKConfig<128, 128, 2, 1>>(a, w, u, v, out); break;
    default: TORCH_CHECK(false, "sweep: no config ", config);
  }
  return out;
}
}  // namespace
}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sweep_gemm", &lora_kernels::sweep_gemm);
  m.def("names", [] { return std::vector<std::string>(std::begin(lora_kernels::kNames), std::end(lora_kernels::kNames)); });
}
