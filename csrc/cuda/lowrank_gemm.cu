// y = x·Wᵀ + s·u·Bᵀ (+ bias) in one GEMM on Hopper: a CUTLASS 3 warp-specialised TMA GEMM whose main loop takes
// the rank-R term as its last K step, u (M×R) and s·B (N×R) loaded like x's and W's tiles (lowrank_gemm.cuh).
// It replaces cuBLAS's y = s·u·Bᵀ (+ bias) then y += x·Wᵀ (beta = 1), which writes y and reads it back: two
// passes over the output that this kernel does not make. No tile shape of it beats that pair at every size on
// an H100, so each problem's first call times the shapes built in and the pair, and keeps the fastest.
// Built only where the CUTLASS headers are found (setup.py: LORA_KERNELS_WITH_CUTLASS); sm_90a only.
#include "lowrank_gemm.cuh"
#include "ops.h"

#ifdef LORA_KERNELS_WITH_CUTLASS
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

namespace lora_kernels {
namespace {
constexpr int kPair = -1;  // the cuBLAS pair, as a candidate

// LORA_KERNELS_CUTLASS_CONFIG=0..kLowRankConfigs-1 or "pair" forces one (A/B runs); read once.
int forced_config() {
  static const int forced = [] {
    const char* v = std::getenv("LORA_KERNELS_CUTLASS_CONFIG");
    if (v == nullptr || *v == '\0') return -2;
    if (std::string(v) == "pair") return kPair;
    char* end = nullptr;
    const long i = std::strtol(v, &end, 10);
    TORCH_CHECK(*end == '\0' && i >= 0 && i < kLowRankConfigs, "LORA_KERNELS_CUTLASS_CONFIG: expected 0..",
                kLowRankConfigs - 1, " or pair, got ", v);
    return int(i);
  }();
  return forced;
}

template <size_t... I>
void run_config(int config, const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& v,
                const at::Tensor* bias, bool weight_kmajor, at::Tensor& out, std::index_sequence<I...>) {
  ((config == int(I) ? run_lowrank_config<int(I)>(a, w, u, v, bias, weight_kmajor, out) : void()), ...);
}

// v = s·b in the B operand's layout (N×R rows for x·Wᵀ, R×N rows for dy·W): s rides in the tail's K step,
// rounded once into v (one small pass over N×R values). The pair needs no v: s is its GEMM's alpha.
at::Tensor scaled_factor(const at::Tensor& b, double scale, bool weight_kmajor, at::ScalarType dt) {
  return (weight_kmajor ? b : b.t()).mul(scale).to(dt).contiguous();
}

// out = a·w(ᵀ) + s·u·bᵀ + bias by candidate `config` (v = scaled_factor(b), used by the tile shapes only)
void run_candidate(int config, const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                   const at::Tensor& v, const at::Tensor* bias, double scale, bool weight_kmajor, at::Tensor& out) {
  if (config == kPair)
    lowrank_pair_into(out, a, w, u, b, bias, scale, weight_kmajor);
  else
    run_config(config, a, w, u, v, bias, weight_kmajor, out, std::make_index_sequence<kLowRankConfigs>{});
}

struct ProblemKey {
  int64_t M, N, K, R;
  int dtype, device;
  bool weight_kmajor, bias;
  bool operator==(const ProblemKey& o) const {
    return M == o.M && N == o.N && K == o.K && R == o.R && dtype == o.dtype && device == o.device &&
           weight_kmajor == o.weight_kmajor && bias == o.bias;
  }
};
struct ProblemHash {
  size_t operator()(const ProblemKey& k) const {
    size_t h = std::hash<int64_t>()(k.M);
    for (int64_t x : {k.N, k.K, k.R, int64_t(k.dtype), int64_t(k.device), int64_t(k.weight_kmajor), int64_t(k.bias)})
      h = h * 1000003u ^ std::hash<int64_t>()(x);
    return h;
  }
};

// The candidate for this problem: timed on the first call of its size bucket (each candidate once to warm, then
// two interleaved rounds of three calls, CUDA events on the current stream), kept per problem. Inside a CUDA-graph capture
// nothing can be timed: a fixed choice runs and nothing is kept.
int pick_candidate(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                   const at::Tensor* bias, double scale, bool weight_kmajor, at::Tensor& out) {
  if (forced_config() != -2) return forced_config();
  // rows to the next power of two: one timing per bucket, so batches of varying length do not time each size
  int64_t rows = 1;
  while (rows < a.size(0)) rows *= 2;
  const ProblemKey key{rows, out.size(1), a.size(1), u.size(1), int(a.scalar_type()), a.get_device(),
                       weight_kmajor, bias != nullptr};
  static std::mutex mutex;
  static std::unordered_map<ProblemKey, int, ProblemHash> picked;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = picked.find(key);
    if (it != picked.end()) return it->second;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  // Captured before any timing: tile shape 0 where it was never far from the best (512 rows up), else the pair.
  if (capture != cudaStreamCaptureStatusNone) return a.size(0) >= 512 ? 0 : kPair;
  const at::Tensor v = scaled_factor(b, scale, weight_kmajor, a.scalar_type());
  // The shapes timed: the first kPickedConfigs, or all of them with LORA_KERNELS_CUTLASS_STREAMK=1 (the
  // stream-K shape joins the timing; A/B runs until it has been measured), then the pair.
  static const int tiles = env_int("LORA_KERNELS_CUTLASS_STREAMK", 0, 0, 1) == 1 ? kLowRankConfigs : kPickedConfigs;
  const int candidates = tiles + 1;
  auto candidate = [](int i) { return i == tiles ? kPair : i; };
  constexpr int kRounds = 2, kReps = 3;
  // warm: lazy set-up (cuBLAS workspaces, the kernels' shared-memory attributes) stays out of the timing
  for (int i = 0; i < candidates; ++i) run_candidate(candidate(i), a, w, u, b, v, bias, scale, weight_kmajor, out);
  // The GPU is held by a spin kernel while the timed calls are queued, so that each interval is GPU time even
  // where queueing a call takes the host longer than the GPU takes to run it (small problems): timed back to
  // back, those read the host's speed, not the kernels'. 4M cycles (~2 ms) covers the 24-30 queued calls.
  std::array<cudaEvent_t, kRounds * (kLowRankConfigs + 1) + 1> ev{};
  const int events = kRounds * candidates + 1;
  for (int e = 0; e < events; ++e) C10_CUDA_CHECK(cudaEventCreate(&ev[e]));
  at::cuda::sleep(int64_t(4) << 20);
  C10_CUDA_CHECK(cudaEventRecord(ev[0], stream));
  for (int round = 0, e = 1; round < kRounds; ++round) {
    for (int i = 0; i < candidates; ++i, ++e) {
      for (int rep = 0; rep < kReps; ++rep) run_candidate(candidate(i), a, w, u, b, v, bias, scale, weight_kmajor, out);
      C10_CUDA_CHECK(cudaEventRecord(ev[e], stream));
    }
  }
  C10_CUDA_CHECK(cudaEventSynchronize(ev[events - 1]));
  std::array<float, kLowRankConfigs + 1> ms{};
  for (int e = 1; e < events; ++e) {
    float t = 0.f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&t, ev[e - 1], ev[e]));
    ms[(e - 1) % candidates] += t;
  }
  for (int e = 0; e < events; ++e) C10_CUDA_CHECK(cudaEventDestroy(ev[e]));
  const int best = candidate(int(std::min_element(ms.begin(), ms.begin() + candidates) - ms.begin()));
  const std::lock_guard<std::mutex> lock(mutex);
  picked.emplace(key, best);
  return best;
}
}  // namespace

