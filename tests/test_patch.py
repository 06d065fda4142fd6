"""patch(): a peft model (small random Llama, nothing downloaded) keeps its outputs, gradients, parameters
and saved files, and gains the fused forward."""
import hashlib

import pytest
import torch
from torch import nn

import lora_kernels as lk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0, dropout=0.0, **lora_kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], **lora_kw)
    return peft.get_peft_model(model, lcfg)


def _grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fused_layers(model):
    return [m for m in model.modules() if hasattr(m, "_lora_kernels_patched")]


def test_patched_peft_llama_matches_peft_outputs_and_grads():
    ref = _tiny_llama()
    mine = _tiny_llama()
    lk.patch(mine)
    assert len(_fused_layers(mine)) == 14
    ids = torch.randint(0, 128, (2, 16))
    logits_ref, g_ref = _grads(ref, ids)
    logits, g = _grads(mine, ids)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    assert g.keys() == g_ref.keys() and len(g) == 28
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-3, atol=1e-5, msg=k)


def test_state_dict_and_save_pretrained_unchanged(tmp_path):
    model = _tiny_llama()
    keys_before = list(model.state_dict().keys())
    params_before = [id(p) for p in model.parameters()]
    model.save_pretrained(tmp_path / "before")
    lk.patch(model)
    assert list(model.state_dict().keys()) == keys_before
    assert [id(p) for p in model.parameters()] == params_before
    model.save_pretrained(tmp_path / "after")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        h = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("before", "after")]
        assert h[0] == h[1], name


def test_dropout_training_and_disable_and_merge_fall_back():
    model = _tiny_llama(dropout=0.1)
    lk.patch(model)
    ids = torch.randint(0, 128, (1, 8))
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(0)
    torch.testing.assert_close(model(input_ids=ids).logits, a)     # masks reproduce from the seed
    model.eval()
    y = model(input_ids=ids).logits
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    assert not torch.allclose(y, base)
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, y, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()


def test_unsupported_layers_keep_peft_forward(caplog):
    model = _tiny_llama(use_dora=True)
    with caplog.at_level("INFO", logger="lora_kernels"):
        lk.patch(model)
    assert _fused_layers(model) == []
    assert "DoRA" in caplog.text


def test_base_layer_walk_matches_peft():
    """The forward's base-layer walk (through _modules, not hasattr) finds what peft's get_base_layer finds,
    for every LoRA layer, including one whose base is itself wrapped."""
    from lora_kernels.patch import _base_layer
    model = _tiny_llama()
    layers = [m for m in model.modules() if hasattr(m, "get_base_layer") and hasattr(m, "lora_A")]
    assert layers and all(_base_layer(m) is m.get_base_layer() for m in layers)
    outer = layers[0]
    inner = type("Wrapped", (nn.Module,), {})()
    inner.base_layer = outer.base_layer
    outer.base_layer = inner
    assert _base_layer(outer) is outer.get_base_layer() is inner.base_layer


def test_unpatch_restores_forward():
    model = _tiny_llama()
    lk.patch(model)
    lk.unpatch(model)
    assert _fused_layers(model) == []
    assert all(not {"forward", "merge", "unmerge"} & set(vars(m)) for m in model.modules())


def test_compile_fullgraph_over_patched_block():
    torch._dynamo.reset()
    model = _tiny_llama()
    lk.patch(model)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    eager = mlp(x)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)


def test_gradient_checkpointing_and_autocast():
    ref, mine = _tiny_llama(), _tiny_llama()
    lk.patch(mine)
    for m in (ref, mine):
        m.base_model.model.gradient_checkpointing_enable()
        m.train()
    ids = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l_ref, g_ref = _grads(ref, ids)
        l_mine, g_mine = _grads(mine, ids)
    torch.testing.assert_close(l_mine.float(), l_ref.float(), rtol=0.05, atol=0.05)
    for k in g_ref:
        rel = (g_mine[k].float() - g_ref[k].float()).norm() / g_ref[k].float().norm()
        assert rel < 0.05, k


def test_plain_model_target_modules():
    net = nn.Sequential()
    net.add_module("up", nn.Linear(16, 32))
    net.add_module("act", nn.ReLU())
    net.add_module("down", nn.Linear(32, 8))
    x = torch.randn(4, 16)
    y = net(x)
    w = net.up.weight
    lk.patch(net, target_modules=["up", "down"], r=2, lora_alpha=4)
    assert isinstance(net.up, lk.FusedLoRALinear) and net.up.weight is w
    torch.testing.assert_close(net(x), y)                          # B = 0 at init
    lk.unpatch(net)
    assert type(net.up) is nn.Linear and net.up.weight is w


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_patched_llama_has_no_graph_breaks_or_recompiles(device):
    """torch.compile over a whole patched model: one graph per step, no recompiles after the first call
    (a break inside each LoRA layer made a compiled 1.1B step 3.3x slower than peft + compile). On CUDA,
    backend='auto' with both backends built reaches the per-shape timing code, which must never be traced."""
    from torch._dynamo.utils import counters
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch._dynamo.reset()
    counters.clear()
    lk._backends._said.clear()                      # the backend-choice log line must not break the graph
    model = _tiny_llama(dropout=0.1).to(device)
    lk.patch(model)
    model.train()
    compiled = torch.compile(model, backend="aot_eager")
    for seed in range(3):                           # fresh inputs, same shapes: no recompile
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed)).to(device)
        compiled(input_ids=ids, labels=ids).loss.backward()
    breaks = dict(counters["graph_break"])
    assert sum(breaks.values()) == 0, breaks
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_backend_probes_are_constants_to_compile():
    """triton_available / cuda_ext_available import modules on first use; a traced call would break the graph."""
    def f(x):
        return x + 1 if lk._backends.triton_available() or lk._backends.cuda_ext_available() else x - 1
    x = torch.ones(3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_compiled_dropout_draws_one_seed_per_layer():
    """q, k and v share their input: a compiled graph must still give each its own dropout mask, as eager
    does (merged seed draws would correlate the three masks)."""
    model = _tiny_llama(dropout=0.3)
    lk.patch(model)
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    torch.manual_seed(5)
    eager = model(input_ids=ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager_decomp_partition")   # the partitioner that runs CSE
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(input_ids=ids).logits, eager)


def test_patched_peft_merges_are_bit_exact_and_keep_peft_bookkeeping():
    model = _tiny_llama()
    lk.patch(model)
    layers = _fused_layers(model)
    originals = [m.get_base_layer().weight.detach().clone() for m in layers]
    expect = []
    for m, w in zip(layers, originals):
        w = w.clone()
        lk.merge_(w, m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(), m.scaling["default"])
        expect.append(w)
    model.merge_adapter()
    assert all(m.merged_adapters == ["default"] for m in layers)
    assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, expect))
    model.unmerge_adapter()
    assert not any(m.merged for m in layers)
    for _ in range(3):  # cycles never drift: each re-merge is bit-equal to the first
        model.merge_adapter()
        assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, expect))
        model.unmerge_adapter()
    # merge_and_unload goes through the same kernel and hands back plain nn.Linear layers
    merged = model.merge_and_unload()
    linears = [m for n, m in merged.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert linears and all(type(m) is nn.Linear for m in linears)
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expect[0])


def test_patched_safe_merge_refuses_a_broken_adapter():
    model = _tiny_llama()
    lk.patch(model)
    layer = _fused_layers(model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged
