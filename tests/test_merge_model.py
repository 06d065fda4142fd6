"""merge_model / unmerge_model: grouped launches give every layer the bits merge_ / unmerge_ give it alone."""
import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.merging import group_layers, _collect
from helpers import TRITON_DEVICE

BACKENDS = ["torch"] + (["triton"] if lk.triton_available() else [])


def _layers(dtype, seed=0, device="cpu"):
    """Five layers of one shape, two of another, one with a different rank, one sharing another's weight."""
    torch.manual_seed(seed)
    mk = lambda k, n, r: lk.FusedLoRALinear(k, n, r=r, lora_alpha=2 * r, dtype=dtype, device=device)  # noqa: E731
    layers = nn.ModuleList([mk(48, 40, 4) for _ in range(5)] + [mk(40, 24, 4) for _ in range(2)] + [mk(48, 40, 8)])
    tied = mk(48, 40, 4)
    tied.weight = layers[0].weight
    layers.append(tied)
    for m in layers:
        nn.init.normal_(m.lora_B)
    return layers


def _one_by_one(layers, fn, backend):
    out = {}
    for m in layers:  # a tied weight gets both adapters, in module order, as merge_model does
        w = out.setdefault(id(m.weight), m.weight.detach().clone())
        fn(w, m.lora_A.detach(), m.lora_B.detach(), m.scaling, backend=backend)
    return [out[id(m.weight)] for m in layers]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_merge_is_bit_equal_to_single_layer_merges(backend, dtype):
    layers = _layers(dtype, device=TRITON_DEVICE if backend == "triton" else "cpu")
    original = [m.weight.detach().clone() for m in layers]
    expect = _one_by_one(layers, lk.merge_, backend)
    lk.merge_model(layers, backend=backend)
    assert all(m.merged for m in layers)
    for got, want in zip(layers, expect):
        assert torch.equal(got.weight.view(torch.uint8), want.view(torch.uint8))
    merged = [m.weight.detach().clone() for m in layers]
    lk.unmerge_model(layers, backend=backend)
    assert not any(m.merged for m in layers)
    size = {}  # per weight: |W| + every |s·B·A| it carries, the scale of the roundings a merge makes
    for m, w0 in zip(layers, original):
        delta = (m.scaling * m.lora_B.double() @ m.lora_A.double()).abs()
        size[id(m.weight)] = size.get(id(m.weight), w0.double().abs()) + delta
    for m, w0 in zip(layers, original):  # unmerge lands within the merge's rounding of the original
        err = (m.weight.double() - w0.double()).abs()
        assert (err <= 2 * torch.finfo(dtype).eps * size[id(m.weight)] + 1e-30).all()
    lk.merge_model(layers, backend=backend)  # and re-merge is bit-equal, so drift never grows
    for m, w in zip(layers, merged):  # the tied weight too, which carries two adapters
        assert torch.equal(m.weight.view(torch.uint8), w.view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_weight_with_two_adapters_that_nearly_cancel_it_re_merges_bit_equal(backend, dtype):
    """W ≈ -s·B₁·A₁ everywhere: the first merge lands near zero on a fine grid, the second adapter lifts it back
    to a coarse one, and one-at-a-time unmerges land a unit off any value that re-merges to the same bits."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bfloat16; bf16 runs on the GPU")
    first = lk.FusedLoRALinear(64, 48, r=4, lora_alpha=8, dtype=dtype, device=device)
    second = lk.FusedLoRALinear(64, 48, r=4, lora_alpha=8, dtype=dtype, device=device)
    second.weight = first.weight
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in (first, second):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
        d1 = first.scaling * first.lora_B.double().cpu() @ first.lora_A.double().cpu()
        near = -d1 * (1 + 1e-3 * torch.randn(d1.shape, generator=g, dtype=torch.float64))
        first.weight.copy_(near.to(dtype))
    layers = nn.ModuleList([first, second])
    original = first.weight.detach().clone()
    lk.merge_model(layers, backend=backend)
    merged = first.weight.detach().clone()
    lk.unmerge_model(layers, backend=backend)
    d2 = second.scaling * second.lora_B.double() @ second.lora_A.double()
    size = original.double().abs() + d1.to(device).abs() + d2.abs()
    err = (first.weight.double() - original.double()).abs()
    assert (err <= 2 * torch.finfo(dtype).eps * size + 1e-30).all()
    lk.merge_model(layers, backend=backend)
    assert torch.equal(first.weight.view(torch.uint8), merged.view(torch.uint8))


def test_groups_are_few_and_never_hold_overlapping_weights():
    layers = _layers(torch.float32)
    ours, *_ = _collect(layers, unmerge=False)
    groups = group_layers(ours)
    # 48x40 r=4: the 5 + tied layer, split in two waves because of the shared weight; 40x24; 48x40 r=8.
    assert sorted(len(g) for g in groups) == [1, 1, 2, 5]
    for g in groups:
        ptrs = [layer.weight.data_ptr() for layer in g]
        assert len(set(ptrs)) == len(ptrs)
    # A view that starts off a 16-byte boundary cannot join a group; it still merges, alone.
    big = torch.randn(41 * 48)
    odd = lk.FusedLoRALinear(48, 40, r=4, dtype=torch.float32)
    odd.weight = nn.Parameter(big[1:1 + 40 * 48].view(40, 48), requires_grad=False)
    ours, *_ = _collect(nn.ModuleList([odd, layers[1]]), unmerge=False)
    assert sorted(len(g) for g in group_layers(ours)) == [1, 1]


def test_partly_overlapping_weights_never_share_a_group():
    """Weights viewed out of one buffer: neighbours share a launch, a view across both goes to the next wave
    (the overlap test bisects each wave's sorted byte ranges)."""
    buf = torch.randn(3 * 40 * 48)
    views = [buf[o:o + 40 * 48].view(40, 48) for o in (0, 40 * 48, 20 * 48, 2 * 40 * 48, 60 * 48)]
    layers = nn.ModuleList()
    for v in views:
        m = lk.FusedLoRALinear(48, 40, r=4, dtype=torch.float32)
        m.weight = nn.Parameter(v, requires_grad=False)
        layers.append(m)
    ours, *_ = _collect(layers, unmerge=False)
    groups = group_layers(ours)
    assert [[ours.index(g) for g in group] for group in groups] == [[0, 1, 3], [2, 4]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_model_moves_the_weights_version(backend):
    """Eager merge_model skips the custom-op layer (a kernel's write moves no version); a backward that saved
    W before the merge must still refuse to run with the merged weight."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    layers = _layers(torch.float32, device=device)
    x = torch.randn(3, 48, device=device, requires_grad=True)
    y = layers[1](x)
    lk.merge_model(layers, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bad_layer_raises_with_its_name_and_changes_nothing():
    layers = _layers(torch.float32)
    layers[3].scaling = float("inf")
    before = [m.weight.detach().clone() for m in layers]
    with pytest.raises(ValueError, match=r"^3: scaling"):
        lk.merge_model(layers)
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, before))
    assert not any(m.merged for m in layers)


@pytest.mark.parametrize("patched", [False, True])
def test_peft_model_merge_matches_peft_and_round_trips(patched, caplog):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from test_patch import _tiny_llama
    model = _tiny_llama()
    if patched:
        lk.patch(model)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with caplog.at_level("INFO", logger="lora_kernels"):
        lk.merge_model(model)
    assert "14 layers merged" in caplog.text
    lora = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    assert len(lora) == 14 and all(m.merged_adapters == ["default"] for m in lora)
    with torch.no_grad():
        merged_out = model(input_ids=ids).logits  # peft's forward on a merged layer: base only
    torch.testing.assert_close(merged_out, before, rtol=1e-4, atol=1e-4)
    merged = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    lk.unmerge_model(model)
    assert not any(m.merged for m in lora)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    model.merge_adapter()  # peft's own merge and our unmerge agree to an ulp; ours re-merges bit-equal
    lk.unmerge_model(model)
    lk.merge_model(model)
    for n, p in model.named_parameters():
        if n in merged:
            assert torch.equal(p, merged[n]), n


def test_peft_layers_it_cannot_serve_use_peft_merge(caplog):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from test_patch import _tiny_llama
    model = _tiny_llama(use_dora=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    with caplog.at_level("INFO", logger="lora_kernels"):
        lk.merge_model(model)
    assert "0 layers merged" in caplog.text and "14 through peft's own merge (DoRA" in caplog.text
    assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert len(changed) == 14


def test_opcheck_merge_group():
    from lora_kernels import ops
    torch.manual_seed(0)
    ws = [torch.randn(40, 48) for _ in range(3)]
    As, Bs = [torch.randn(4, 48) for _ in range(3)], [torch.randn(40, 4) for _ in range(3)]
    torch.library.opcheck(ops.merge_group_op, (ws, As, Bs, [0.5, 1.0, 2.0], False, "torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grouped_merge_on_gpu_is_bit_equal(backend, dtype):
    if backend == "cuda" and not lk.cuda_ext_available():
        pytest.skip("the CUDA extension is not built")
    layers = _layers(dtype).cuda()
    expect = _one_by_one(layers, lk.merge_, backend)
    lk.merge_model(layers, backend=backend)
    for got, want in zip(layers, expect):
        assert torch.equal(got.weight.view(torch.uint8), want.view(torch.uint8))
    merged = layers[0].weight.detach().clone()
    expect = _one_by_one(list(layers)[::-1], lk.unmerge_, backend)[::-1]
    lk.unmerge_model(layers, backend=backend)
    for got, want in list(zip(layers, expect))[1:-1]:
        assert torch.equal(got.weight.view(torch.uint8), want.view(torch.uint8))
    _check_settled_unmerge(layers[0].weight, expect[0], merged, [layers[0], layers[-1]], backend)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _check_settled_unmerge(got, one_by_one, merged, sharing, backend):
    """A weight carrying several adapters: wherever the one-at-a-time unmerge re-merges (through every adapter,
    in merge order) to the merged bits, merge_model's unmerge has its bits; everywhere, its own re-merge does."""
    def remerge(w):
        w = w.detach().clone()
        for m in sharing:
            lk.merge_(w, m.lora_A.detach(), m.lora_B.detach(), m.scaling, backend=backend)
        return w
    exact = _bits(remerge(one_by_one)) == _bits(merged)
    assert torch.equal(_bits(got)[exact], _bits(one_by_one)[exact])
    assert torch.equal(_bits(remerge(got)), _bits(merged))


def test_4bit_layers_are_left_as_they_are_and_said(caplog):
    from lora_kernels.nf4 import quantize_nf4
    torch.manual_seed(0)
    q = lk.FusedLoRALinear4bit.from_nf4(quantize_nf4(torch.randn(40, 64)), r=4)
    model = nn.ModuleList([q, lk.FusedLoRALinear(48, 40, r=4)])
    before = q.qweight.packed.clone()
    with caplog.at_level("INFO", logger="lora_kernels"):
        lk.merge_model(model)
    assert "1 layers merged" in caplog.text and "1 left as they are (FusedLoRALinear4bit" in caplog.text
    assert torch.equal(q.qweight.packed, before) and model[1].merged


@pytest.mark.gpu
def test_grouped_merge_never_waits_for_the_gpu():
    """A grouped launch sends its layer offsets and scales with an asynchronous copy from pinned memory: a
    plain copy from host memory made the host wait for the stream to drain, four times per group."""
    layers = _layers(torch.bfloat16).cuda()
    lk.merge_model(layers, backend="triton")      # first launch: compiles, sizes the grid
    lk.unmerge_model(layers, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lk.merge_model(layers, backend="triton")
        lk.unmerge_model(layers, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not any(m.merged for m in layers)
