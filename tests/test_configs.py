"""Tile pruning: shared-memory estimates against what Triton asked for on an H100, and the pruned lists."""
import torch
import triton

from lora_kernels.triton import configs

# (tile, stages, element bytes, BLOCK_R, FOLD_XA, NF4) -> shared memory Triton required at launch on an
# H100 (triton 3.6), read from the OutOfResources errors of the first GPU runs (bench/NOTES.md).
OBSERVED = [
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 3, 4, 64, True, False, 344064),   # fp32, M=1, r=64
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 3, 2, 64, True, False, 245760),   # bf16, M=64, r=33
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 3, 2, 16, False, True, 344064),   # NF4 weight, r=16
    # from the sm_90a compile report (bench/smem_check.py, triton 3.8), where the first estimate fell short
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 4, 2, 16, False, True, 245760),
    (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), 5, 2, 16, False, True, 278528),
    (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128), 4, 2, 64, True, False, 245760),
]
# float32 adapters (peft's default) under bf16 activations, rank tile 64, from the same compile report
# (bench/results/smem-estimate-check-sm90a-20261129-fp32-adapters.txt); the first estimate ignored their
# width, and such tiles failed at launch on the H200 (bench/results/gpu-tests-h200-20261129-partial.txt).
OBSERVED_FP32_ADAPTERS = [
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 3, 245760),
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 4, 229376),
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 4, 172032),
]


def test_estimate_covers_observed_requirements():
    for cfg, stages, elem, block_r, fold, nf4, required in OBSERVED:
        assert configs.gemm_smem_bytes(cfg, stages, elem, block_r, fold, nf4) >= required


def test_estimate_covers_float32_adapters():
    for cfg, stages, required in OBSERVED_FP32_ADAPTERS:
        assert configs.gemm_smem_bytes(cfg, stages, 2, 64, False, False, lowrank_elem=4) >= required


def test_pruning_sees_float32_adapters(monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_QUICK_TUNE", raising=False)
    a, b32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    limit = configs._smem_limit() / configs.SMEM_MARGIN
    for fold in (False, True):
        kept = configs.prune_gemm_configs(configs.GEMM_CONFIGS, {"a_ptr": a, "M_BUCKET": 64, "r_ptr": b32,
                                                                 "fa_ptr": b32}, BLOCK_R=64, FOLD_XA=fold)
        assert kept
        for c in kept:
            assert configs.gemm_smem_bytes(c.kwargs, c.num_stages, 2, 64, fold, False, lowrank_elem=4) <= limit


def _prune(dtype, m_bucket, **flags):
    a = torch.empty(1, dtype=dtype)
    return configs.prune_gemm_configs(configs.GEMM_CONFIGS, {"a_ptr": a, "M_BUCKET": m_bucket}, **flags)


def test_pruned_tiles_fit_and_keep_candidates(monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_QUICK_TUNE", raising=False)
    limit = configs._smem_limit() / configs.SMEM_MARGIN
    for dtype in (torch.bfloat16, torch.float32):
        for mb in (1, 64, 4096):
            for flags in (dict(BLOCK_R=16), dict(BLOCK_R=64, FOLD_XA=True), dict(BLOCK_R=16, NF4=True)):
                if flags.get("FOLD_XA") and (mb > 64 or dtype == torch.float32):
                    continue  # x·Aᵀ is folded in only up to 64 rows of 16-bit inputs
                kept = _prune(dtype, mb, **flags)
                assert kept, (dtype, mb, flags)
                elem = torch.empty(0, dtype=dtype).element_size()
                for c in kept:
                    assert isinstance(c, triton.Config) and c.num_stages >= 2
                    used = configs.gemm_smem_bytes(c.kwargs, c.num_stages, elem, flags["BLOCK_R"],
                                                   flags.get("FOLD_XA", False), flags.get("NF4", False))
                    assert used <= limit, (dtype, mb, flags, c)
    # large M keeps only the wgmma-sized tiles; bf16 keeps more than one to tune over
    big = _prune(torch.bfloat16, 4096, BLOCK_R=16)
    assert len(big) > 1 and all(c.kwargs["BLOCK_M"] >= 64 for c in big)


def test_quick_tune_keeps_one_tile(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_QUICK_TUNE", "1")
    assert len(_prune(torch.bfloat16, 4096, BLOCK_R=16)) == 1


def test_float32_without_tf32_gets_only_fma_tiles(monkeypatch):
    """DOT_PRECISION "ieee" multiplies on the FMA units: tensor-core tiles spill there and took minutes of
    compiling per new shape, so only the small FMA tiles are tuned over; the other precisions never see them."""
    monkeypatch.delenv("LORA_KERNELS_QUICK_TUNE", raising=False)
    everything = configs.GEMM_CONFIGS + configs.FMA_GEMM_CONFIGS
    f32 = torch.empty(1, dtype=torch.float32)
    for mb in (1, 16, 64, 512, 4096):
        for flags in (dict(BLOCK_R=16), dict(BLOCK_R=256), dict(BLOCK_R=64, LOWRANK_DROPOUT=True)):
            kept = configs.prune_gemm_configs(everything, {"a_ptr": f32, "M_BUCKET": mb}, DOT_PRECISION="ieee",
                                              **flags)
            assert kept, (mb, flags)
            for c in kept:
                k = c.kwargs
                assert k["BLOCK_M"] * k["BLOCK_N"] <= 64 * 64 and k["BLOCK_K"] <= 32, (mb, flags, c)
                assert k["BLOCK_M"] <= max(mb, 16)
                assert k["BLOCK_M"] * k["BLOCK_N"] * flags["BLOCK_R"] <= 64 * 64 * 64 or k["BLOCK_M"] == 16
        tensor_core = configs.prune_gemm_configs(everything, {"a_ptr": f32, "M_BUCKET": mb}, DOT_PRECISION="tf32",
                                                 BLOCK_R=16)
        fma = [(c.kwargs, c.num_warps) for c in configs.FMA_GEMM_CONFIGS]
        assert tensor_core and all((c.kwargs, c.num_warps) not in fma for c in tensor_core)
