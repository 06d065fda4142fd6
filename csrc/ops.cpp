// The C++ face of lora_kernels: op schemas, CPU implementations (ATen), shared argument checks.
// CUDA implementations register themselves from cuda/*.cu. The Python package calls these as its
// "cuda" backend; C++ users call them through the dispatcher (see examples/ in CMakeLists.txt).
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <atomic>
#include <cstdlib>
#include <string>
#include <ATen/core/dispatch/Dispatcher.h>

#include "checks.h"
#include "hash.h"
#include "ops.h"

namespace lora_kernels {

namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::ScalarType bits_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return at::kInt;
    case at::kDouble: return at::kLong;
    default: return at::kShort;  // float16, bfloat16
  }
}

// W ← round(W ± s·B·A): the product accumulated in float32, one rounding. Unmerge picks, among
// round(W - δ) and its two bit-neighbours, the first whose re-merge equals the merged W bit for bit.
void merge_weight_cpu(at::Tensor weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                      bool unmerge) {
  check_adapter(weight, lora_A, lora_B);
  TORCH_CHECK(weight.is_contiguous(), "weight: merge works in place and needs a contiguous weight");
  const auto acc = acc_type(weight.scalar_type());
  const auto dt = weight.scalar_type();
  at::Tensor delta = at::mm(lora_B.to(acc), lora_A.to(acc)).mul_(scaling);
  auto remerge = [&](const at::Tensor& w) { return w.to(acc).add(delta).to(dt); };
  if (!unmerge) {
    weight.copy_(remerge(weight));
    return;
  }
  const auto it = bits_type(dt);
  at::Tensor target = weight.view(it);
  at::Tensor base = weight.to(acc).sub(delta).to(dt);
  at::Tensor result = base.clone();
  at::Tensor found = remerge(base).view(it).eq(target);
  for (int step : {1, -1}) {
    at::Tensor cand = base.view(it).add(step).view(dt);
    at::Tensor ok = found.logical_not().logical_and(remerge(cand).view(it).eq(target));
    result = at::where(ok, cand, result);
    found = found.logical_or(ok);
  }
  weight.copy_(result);
}

// out = x·keep/(1-p), the mask from (seed, row, col); x is 2-D.
at::Tensor dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor, got ", x.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p: expected a value in [0, 1), got ", p);
  const int64_t s = seed.item<int64_t>();
  const uint32_t threshold = dropout_threshold(p);
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) kp[r * cols + c] = dropout_keep(s, r, c, threshold);
  });
  return at::where(keep, x * dropout_scale(p), at::zeros({}, x.options()));  // scaled as torch scales by a float
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, bool need_dx, bool need_dbias, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  check_linear(x, weight, lora_A, lora_B, c10::nullopt);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == weight.size(0), "dy: expected shape (",
              x.size(0), ", ", weight.size(0), "), got ", dy.sizes());
  const auto dt = x.scalar_type();
  return backward_parts(dy, x, weight, lora_A.to(dt), lora_B.to(dt), xa.to(dt), scaling, need_dx, need_dbias,
                        dropout_p, seed, lora_A.scalar_type(), lora_B.scalar_type());
}

// s·m1·m2 in out_dtype. For float32 adapters on CUDA, one cuBLAS call with a float32 output where torch
// has aten::addmm.dtype; otherwise the product in the inputs' dtype, then a cast. beta = 0: the
// uninitialised first argument is ignored (NaN-safe), the product is scaled in the GEMM's epilogue.
at::Tensor scaled_mm(const at::Tensor& m1, const at::Tensor& m2, double s, at::ScalarType out_dtype) {
  static std::atomic<int> fp32_out_works{-1};  // -1 not tried yet, 0 no, 1 yes
  if (out_dtype == at::kFloat && m1.scalar_type() != at::kFloat && m1.is_cuda() && fp32_out_works.load() != 0) {
    static const auto handle = c10::Dispatcher::singleton().findOp({"aten::addmm", "dtype"});
    if (handle.has_value()) {
      try {
        static const auto op = handle->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        at::ScalarType, const at::Scalar&, const at::Scalar&)>();
        at::Tensor out = op.call(at::empty({m1.size(0), m2.size(1)}, m1.options().dtype(at::kFloat)), m1, m2,
                                 at::kFloat, 0.0, s);
        fp32_out_works.store(1);
        return out;
      } catch (const std::exception&) {
        if (fp32_out_works.load() == 1) throw;  // it worked before: a real error, not a missing feature
      }
    }
    fp32_out_works.store(0);
  }
  return at::addmm(at::empty({m1.size(0), m2.size(1)}, m1.options()), m1, m2, 0.0, s).to(out_dtype);
}

