// run_lowrank_config<LORA_KERNELS_LOWRANK_CONFIG>: the one-GEMM kernel at one tile shape of LowRankConfigs, for
// both 16-bit dtypes and both weight layouts. Each lowrank_gemm_config<I>.cu includes this with its I.
#pragma once
#include "lowrank_gemm.cuh"

#ifdef LORA_KERNELS_WITH_CUTLASS
namespace lora_kernels {
template <>
void run_lowrank_config<LORA_KERNELS_LOWRANK_CONFIG>(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u,
                                                     const at::Tensor& v, const at::Tensor* bias, bool weight_kmajor,
                                                     at::Tensor& out) {
  using Config = std::tuple_element_t<LORA_KERNELS_LOWRANK_CONFIG, LowRankConfigs>;
  using cutlass::layout::ColumnMajor, cutlass::layout::RowMajor;
  if (a.scalar_type() == at::kBFloat16) {
    if (weight_kmajor)
      lowrank::LowRankGemm<cutlass::bfloat16_t, ColumnMajor, Config>::run(a, w, u, v, bias, out);
    else
      lowrank::LowRankGemm<cutlass::bfloat16_t, RowMajor, Config>::run(a, w, u, v, bias, out);
  } else {
    if (weight_kmajor)
      lowrank::LowRankGemm<cutlass::half_t, ColumnMajor, Config>::run(a, w, u, v, bias, out);
    else
      lowrank::LowRankGemm<cutlass::half_t, RowMajor, Config>::run(a, w, u, v, bias, out);
  }
}
}  // namespace lora_kernels
#endif
