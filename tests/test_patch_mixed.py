"""Mixed-adapter batches (`adapter_names=`) through patched peft layers: peft's outputs and gradients, the
adapter stack rebuilt when an adapter changes, and peft's own loop (with one warning) where the fused path
does not serve."""
import os
import warnings

import pytest
import torch

import lora_kernels as lk
from lora_kernels import patch_mixed

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _three_adapter_llama(dtype=torch.float64, seed=0):
    """A tiny Llama with adapters "default" (r 4, every linear), "b" (r 8, q and v only) and "c" (r 4)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=ALL))
    model.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj"]))
    model.add_adapter("c", peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=ALL))
    return model.to(dtype).eval()


def _pair(dtype=torch.float64, backend="auto"):
    ref, mine = _three_adapter_llama(dtype), _three_adapter_llama(dtype)
    lk.patch(mine, backend=backend)
    return ref, mine


def _lk_warnings(record):
    return [w for w in record if "lora_kernels" in str(w.message)]


NAMES = ["b", "__base__", "default", "c", "b", "default"]


@pytest.mark.parametrize("dtype, tol, backend", [(torch.float64, 1e-10, "auto"), (torch.float32, 2e-5, "auto"),
                                                pytest.param(torch.float32, 2e-5, "triton", marks=pytest.mark.skipif(
                                                    os.environ.get("TRITON_INTERPRET") != "1",
                                                    reason="Triton on CPU tensors: the interpreter only"))])
def test_mixed_batch_matches_peft(dtype, tol, backend, monkeypatch):
    # on the CPU, "auto" is the reference loop and "triton" the mixed-batch kernel under Triton's interpreter
    monkeypatch.setattr(patch_mixed, "_warned", set())
    ref, mine = _pair(dtype, backend)
    ids = torch.randint(0, 128, (len(NAMES), 12))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        want = ref(input_ids=ids, adapter_names=NAMES).logits
        got = mine(input_ids=ids, adapter_names=NAMES).logits
    assert not _lk_warnings(record), [str(w.message) for w in record]
    # the fused path ran on every adapted layer: each holds its stack (the q/v layers with three slots)
    stacks = [m.__dict__.get(patch_mixed._STACK) for m in mine.modules() if hasattr(m, "_lora_kernels_patched")]
    assert len(stacks) == 14 and all(s is not None for s in stacks)
    assert sorted(len(s[1]) for s in stacks) == [2] * 10 + [3] * 4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # rows of one adapter agree with the same model run on that adapter alone
    mine.set_adapter("c")
    with torch.no_grad():
        alone = mine(input_ids=ids[3:4]).logits
    torch.testing.assert_close(got[3:4], alone, rtol=tol, atol=tol)


def test_stack_follows_adapter_updates():
    ref, mine = _pair()
    ids = torch.randint(0, 128, (len(NAMES), 8))
    with torch.no_grad():
        first = mine(input_ids=ids, adapter_names=NAMES).logits
        for model in (ref, mine):  # an in-place update of adapter b's weights (a version bump)
            for name, p in model.named_parameters():
                if ".b.weight" in name and "lora_B" in name:
                    p.mul_(3.0)
        got = mine(input_ids=ids, adapter_names=NAMES).logits
        want = ref(input_ids=ids, adapter_names=NAMES).logits
    assert not torch.allclose(got, first)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a new adapter after the first mixed batch joins the stack
    for model in (ref, mine):
        torch.manual_seed(3)
        model.add_adapter("d", peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=ALL))
        model.to(torch.float64).eval()
    names = ["d", "b", "__base__", "c", "d", "default"]
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids, adapter_names=names).logits,
                                   ref(input_ids=ids, adapter_names=names).logits, rtol=1e-10, atol=1e-10)


def test_gradients_reach_each_adapter():
    # peft forbids adapter_names in training mode at the model level; a layer called with autograd on
    # (eval mode, adapters trainable) must still give each adapter its own gradient
    ref, mine = _pair()
    layer_ref = ref.base_model.model.model.layers[0].self_attn.q_proj
    layer = mine.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 5, 64, dtype=torch.float64)
    names = ["c", "b", "__base__", "b"]
    for lyr in (layer_ref, layer):
        for n in ("default", "b", "c"):
            lyr.lora_A[n].weight.requires_grad_(True)
            lyr.lora_B[n].weight.requires_grad_(True)
    dy = torch.randn(4, 5, 64, dtype=torch.float64)
    grads = []
    for lyr in (layer_ref, layer):
        xg = x.clone().requires_grad_()
        (lyr(xg, adapter_names=names) * dy).sum().backward()
        grads.append([xg.grad] + [getattr(lyr, f)[n].weight.grad for f in ("lora_A", "lora_B") for n in ("b", "c")])
    assert layer.__dict__.get(patch_mixed._STACK) is None  # nothing kept where autograd reaches the adapters
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    assert layer.lora_A["default"].weight.grad is None


def test_inference_mode_stack_serves_a_later_autograd_call():
    _, mine = _pair()
    layer = mine.base_model.model.model.layers[1].mlp.up_proj
    x = torch.randn(3, 4, 64, dtype=torch.float64)
    with torch.inference_mode():
        y_inf = layer(x, adapter_names=["c", "default", "c"])
    xg = x.clone().requires_grad_()
    y = layer(xg, adapter_names=["c", "default", "c"])  # the stack built under inference_mode, x needing grad
    y.sum().backward()
    assert xg.grad is not None and torch.equal(y.detach(), y_inf)


def test_unserved_cases_run_peft_and_say_why(monkeypatch):
    monkeypatch.setattr(patch_mixed, "_warned", set())
    ref, mine = _pair(torch.float32)
    x = torch.randn(3, 4, 64)
    names = ["b", "c", "__base__"]
    layer_ref = ref.base_model.model.model.layers[0].self_attn.v_proj
    layer = mine.base_model.model.model.layers[0].self_attn.v_proj
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = layer(x, adapter_names=names), layer_ref(x, adapter_names=names)
        layer(x, adapter_names=names)  # outside autocast: served, no second warning
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x, adapter_names=names)  # the same reason warns once
    assert torch.equal(got, want)
    msgs = [str(w.message) for w in _lk_warnings(record)]
    assert len(msgs) == 1 and "autocast" in msgs[0]
    # adapters of different dtypes cannot share one stack: peft's loop, and the reason said once
    monkeypatch.setattr(patch_mixed, "_warned", set())
    for lyr in (layer, layer_ref):
        lyr.lora_A["b"].to(torch.float64)
        lyr.lora_B["b"].to(torch.float64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, want = layer(x, adapter_names=["b", "b", "c"]), layer_ref(x, adapter_names=["b", "b", "c"])
    assert torch.equal(got, want)
    msgs = [str(w.message) for w in _lk_warnings(record)]
    assert len(msgs) == 1 and "dtypes" in msgs[0]
    # a base-only batch and a length mismatch are peft's to run (and to refuse)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, adapter_names=["__base__"] * 3), layer_ref(x, adapter_names=["__base__"] * 3))
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            layer(x, adapter_names=["b"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_mixed_batch_on_the_gpu_meets_the_oracle_rule(backend):
    # bf16 on the GPU (Triton's mixed-batch kernel; a layer patched for "cuda" takes auto's pick): the error
    # against float64 within twice peft's own bf16 error
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    exact_model, peft_model, mine = (_three_adapter_llama(dt).cuda() for dt in (torch.float64, torch.bfloat16,
                                                                                 torch.bfloat16))
    lk.patch(mine, backend=backend)
    x = torch.randn(len(NAMES), 33, 64, device="cuda")
    errs = []
    with torch.no_grad():
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            def layer(model):
                return model.get_submodule(f"base_model.model.model.layers.1.{proj}")
            xin = x if proj.startswith("self") else torch.randn(len(NAMES), 33, 96, device="cuda")
            exact = layer(exact_model)(xin.double(), adapter_names=NAMES)
            got = layer(mine)(xin.bfloat16(), adapter_names=NAMES)
            assert layer(mine).__dict__.get(patch_mixed._STACK) is not None
            errs.append(((got.double() - exact).norm().item(),
                         (layer(peft_model)(xin.bfloat16(), adapter_names=NAMES).double() - exact).norm().item()))
    for err, peft_err in errs:
        assert err <= 2 * peft_err + 1e-6 * len(NAMES), f"error {err:.3e} > 2x peft's {peft_err:.3e}"


@pytest.mark.gpu
def test_mixed_batch_never_syncs_with_the_host():
    # a serving loop's batches: after the first (Triton's compile, the stack), a new mix of adapters costs a
    # queued copy of its slot ids and the fused pass, no host sync
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    _, mine = _pair(torch.bfloat16)
    mine.cuda()
    layer = mine.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    x = torch.randn(len(NAMES), 9, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x, adapter_names=NAMES)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = layer(x, adapter_names=list(reversed(NAMES)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert y.shape == (len(NAMES), 9, 64) and layer.__dict__.get(patch_mixed._STACK) is not None