// For torch.compile's graph (the Python autograd rule in _cuda_backend): the forward's pieces as the C++
// autograd path keeps them, so the compiled backward neither casts the adapters again nor converts x·Aᵀ back
// and forth (four launches per layer). (y, xa, A, B): xa in x's dtype; A and B are the adapters cast to x's
// dtype where theirs differs (fresh tensors), else 0-element tensors (an op's outputs may not alias its
// inputs): the rule then saves the adapters themselves.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward_saved(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const c10::optional<at::Tensor>& bias, double scaling, double dropout_p, const c10::optional<at::Tensor>& seed) {
  const auto dt = x.scalar_type();
  auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one per output: outputs may not alias
  if (x.is_cuda() && x.dim() == 2 && x.size(0) <= kDecodeMaxRows) {  // the decode kernels, as linear_forward
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lora_kernels::linear_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, double, double, const c10::optional<at::Tensor>&)>();
    auto [y, xa] = op.call(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed);
    return {y, xa.to(dt), none(), none()};  // the backward rounds x·Aᵀ to x's dtype as linear_backward does
  }
  ForwardParts f = forward_parts(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed);
  return {f.y, f.xa, lora_A.scalar_type() != dt ? f.A : none(), lora_B.scalar_type() != dt ? f.B : none()};
}

// linear_backward on linear_forward_saved's pieces: A and B as saved (cast or the adapters), dA and dB
// returned in the adapters' own dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_saved(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& xa, double scaling, bool need_dx, bool need_dbias, double dropout_p,
    const c10::optional<at::Tensor>& seed, at::ScalarType a_dtype, at::ScalarType b_dtype) {
  check_linear(x, weight, A, B, c10::nullopt);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == weight.size(0), "dy: expected shape (",
              x.size(0), ", ", weight.size(0), "), got ", dy.sizes());
  const auto dt = x.scalar_type();
  return backward_parts(dy, x, weight, A.to(dt), B.to(dt), xa.to(dt), scaling, need_dx, need_dbias, dropout_p, seed,
                        a_dtype, b_dtype);
}

}  // namespace

at::Tensor apply_dropout(const at::Tensor& x, double p, const c10::optional<at::Tensor>& seed) {
  if (p == 0.0 || !seed.has_value()) return x;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_kernels::dropout", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, *seed, p);
}

// The masked x·Aᵀ kernel writes y's low-rank term itself only for narrow outputs: each block walks its 16
// rows' N columns with one dependent L2 load of B per step, so at N = 2048 the launch took 4.5 µs more than
// the cuBLAS product it replaces and at 5632 19 µs more, while at 256 it saved 1.3 µs and a launch (H100,
// 4096 rows, bench/NOTES.md "Session of 2026-12-07, second").
constexpr int64_t kLowRankOutMaxN = 512;

#ifdef LORA_KERNELS_WITH_CUTLASS
// The one-GEMM forms (cuda/lowrank_gemm.cu) where they take the inputs, unless LORA_KERNELS_CUTLASS=0; otherwise
// the pair: the low-rank product, then the big GEMM with beta = 1. From 512 rows by default: below, the pair
// (cuBLAS's split-K tiles) measured faster at every shape tried on an H100 (bench/NOTES.md);
// LORA_KERNELS_CUTLASS_MIN_ROWS moves the threshold (A/B runs). Both read once per process.
bool lowrank_gemm_enabled(int64_t rows) {
  static const bool on = [] {
    const char* v = std::getenv("LORA_KERNELS_CUTLASS");
    return v == nullptr || std::string(v) != "0";
  }();
  static const int64_t min_rows = env_int("LORA_KERNELS_CUTLASS_MIN_ROWS", 512, 1, INT64_MAX);
  return on && rows >= min_rows;
}
#endif

void lowrank_pair_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const at::Tensor& u,
                       const at::Tensor& b, const at::Tensor* bias, double scale, bool weight_kmajor) {
  if (bias != nullptr)
    at::addmm_out(out, *bias, u, b.t(), /*beta=*/1.0, /*alpha=*/scale);
  else
    at::addmm_out(out, out, u, b.t(), /*beta=*/0.0, /*alpha=*/scale);  // beta = 0: out's contents are ignored
  out.addmm_(a, weight_kmajor ? w.t() : w);
}

