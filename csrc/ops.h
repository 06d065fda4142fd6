// Shared declarations between ops.cpp (schemas, CPU) and cuda/*.cu (CUDA implementations).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace lora_kernels {

// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias and xa = x·Aᵀ (float32), composed from ATen GEMMs (cuBLAS on CUDA).
std::tuple<at::Tensor, at::Tensor> linear_forward_composite(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                            const c10::optional<at::Tensor>& bias, double scaling);

// Largest M served by the CUDA decode kernel (one pass over W for all rows).
constexpr int64_t kDecodeMaxRows = 16;

}  // namespace lora_kernels
