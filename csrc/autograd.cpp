// lora_kernels::lora_linear: the whole LoRA linear as one op with its autograd rule in C++.
//
// Why: in eager mode each Python layer of a call costs host time, and at the sizes of a LoRA fine-tune
// (k/v projections of 4096 x 2048 -> 256 run in ~10 us of GPU time) the host is the bottleneck. Through
// this op a training step makes one dispatcher call in forward and runs no Python in backward. The
// kernels are the same linear_forward / linear_backward ops that the Python custom ops call, so eager and
// compiled results are bit-identical; torch.compile keeps tracing the Python custom ops (see ops.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

#include "ops.h"

namespace lora_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> linear_forward_op(const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& A, const at::Tensor& B, const OptTensor& bias,
                                                     double scaling, double p, const OptTensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_kernels::linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                                 double, double, const OptTensor&)>();
  return op.call(x, weight, A, B, bias, scaling, p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_op(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& xa, double scaling, bool need_dx, bool need_dbias, double p, const OptTensor& seed) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora_kernels::linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, double, bool, bool, double, const OptTensor&)>();
  return op.call(dy, x, weight, A, B, xa, scaling, need_dx, need_dbias, p, seed);
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// Function::apply describes every tensor input (device, dtype), so "no bias" travels as a 0-element tensor.
OptTensor bias_or_none(const at::Tensor& t) { return t.numel() > 0 ? OptTensor(t) : c10::nullopt; }

// The dropout seed, drawn as ops.draw_seed draws it (same generator, same call), so eager and compiled
// runs of one program drop the same elements.
at::Tensor draw_seed(const at::Tensor& like) {
  return at::randint(0, 2147483647, {}, like.options().dtype(at::kLong));
}

at::Tensor seed_op(const at::Tensor& like, const at::Tensor& /*salt*/) { return draw_seed(like); }

// On 2-D x (M, K). Saved: x, the frozen weight, the adapters and x·Aᵀ (M×r) in x's dtype, and the seed;
// never dropout(x). Small M on CUDA takes the decode kernel through the dispatcher; the rest calls the
// composite's pieces directly, so backward reuses the adapters' casts.
class LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& bias, double scaling,
                            double dropout_p) {
    const at::Tensor seed = dropout_p > 0.0 ? draw_seed(x) : at::Tensor();
    const bool parts = !(x.is_cuda() && x.size(0) <= kDecodeMaxRows);
    at::Tensor y;
    if (parts) {
      ForwardParts f = forward_parts(x, weight, lora_A, lora_B, bias_or_none(bias), scaling, dropout_p, opt(seed));
      ctx->save_for_backward({x, weight, f.A, f.B, f.xa, seed});
      y = f.y;
    } else {
      auto [out, xa] = linear_forward_op(x, weight, lora_A, lora_B, bias_or_none(bias), scaling, dropout_p, opt(seed));
      ctx->save_for_backward({x, weight, lora_A, lora_B, xa, seed});
      y = out;
    }
    ctx->saved_data["parts"] = parts;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["a_dtype"] = lora_A.scalar_type();
    ctx->saved_data["b_dtype"] = lora_B.scalar_type();
    ctx->saved_data["bias_dtype"] = bias.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &A = saved[2], &B = saved[3], &xa = saved[4];
    const bool need_dx = ctx->needs_input_grad(0), need_dbias = ctx->needs_input_grad(4);
    const double scaling = ctx->saved_data["scaling"].toDouble(), p = ctx->saved_data["dropout_p"].toDouble();
    const at::Tensor dy = grads[0].contiguous();
    auto [dx, dA, dB, dbias] =
        ctx->saved_data["parts"].toBool()
            ? backward_parts(dy, x, weight, A, B, xa, scaling, need_dx, need_dbias, p, opt(saved[5]),
                             ctx->saved_data["a_dtype"].toScalarType(), ctx->saved_data["b_dtype"].toScalarType())
            : linear_backward_op(dy, x, weight, A, B, xa, scaling, need_dx, need_dbias, p, opt(saved[5]));
    const auto bias_dtype = ctx->saved_data["bias_dtype"].toScalarType();
    return {need_dx ? dx : at::Tensor(), at::Tensor(),  dA, dB, need_dbias ? dbias.to(bias_dtype) : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// The forward alone on 2-D x, for calls with nothing to differentiate: the decode kernel for small M on
// CUDA, else the composite's pieces (no cast of x·Aᵀ to float32, which only a backward would read).
at::Tensor forward_only(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& lora_A,
                        const at::Tensor& lora_B, const OptTensor& bias, double scaling, double dropout_p) {
  const at::Tensor seed = dropout_p > 0.0 ? draw_seed(x2d) : at::Tensor();
  if (x2d.is_cuda() && x2d.size(0) <= kDecodeMaxRows)
    return std::get<0>(linear_forward_op(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, opt(seed)));
  return forward_parts(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, opt(seed)).y;
}

// x (..., K) is flattened to rows outside the autograd function, so its view is recorded by autograd
// and dx comes back in x's shape. With nothing to differentiate (no_grad, or no input that needs a
// gradient) the forward runs alone: no autograd node, no saved tensors (the node's bookkeeping was a
// share of the op's host time per eager call).
at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, const OptTensor& bias, double scaling, double dropout_p) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2, "x: expected shape (..., in_features), weight (out, in)");
  at::Tensor x2d = x.reshape({-1, x.size(-1)});
  if (x2d.stride(-1) != 1) x2d = x2d.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad() ||
                     (bias.has_value() && bias->requires_grad()));
  if (!grad) return forward_only(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p).view(sizes);
  const at::Tensor b = bias.has_value() ? *bias : at::empty({0}, x.options());
  return LoRALinearFunction::apply(x2d, weight, lora_A, lora_B, b, scaling, dropout_p).view(sizes);
}

// Below autograd (inference mode, or no tensor that needs a gradient): the forward alone.
at::Tensor lora_linear_inference(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const OptTensor& bias, double scaling, double dropout_p) {
  at::Tensor x2d = x.reshape({-1, x.size(-1)});
  if (x2d.stride(-1) != 1) x2d = x2d.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return forward_only(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p).view(sizes);
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling,"
        " float dropout_p=0.0) -> Tensor");
  // The dropout seed as a graph node of its own. salt (the layer's lora_A, not read) makes each layer's
  // draw a distinct node, so torch.compile's common-subexpression pass cannot merge the draws of layers
  // that share an input (they would share a mask); the tag says the same where torch honours it.
  m.def("seed(Tensor like, Tensor salt) -> Tensor", {at::Tag::nondeterministic_seeded});
}

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) { m.impl("lora_linear", &lora_kernels::lora_linear_autograd); }

TORCH_LIBRARY_IMPL(lora_kernels, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lora_kernels::lora_linear_inference);
  m.impl("seed", &lora_kernels::seed_op);
}
