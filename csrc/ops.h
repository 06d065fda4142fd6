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

// The composite forward's pieces: y, and x·Aᵀ, A and B in x's dtype. The C++ autograd path keeps them, so
// its backward neither casts the adapters again nor converts x·Aᵀ back.
struct ForwardParts {
  at::Tensor y, xa, A, B;
};
ForwardParts forward_parts(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, const c10::optional<at::Tensor>& bias, double scaling,
                           double dropout_p, const c10::optional<at::Tensor>& seed);

// The backward on those pieces (A, B, xa in x's dtype); dA and dB come back in a_dtype / b_dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_parts(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& xa, double scaling, bool need_dx, bool need_dbias, double dropout_p,
    const c10::optional<at::Tensor>& seed, at::ScalarType a_dtype, at::ScalarType b_dtype);

#ifdef LORA_KERNELS_WITH_CUDA
// cuda/lowrank.cu. dropout(x) (x itself when p = 0) and the adapters in x's dtype (themselves when they
// are already), in one launch.
struct PreparedInputs {
  at::Tensor x, A, B;
};
PreparedInputs prepare_lora_inputs_cuda(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                        double p, const c10::optional<at::Tensor>& seed);
// cuda/dropout.cu: out = dropout(x) with the shared mask, and the same mask put on y in place (x, out and y
// of one shape, contiguous), in one pass.
void dropout_pair_into(const at::Tensor& x, at::Tensor& out, at::Tensor& y, const at::Tensor& seed, double p);
// cuda/masked_lowrank.cu: dropout's mask applied inside the low-rank products (16-bit x, contiguous and
// 16-byte aligned, K a multiple of 8, ranks up to 32, sm_80+, p below 1 - 2^-25), dropout(x) never written.
bool masked_lowrank_supported(const at::Tensor& x, int64_t rank, double p);
// x·Aᵀ on dropout(x), in x's dtype (A in x's dtype). With y given ((M, N) of x's dtype, contiguous, 16-byte
// aligned, N a multiple of 8), the same launch also writes y = s·(x·Aᵀ)·Bᵀ + bias (B (N, r) and bias (N,) in
// x's dtype; bias may be null).
at::Tensor masked_xa_cuda(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& seed, double p,
                          at::Tensor* y = nullptr, const at::Tensor* B = nullptr, const at::Tensor* bias = nullptr,
                          double s = 0.0);
// Returns dA = s·gᵀ·dropout(x) in a_dtype (float32 or x's dtype) and, with dx given, writes dx = mask ⊙ s·g·A
// (g = dy·B, M×r, and A in x's dtype).
at::Tensor masked_lowrank_backward_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& lora_A,
                                        at::Tensor* dx, const at::Tensor& seed, double p, double s,
                                        at::ScalarType a_dtype);
#endif
// out = a·Wᵀ (weight_kmajor; W is N×K) or a·W (W is K×N), plus s·u·bᵀ (+ bias; b is N×r, bias in a's dtype)
// by cuBLAS: the low-rank product writes out first (bias and s in its epilogue), then the big GEMM accumulates
// into it (beta = 1) instead of a second full pass over out. out is (M, N), preallocated (contents ignored).
void lowrank_pair_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const at::Tensor& u,
                       const at::Tensor& b, const at::Tensor* bias, double scale, bool weight_kmajor);
#ifdef LORA_KERNELS_WITH_CUTLASS
// cuda/lowrank_gemm.cu (Hopper, sm_90a): out = a·Wᵀ + s·u·bᵀ + bias in one GEMM, the rank-r term its last K
// step. weight_kmajor: W is (N, K) (a forward's x·Wᵀ); otherwise W is (K, N) (a backward's dy·W). a and u
// (M×r) of one 16-bit dtype with unit inner stride, 16-byte aligned rows; r a multiple of 8 up to 256.
// config: -1 times the tile shapes built in and the cuBLAS pair (lowrank_pair_into) on a problem's first call
// and keeps the fastest; 0.. forces one tile shape (tests).
bool lowrank_gemm_supported(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, bool weight_kmajor);
at::Tensor lowrank_gemm_cuda(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                             const c10::optional<at::Tensor>& bias, double scale, bool weight_kmajor,
                             int64_t config = -1);
// lowrank_gemm_cuda without its argument checks, for callers that have made them (lowrank_gemm_supported and
// the shapes): ~1 µs of host per call less.
at::Tensor lowrank_gemm_checked(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                                const c10::optional<at::Tensor>& bias, double scale, bool weight_kmajor,
                                int64_t config = -1);
#endif

// dropout(x) with the shared mask: x·keep/(1-p), through the dispatcher (CPU or CUDA kernel).
at::Tensor apply_dropout(const at::Tensor& x, double p, const c10::optional<at::Tensor>& seed);

// Largest M served by the CUDA decode kernels (one pass over W for all rows): x's rows are the 8 columns of
// one tensor-core product per step up to 8 rows, its 16 rows from 9 to 16 (16-bit x and W); float32 or
// unaligned calls take an FMA kernel up to 2 rows (it re-read x per slice of W: 103 us at 16 rows for a
// 4096x4096 W on an H100, cuBLAS 9 us) and the composite path beyond.
constexpr int64_t kDecodeMaxRows = 16;
// Largest M served by the 4-bit decode kernel (cuda/decode.cu): x's rows are the 8 columns of one tensor-core
// product per step, so 1 to 8 rows cost one pass over W alike; the Triton paths serve the rest.
constexpr int64_t kNF4DecodeMaxRows = 8;

}  // namespace lora_kernels
