"""Clear errors for bad input: each names the argument and what was expected."""
import pytest
import torch

import lora_kernels as lk


def _ok():
    return dict(x=torch.randn(4, 16), weight=torch.randn(12, 16), lora_A=torch.randn(3, 16),
                lora_B=torch.randn(12, 3), scaling=1.0, bias=torch.randn(12))


def _with(**change):
    args = _ok()
    args.update(change)
    return args


CASES = [
    ("x", _with(x=torch.randn(4, 15)), ValueError),
    ("weight", _with(weight=torch.randn(12, 16, 1)), ValueError),
    ("lora_A", _with(lora_A=torch.randn(3, 15)), ValueError),
    ("r=0", _with(lora_A=torch.randn(0, 16), lora_B=torch.randn(12, 0)), ValueError),
    ("lora_B", _with(lora_B=torch.randn(11, 3)), ValueError),
    ("bias", _with(bias=torch.randn(13)), ValueError),
    ("weight", _with(weight=torch.randn(12, 16, dtype=torch.float64)), TypeError),
    ("x", _with(x=torch.randint(0, 4, (4, 16))), TypeError),
    ("scaling", _with(scaling=float("nan")), ValueError),
    ("scaling", _with(scaling="1.0"), TypeError),
    ("scaling", _with(scaling=torch.ones(2)), ValueError),
    ("weight", _with(weight=torch.randn(12, 16, requires_grad=True)), ValueError),
    ("x", _with(x=3.0), TypeError),
]


@pytest.mark.parametrize("name,args,exc", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_names_argument(name, args, exc):
    with pytest.raises(exc, match=name.split("=")[0]):
        lk.lora_linear(**args)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1"])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match="dropout_p"):
        lk.lora_linear(**_ok(), dropout_p=p)


def test_bad_backend_and_device():
    with pytest.raises(ValueError, match="backend"):
        lk.lora_linear(**_ok(), backend="fast")
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        lk.lora_linear(**_ok(), backend="cuda")


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="r"):
        lk.FusedLoRALinear(8, 8, r=0)
    with pytest.raises(ValueError, match="dropout"):
        lk.FusedLoRALinear(8, 8, lora_dropout=1.0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        lk.FusedLoRALinear(8, 8, init_lora_weights="xavier")
    with pytest.raises(TypeError, match="linear"):
        lk.FusedLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))
