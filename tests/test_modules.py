"""FusedLoRALinear behaviour."""
import math

import pytest
import torch
from torch import nn

import lora_kernels as lk


def test_init_like_peft_and_frozen_base():
    m = lk.FusedLoRALinear(40, 30, r=4, lora_alpha=8)
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    assert m.scaling == 2.0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=√5) bound on fan_in
    assert m.lora_A.abs().max() <= bound + 1e-6
    g = lk.FusedLoRALinear(40, 30, r=16, init_lora_weights="gaussian", use_rslora=True, lora_alpha=8)
    assert g.scaling == pytest.approx(8 / 4)
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.02


def test_from_linear_shares_weight_and_matches_linear_at_init():
    lin = nn.Linear(24, 20)
    m = lk.FusedLoRALinear.from_linear(lin, r=4, lora_alpha=16)
    assert m.weight is lin.weight and m.bias is lin.bias
    x = torch.randn(5, 24)
    torch.testing.assert_close(m(x), lin(x))          # B = 0 at init


def test_merge_unmerge_and_forward_equivalence():
    m = lk.FusedLoRALinear(48, 36, r=8, lora_alpha=16)
    nn.init.normal_(m.lora_B)
    x = torch.randn(7, 48)
    y = m(x)
    w_before = m.weight.clone()
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert not m.merged
    assert (m.weight - w_before).abs().max() <= 1e-6
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_disable_adapters_and_dropout_only_in_training():
    m = lk.FusedLoRALinear(16, 12, r=2, lora_dropout=0.5)
    nn.init.normal_(m.lora_B)
    x = torch.randn(4, 16)
    with m.disable_adapters():
        torch.testing.assert_close(m(x), nn.functional.linear(x, m.weight, m.bias))
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(0)
    torch.testing.assert_close(m(x), a)  # masks reproduce from torch.manual_seed
    m.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        with m.disable_adapters():
            pass


def test_training_lowers_loss():
    torch.manual_seed(0)
    m = lk.FusedLoRALinear(32, 8, r=4, lora_alpha=8)
    target = lk.FusedLoRALinear(32, 8, r=4)
    target.weight.data.copy_(m.weight.data)
    target.bias.data.copy_(m.bias.data)
    nn.init.normal_(target.lora_B)
    x = torch.randn(256, 32)
    y = target(x).detach()
    opt = torch.optim.AdamW([m.lora_A, m.lora_B], lr=1e-2)
    losses = []
    for _ in range(60):
        loss = (m(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_extra_repr_and_state_dict():
    m = lk.FusedLoRALinear(10, 6, r=3, bias=False)
    assert "r=3" in repr(m) and "scaling=" in repr(m)
    assert set(m.state_dict()) == {"weight", "lora_A", "lora_B"}
