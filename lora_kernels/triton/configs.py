"""Tile configurations, kept apart from the kernels so tuning never touches kernel bodies."""
import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two up to 4096, so a new batch size rarely retunes."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Large-M tiles (Hopper: wgmma wants >= 64 rows per warpgroup) and decode tiles (M <= 64:
# narrow N tiles so that many CTAs stream W at once).
GEMM_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(16, 32, 256, 4, 4),
    _cfg(16, 64, 128, 4, 5),
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4),
]

# One small tile for the interpreter: correctness only.
INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def prune_gemm_configs(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    big = mb >= 256
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] >= 64) == big or mb in (64, 128)]
    return kept or configs


def skinny_split(rows: int, cols_blocks: int, sms: int = 132) -> int:
    """Row-splits for the skinny kernels so that about two CTAs land on each SM."""
    want = max(1, (2 * sms) // max(cols_blocks, 1))
    return max(1, min(want, triton.cdiv(rows, 64), 64))


# Fold x·Aᵀ into the GEMM (one launch) up to this many rows: there the GEMM streams W and the extra
# BLOCK_M×BLOCK_K×r product per step costs nothing; above it the separate skinny kernel is cheaper than
# r/BLOCK_N more tensor-core work in every program. Not with dropout (the mask would be rebuilt per program).
FOLD_XA_MAX_ROWS = 64
FOLD_XA_MAX_RANK = 128


def fold_xa(m: int, r: int, dropout_on: bool) -> bool:
    return 0 < m <= FOLD_XA_MAX_ROWS and r <= FOLD_XA_MAX_RANK and not dropout_on
