// Argument checks shared by the CPU and CUDA implementations: each message names the argument.
#pragma once
#include <ATen/ATen.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>

namespace lora_kernels {

// An integer setting from the environment: `fallback` where it is unset or empty; otherwise the whole value must
// be an integer from lo to hi, or the error names the setting (a typo is not read as a silent default).
inline int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(*end == '\0' && errno == 0 && n >= lo && n <= hi, name, ": expected an integer from ", lo, " to ", hi,
              ", got ", v);
  return n;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kDouble,
              name, ": expected a floating dtype (float32, float16, bfloat16), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": on ", t.device(), ", expected ", ref.device());
}

// weight (N, K), lora_A (r, K), lora_B (N, r) with r >= 1.
inline void check_adapter(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B) {
  check_float(weight, "weight");
  check_float(A, "lora_A");
  check_float(B, "lora_B");
  TORCH_CHECK(weight.dim() == 2, "weight: expected shape (out_features, in_features), got ", weight.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == weight.size(1) && A.size(0) >= 1, "lora_A: expected shape (r >= 1, ",
              weight.size(1), "), got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0), "lora_B: expected shape (",
              weight.size(0), ", ", A.size(0), "), got ", B.sizes());
  check_same_device(A, weight, "lora_A");
  check_same_device(B, weight, "lora_B");
}

inline void check_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                         const c10::optional<at::Tensor>& bias) {
  check_adapter(weight, A, B);
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "x: expected shape (M, ", weight.size(1), "), got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "weight: dtype ", weight.scalar_type(), " differs from x's ",
              x.scalar_type());
  check_same_device(weight, x, "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape (", weight.size(0),
                "), got ", bias->sizes());
    check_same_device(*bias, x, "bias");
  }
}

}  // namespace lora_kernels
