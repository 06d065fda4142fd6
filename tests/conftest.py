import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Tests check results, not speed: time each autotune candidate only briefly.
    os.environ.setdefault("LORA_KERNELS_QUICK_TUNE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    # LORA_KERNELS_TEST_SHARD=i/n keeps every n-th test from the i-th: n processes share a GPU machine's cores.
    shard = os.environ.get("LORA_KERNELS_TEST_SHARD")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        config.hook.pytest_deselected(items=[t for k, t in enumerate(items) if k % n != i])
        items[:] = [t for k, t in enumerate(items) if k % n == i]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
