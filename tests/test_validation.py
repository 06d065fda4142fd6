"""Bad input, table-driven: each case raises ValueError/TypeError naming the argument, and a byte
comparison shows every weight untouched afterwards."""
import pytest
import torch

import lora_kernels as lk


def _tensors():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(4, 16, generator=g), weight=torch.randn(12, 16, generator=g),
                lora_A=torch.randn(3, 16, generator=g), lora_B=torch.randn(12, 3, generator=g),
                bias=torch.randn(12, generator=g))


def _linear(**change):
    def call(t):
        args = dict(x=t["x"], weight=t["weight"], lora_A=t["lora_A"], lora_B=t["lora_B"], scaling=1.0,
                    bias=t["bias"])
        kw = {k: change.pop(k) for k in ("dropout_p", "backend") if k in change}
        args.update({k: (v(t) if callable(v) else v) for k, v in change.items()})
        return lk.lora_linear(**args, **kw)
    return call


def _merge(unmerge=False, **change):
    def call(t):
        args = dict(weight=t["weight"], lora_A=t["lora_A"], lora_B=t["lora_B"], scaling=0.5)
        args.update({k: (v(t) if callable(v) else v) for k, v in change.items()})
        return (lk.unmerge_ if unmerge else lk.merge_)(**args)
    return call


def _multi(**change):
    def call(t):
        A = torch.stack([t["lora_A"], t["lora_A"]])
        B = torch.stack([t["lora_B"], t["lora_B"]])
        args = dict(x=t["x"], weight=t["weight"], lora_A=A, lora_B=B, scalings=torch.ones(2),
                    adapter_ids=torch.tensor([0, 1, -1, 0], dtype=torch.int32), bias=t["bias"])
        args.update({k: (v(t) if callable(v) else v) for k, v in change.items()})
        return lk.multi_lora_linear(**args, backend="torch")
    return call


def _bank_load(**change):
    def call(t):
        bank = lk.LoRAAdapterBank(16, 12, max_adapters=2, max_rank=4)
        args = dict(name="a", lora_A=t["lora_A"], lora_B=t["lora_B"], lora_alpha=8)
        args.update({k: (v(t) if callable(v) else v) for k, v in change.items()})
        return bank.load_adapter(**args)
    return call


def _module(**kw):
    return lambda t: lk.FusedLoRALinear(16, 12, **kw)


CASES = [
    ("x", _linear(x=lambda t: torch.randn(4, 15)), ValueError),
    ("x", _linear(x=torch.tensor(1.0)), ValueError),
    ("x", _linear(x=lambda t: t["x"].to(torch.int32)), TypeError),
    ("x", _linear(x=[[1.0] * 16]), TypeError),
    ("weight", _linear(weight=lambda t: t["weight"][None]), ValueError),
    ("weight", _linear(weight=lambda t: t["weight"].double()), TypeError),
    ("weight", _linear(weight=lambda t: t["weight"].clone().requires_grad_()), ValueError),
    ("lora_A", _linear(lora_A=lambda t: t["lora_A"][:, :15]), ValueError),
    ("lora_A", _linear(lora_A=lambda t: t["lora_A"][:0], lora_B=lambda t: t["lora_B"][:, :0]), ValueError),
    ("lora_A", _linear(lora_A=lambda t: t["lora_A"].to(torch.int64)), TypeError),
    ("lora_A", _linear(lora_A=lambda t: t["lora_A"].to("meta")), ValueError),
    ("lora_B", _linear(lora_B=lambda t: t["lora_B"][:11]), ValueError),
    ("lora_B", _linear(lora_B=lambda t: t["lora_B"][:, :2]), ValueError),
    ("lora_B", _linear(lora_B=lambda t: t["lora_B"][None]), ValueError),
    ("bias", _linear(bias=lambda t: t["bias"][:11]), ValueError),
    ("bias", _linear(bias=lambda t: t["bias"][None]), ValueError),
    ("scaling", _linear(scaling=float("nan")), ValueError),
    ("scaling", _linear(scaling=float("-inf")), ValueError),
    ("scaling", _linear(scaling="2"), TypeError),
    ("scaling", _linear(scaling=torch.ones(2)), ValueError),
    ("dropout_p", _linear(dropout_p=-0.1), ValueError),
    ("dropout_p", _linear(dropout_p=1.0), ValueError),
    ("dropout_p", _linear(dropout_p="0.1"), ValueError),
    ("backend", _linear(backend="fastest"), ValueError),
    ("backend", _linear(backend="cuda"), ValueError),                 # CPU tensors to a CUDA-only backend
    ("backend", _linear(x=lambda t: t["x"].double(), weight=lambda t: t["weight"].double(), backend="triton"),
     TypeError),                                                       # float64 on the GPU kernels
    ("lora_A", _merge(lora_A=lambda t: t["lora_A"][:, :8]), ValueError),
    ("lora_B", _merge(unmerge=True, lora_B=lambda t: t["lora_B"][:6]), ValueError),
    ("scaling", _merge(scaling=float("nan")), ValueError),
    ("scaling", _merge(unmerge=True, scaling=float("inf")), ValueError),
    ("weight", _merge(weight=lambda t: t["weight"].t().contiguous().t()), ValueError),   # not contiguous
    ("weight", _merge(weight=lambda t: t["weight"].to(torch.int16)), TypeError),
    ("adapter_ids", _multi(adapter_ids=torch.tensor([0, 2, 0, 0])), ValueError),
    ("adapter_ids", _multi(adapter_ids=torch.tensor([0, -2, 0, 0])), ValueError),
    ("adapter_ids", _multi(adapter_ids=torch.tensor([0.0, 1.0, 0.0, 0.0])), TypeError),
    ("adapter_ids", _multi(adapter_ids=torch.tensor([0, 1, 0])), ValueError),
    ("scalings", _multi(scalings=torch.ones(3)), ValueError),
    ("lora_A", _multi(lora_A=lambda t: t["lora_A"]), ValueError),
    ("lora_A", _bank_load(lora_A=lambda t: torch.randn(5, 16), lora_B=lambda t: torch.randn(12, 5)), ValueError),
    ("lora_B", _bank_load(lora_B=lambda t: t["lora_B"][:, :2]), ValueError),
    ("lora_alpha", _bank_load(scaling=1.0), ValueError),
    ("r", _module(r=0), ValueError),
    ("dropout", _module(lora_dropout=1.5), ValueError),
    ("init_lora_weights", _module(init_lora_weights="xavier"), ValueError),
]


@pytest.mark.parametrize("name,call,exc", CASES, ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input(name, call, exc):
    t = _tensors()
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(exc, match=name):
        call(t)
    for k, v in t.items():
        assert torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)), f"{k} changed after a failed call"


def test_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) >= 12