bool lowrank_gemm_supported(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, bool weight_kmajor) {
  if (!a.is_cuda() || a.dim() != 2 || u.dim() != 2 || a.size(1) == 0) return false;
  const auto dt = a.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || w.scalar_type() != dt || u.scalar_type() != dt) return false;
  const int64_t r = u.size(1);
  if (r == 0 || r % 8 != 0 || r > lowrank::kMaxRank) return false;
  const auto* props = at::cuda::getDeviceProperties(a.get_device());
  if (props->major != 9) return false;  // sm_90a code only
  // TMA: 16-byte aligned bases and row strides, unit inner strides
  auto aligned = [](const at::Tensor& t) {
    return t.stride(1) == 1 && t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  return aligned(a) && aligned(u) && w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 &&
         (weight_kmajor ? w.size(1) : w.size(0)) % 8 == 0 && (weight_kmajor ? w.size(0) : w.size(1)) % 8 == 0;
}

at::Tensor lowrank_gemm_cuda(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                             const c10::optional<at::Tensor>& bias, double scale, bool weight_kmajor, int64_t config) {
  TORCH_CHECK(config >= -1 && config < kLowRankConfigs, "lowrank_gemm: config must be -1 (timed per problem) or 0..",
              kLowRankConfigs - 1, ", got ", config);
  TORCH_CHECK(lowrank_gemm_supported(a, w, u, weight_kmajor), "lowrank_gemm: unsupported inputs");
  const int64_t N = weight_kmajor ? w.size(0) : w.size(1);
  TORCH_CHECK(w.size(weight_kmajor ? 1 : 0) == a.size(1), "lowrank_gemm: inner dimensions differ");
  TORCH_CHECK(u.size(0) == a.size(0) && b.dim() == 2 && b.size(0) == N && b.size(1) == u.size(1),
              "lowrank_gemm: factor shapes");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N), "lowrank_gemm: bias shape");
  return lowrank_gemm_checked(a, w, u, b, bias, scale, weight_kmajor, config);
}

at::Tensor lowrank_gemm_checked(const at::Tensor& a, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
                                const c10::optional<at::Tensor>& bias, double scale, bool weight_kmajor,
                                int64_t config) {
  const int64_t N = weight_kmajor ? w.size(0) : w.size(1);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto dt = a.scalar_type();
  at::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = bias->to(dt).contiguous();
    if (reinterpret_cast<uintptr_t>(bias_c.data_ptr()) % 16 != 0) bias_c = bias_c.clone();  // vector loads
  }
  at::Tensor out = at::empty({a.size(0), N}, a.options());
  if (a.size(0) == 0 || N == 0) return out;
  const at::Tensor* bp = bias.has_value() ? &bias_c : nullptr;
  const at::Tensor bd = b.to(dt);  // the pair's operand (no copy in a's dtype)
  const int chosen = config >= 0 ? int(config) : pick_candidate(a, w, u, bd, bp, scale, weight_kmajor, out);
  const at::Tensor v = chosen == kPair ? at::Tensor() : scaled_factor(bd, scale, weight_kmajor, dt);
  run_candidate(chosen, a, w, u, bd, v, bp, scale, weight_kmajor, out);
  return out;
}

}  // namespace lora_kernels
#endif  // LORA_KERNELS_WITH_CUTLASS