namespace {
// out = a·w(ᵀ) + s·u·bᵀ (+ bias) on the GPU: the one-GEMM kernel where it serves, which itself falls back to
// the pair where timing shows the pair faster; otherwise the pair.
at::Tensor lowrank_out(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                       const c10::optional<at::Tensor>& bias, double scale, bool weight_kmajor) {
#ifdef LORA_KERNELS_WITH_CUTLASS
  if (lowrank_gemm_enabled(a.size(0)) && lowrank_gemm_supported(a, w, u, weight_kmajor))
    return lowrank_gemm_checked(a, w, u, b, bias, scale, weight_kmajor);  // shapes checked by the op's caller
#endif
  at::Tensor out = at::empty({a.size(0), weight_kmajor ? w.size(0) : w.size(1)}, a.options());
  const at::Tensor bias_t = bias.has_value() ? bias->to(a.scalar_type()) : at::Tensor();
  lowrank_pair_into(out, a, w, u, b, bias.has_value() ? &bias_t : nullptr, scale, weight_kmajor);
  return out;
}
}  // namespace

ForwardParts forward_parts(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, const c10::optional<at::Tensor>& bias, double scaling,
                           double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_linear(x, weight, lora_A, lora_B, bias);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a value in [0, 1), got ", dropout_p);
  const auto dt = x.scalar_type();
  at::Tensor xd, A, B, xa, y;
#ifdef LORA_KERNELS_WITH_CUDA
  if (x.is_cuda() && dt != at::kDouble && x.is_contiguous() && lora_A.scalar_type() == lora_B.scalar_type() &&
      (lora_A.scalar_type() == dt || lora_A.scalar_type() == at::kFloat)) {
    // With the masked kernel, the launch below only casts the adapters (none when they are in x's dtype).
    const bool masked =
        dropout_p > 0.0 && seed.has_value() && masked_lowrank_supported(x, lora_A.size(0), dropout_p);
    PreparedInputs in =
        prepare_lora_inputs_cuda(x, lora_A.contiguous(), lora_B.contiguous(), masked ? 0.0 : dropout_p, seed);
    xd = in.x, A = in.A, B = in.B;
    if (masked && weight.size(0) % 8 == 0 && weight.size(0) <= kLowRankOutMaxN) {
      // x·Aᵀ and the low-rank output s·(x·Aᵀ)·Bᵀ + bias from one launch (no cuBLAS call reading x·Aᵀ back)
      y = at::empty({x.size(0), weight.size(0)}, x.options());
      const at::Tensor bias_t = bias.has_value() ? bias->to(dt).contiguous() : at::Tensor();
      xa = masked_xa_cuda(x, A, *seed, dropout_p, &y, &B, bias.has_value() ? &bias_t : nullptr, scaling);
    } else if (masked) {
      xa = masked_xa_cuda(x, A, *seed, dropout_p);
    }
  } else
#endif
  {
    A = lora_A.to(dt), B = lora_B.to(dt);  // no copy when the adapters are in x's dtype
    xd = apply_dropout(x, dropout_p, seed);
  }
  if (!xa.defined()) xa = at::mm(xd, A.t());
  if (y.defined())  // the masked kernel wrote the low-rank term and the bias; the big GEMM accumulates into it
    y.addmm_(x, weight.t());
  else
    y = lowrank_out(x, weight, xa, B, bias, scaling, /*weight_kmajor=*/true);
  return {y, xa, A, B};
}

