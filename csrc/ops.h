// Shared declarations between ops.cpp (schemas, CPU) and cuda/*.cu (CUDA implementations).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace lora_kernels {

// y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + bias and xa = dropout(x)·Aᵀ (float32), composed from ATen GEMMs
// (cuBLAS on CUDA). The dropout mask comes from (seed, row, col) through hash.h.
std::tuple<at::Tensor, at::Tensor> linear_forward_composite(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                            const c10::optional<at::Tensor>& bias, double scaling,
                                                            double dropout_p, const c10::optional<at::Tensor>& seed);

// dropout(x) with the shared mask: x·keep/(1-p), through the dispatcher (CPU or CUDA kernel).
at::Tensor apply_dropout(const at::Tensor& x, double p, const c10::optional<at::Tensor>& seed);

// Largest M served by the CUDA decode kernel (one pass over W for all rows). Each warp re-reads every
// row of x for each slice of W it loads, so x's L2 traffic is M times W's: at 16 rows the kernel ran
// 103 us for a 4096x4096 bf16 W on an H100 (cuBLAS: 9 us); past 2 rows the composite path is faster.
constexpr int64_t kDecodeMaxRows = 2;

}  // namespace lora_kernels
