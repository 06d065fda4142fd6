// Calls the lora_kernels ops from C++ through the dispatcher and checks them against plain ATen math.
// Exit code 0 when every check passes; runs on the GPU too when one is present.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>

static bool check(const char* what, double err, double tol) {
  std::printf("%-40s max error %.3e (tolerance %.1e) %s\n", what, err, tol, err <= tol ? "ok" : "FAILED");
  return err <= tol;
}

static bool run_on(const at::Device& dev) {
  std::printf("-- device %s\n", dev.str().c_str());
  auto opts = at::TensorOptions().device(dev).dtype(at::kFloat);
  const int64_t M = 5, K = 72, N = 40, r = 8;
  at::Tensor x = at::randn({M, K}, opts), w = at::randn({N, K}, opts) / 8;
  at::Tensor A = at::randn({r, K}, opts) / 8, B = at::randn({N, r}, opts), bias = at::randn({N}, opts);
  const double s = 0.5;

  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("lora_kernels::linear_forward", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, const std::optional<at::Tensor>&,
                                                          double, double, const std::optional<at::Tensor>&)>();
  auto [y, xa] = fwd.call(x, w, A, B, bias, s, 0.0, std::nullopt);
  at::Tensor expect = at::addmm(bias, x, w.t()) + s * at::mm(at::mm(x, A.t()), B.t());
  bool ok = check("linear_forward vs ATen", (y - expect).abs().max().item<double>(), 1e-4);

  auto merge = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("lora_kernels::merge_weight_", "")
                   .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, double, bool)>();
  at::Tensor wm = w.clone();
  merge.call(wm, A, B, s, false);
  ok &= check("merge_weight_ vs W + s·B·A", (wm - (w + s * at::mm(B, A))).abs().max().item<double>(), 1e-5);
  at::Tensor merged = wm.clone();
  merge.call(wm, A, B, s, true);
  at::Tensor unmerged = wm.clone();
  merge.call(wm, A, B, s, false);
  ok &= check("re-merge bit-equal (0 = equal)", at::equal(wm, merged) ? 0.0 : 1.0, 0.0);
  ok &= check("unmerge vs original W", (unmerged - w).abs().max().item<double>(), 1e-5);
  return ok;
}

int main() {
  at::manual_seed(0);
  bool ok = run_on(at::Device(at::kCPU));
#ifdef LORA_KERNELS_WITH_CUDA
  if (torch::cuda::is_available()) ok &= run_on(at::Device(at::kCUDA));
#else
  std::printf("-- CUDA kernels not built (LORA_KERNELS_CUDA=OFF): CPU checks only\n");
#endif
  std::printf("%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