std::tuple<at::Tensor, at::Tensor> linear_forward_composite(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                            const c10::optional<at::Tensor>& bias, double scaling,
                                                            double dropout_p, const c10::optional<at::Tensor>& seed) {
  ForwardParts parts = forward_parts(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed);
  return {parts.y, parts.xa.to(acc_type(x.scalar_type()))};  // exact: xa holds values of x's dtype
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_parts(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& xa, double scaling, bool need_dx, bool need_dbias, double dropout_p,
    const c10::optional<at::Tensor>& seed, at::ScalarType a_dtype, at::ScalarType b_dtype) {
  // g = dy·B unscaled: s enters through the GEMMs' alpha / beta (no separate pass, one rounding fewer).
  const at::Tensor g = at::mm(dy, B);
#ifdef LORA_KERNELS_WITH_CUDA
  const bool on_gpu = g.is_cuda() && g.scalar_type() != at::kDouble;
#else
  const bool on_gpu = false;
#endif
  // dx = dy·W + s·g·A. Without dropout on the GPU: lowrank_out (one GEMM, or cuBLAS's pair). With dropout, the
  // low-rank part carries the forward's mask and 1/(1-p), so it is written first and dy·W accumulated into it
  // by the big GEMM (no separate add over dx): the masked kernel writes it and dA from one read of x (16-bit
  // x, rank <= 32); otherwise cuBLAS writes s·g·A and one pass puts the mask on it in place while it writes
  // dropout(x) for cuBLAS's dA.
  const bool masked_dx = need_dx && on_gpu && dropout_p > 0.0 && seed.has_value();
  at::Tensor dx = masked_dx ? at::empty({g.size(0), A.size(1)}, g.options()) : dy.new_empty({0});
  at::Tensor xd, dA;
#ifdef LORA_KERNELS_WITH_CUDA
  const at::Tensor xc = on_gpu && dropout_p > 0.0 && seed.has_value() ? x.contiguous() : x;
  if (on_gpu && dropout_p > 0.0 && seed.has_value() && g.scalar_type() == x.scalar_type() &&
      masked_lowrank_supported(xc, A.size(0), dropout_p))
    dA = masked_lowrank_backward_cuda(xc, g, A, masked_dx ? &dx : nullptr, *seed, dropout_p, scaling, a_dtype);
  if (!dA.defined() && masked_dx) {
    at::addmm_out(dx, dx, g, A, /*beta=*/0.0, /*alpha=*/scaling);
    xd = at::empty(x.sizes(), x.options());
    dropout_pair_into(xc, xd, dx, *seed, dropout_p);
  }
#endif
  if (!dA.defined()) {
    if (!xd.defined()) xd = apply_dropout(x, dropout_p, seed);
    dA = scaled_mm(g.t(), xd, scaling, a_dtype);
  }
  at::Tensor dB = scaled_mm(dy.t(), xa, scaling, b_dtype);
  if (masked_dx) {
    dx.addmm_(dy, weight);
  } else if (need_dx && on_gpu) {
    dx = lowrank_out(dy, weight, g, A.t(), c10::nullopt, scaling, /*weight_kmajor=*/false);
  } else if (need_dx) {
    dx = apply_dropout(at::mm(g, A), dropout_p, seed);
    dx.addmm_(dy, weight, /*beta=*/scaling, /*alpha=*/1.0);
  }
  at::Tensor dbias = need_dbias ? dy.sum(0) : dy.new_empty({0});
  return {dx, dA, dB, dbias};
}

}  // namespace lora_kernels

TORCH_LIBRARY(lora_kernels, m) {
  m.def("merge_weight_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling, bool unmerge) -> ()");
  m.def("linear_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling,"
        " float dropout_p=0.0, Tensor? seed=None) -> (Tensor, Tensor)");
  m.def("linear_backward(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa,"
        " float scaling, bool need_dx, bool need_dbias, float dropout_p=0.0, Tensor? seed=None)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_forward_saved(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling,"
        " float dropout_p=0.0, Tensor? seed=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_backward_saved(Tensor dy, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor xa, float scaling,"
        " bool need_dx, bool need_dbias, float dropout_p, Tensor? seed, ScalarType a_dtype, ScalarType b_dtype)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout(Tensor x, Tensor seed, float p) -> Tensor");
#ifdef LORA_KERNELS_WITH_CUTLASS
  // CUDA only (sm_90a): a·Wᵀ (weight_kmajor) or a·W, plus scale·u·bᵀ + bias, in one GEMM (cuda/lowrank_gemm.cu).
  m.def("lowrank_gemm(Tensor a, Tensor weight, Tensor u, Tensor b, Tensor? bias, float scale, bool weight_kmajor,"
        " int config=-1) -> Tensor");
#endif
  // CUDA only: the 4-bit (NF4) forward for 1 to 4 rows (cuda/decode.cu); the Python layer picks it by timing.
  m.def("nf4_decode(Tensor x, Tensor packed, Tensor absmax, Tensor code, int N, Tensor lora_A, Tensor lora_B,"
        " Tensor? bias, float scaling, Tensor? code2=None, Tensor? absmax2=None, float offset=0.0)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("merge_weight_", &lora_kernels::merge_weight_cpu);
  m.impl("linear_forward", &lora_kernels::linear_forward_composite);
  m.impl("linear_backward", &lora_kernels::linear_backward);
  m.impl("dropout", &lora_kernels::dropout_cpu);
  m.impl("linear_forward_saved", &lora_kernels::linear_forward_saved);
  m.impl("linear_backward_saved", &lora_kernels::linear_backward_saved);
}

#ifdef LORA_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("linear_backward", &lora_kernels::linear_backward);
  m.impl("linear_forward_saved", &lora_kernels::linear_forward_saved);
  m.impl("linear_backward_saved", &lora_kernels::linear_backward_saved);
#ifdef LORA_KERNELS_WITH_CUTLASS
  m.impl("lowrank_gemm", &lora_kernels::lowrank_gemm_cuda);
#endif
}
#endif

#ifdef LORA_KERNELS_PYTHON_MODULE
// An importable module (lora_kernels._C) whose loading registers the ops above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "lora_kernels C++/CUDA ops", -1, nullptr};
  return PyModule_Create(&def);
}
#endif
