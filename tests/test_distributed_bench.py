"""The distributed bench (python -m lora_kernels.bench.distributed) end to end on the CPU: two gloo processes,
the tiny Llama config, one timed step in one round; its files, its table and its correctness check."""
import json

import pytest
import torch.distributed as dist

pytest.importorskip("peft")
pytest.importorskip("transformers")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("FSDP2 (fully_shard) is not available", allow_module_level=True)

from lora_kernels.bench import distributed  # noqa: E402

PAIRS = {(w, p) for w in ("ddp", "fsdp2") for p in ("peft", "patched")}
# layers × target linears × (lora_A, lora_B)
ADAPTER_TENSORS = distributed.TINY["num_hidden_layers"] * len(distributed.e2e.TARGETS) * 2


def test_distributed_bench_on_cpu(tmp_path):
    # --cpu: the gloo path even on a machine with two GPUs, where the default would be NCCL and TinyLlama.
    rc = distributed.main(["--cpu", "--nproc", "2", "--config", "tiny", "--steps", "1", "--rounds", "1",
                           "--warmup", "1", "--seq", "64", "--out", str(tmp_path)])
    jsonl = list(tmp_path.glob("cpu-*-distributed.jsonl"))
    md = list(tmp_path.glob("cpu-*-distributed.md"))
    assert len(jsonl) == 1 and len(md) == 1
    rows = [json.loads(line) for line in jsonl[0].read_text().splitlines()]
    assert len(rows) == 4 and {(r["wrapper"], r["provider"]) for r in rows} == PAIRS
    table = [line for line in md[0].read_text().splitlines() if line.startswith(("| ddp |", "| fsdp2 |"))]
    assert len(table) == 4 and all(line.rstrip().endswith("| yes |") for line in table)
    for r in rows:
        assert r["world"] == 2 and r["backend"] == "gloo"
        # Every adapter gradient compared, and the reference's are not all zero (which would pass trivially).
        assert r["passed"] and r["grads_checked"] == ADAPTER_TENSORS and r["grad_max_ref"] > 0, r
        assert r["p50_ms"] > 0 and r["tokens_per_s"] > 0 and all(ms > 0 for ms in r["round_ms"]), r
    assert rc == 0
