"""peft adapter files: peft → ours reproduces peft's outputs; ours → peft loads; bad files fail clearly."""
import json
import os
import re

import pytest
import torch

import lora_kernels as lk
from lora_kernels import io

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _base(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _peft_model(rslora=False):
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=rslora,
                           target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"down_proj": 6}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    torch.manual_seed(1)
    return peft.get_peft_model(_base(), lcfg).eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_files_into_plain_model_reproduce_peft(tmp_path, rslora):
    pm = _peft_model(rslora)
    pm.save_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 12))
    expect = pm(input_ids=ids).logits
    ours = io.load_peft(_base(), str(tmp_path), backend="torch")
    fused = [m for m in ours.modules() if isinstance(m, lk.FusedLoRALinear)]
    assert len(fused) == 6 and {m.r for m in fused} == {4, 6}
    torch.testing.assert_close(ours(input_ids=ids).logits, expect, rtol=1e-4, atol=1e-4)


def test_our_files_load_in_peft(tmp_path):
    pm = _peft_model()
    pm.save_pretrained(tmp_path / "a")
    ours = io.load_peft(_base(), str(tmp_path / "a"), backend="torch")
    for m in ours.modules():
        if isinstance(m, lk.FusedLoRALinear):
            torch.nn.init.normal_(m.lora_B)                  # new weights, so the round trip means something
    io.save_peft(ours, str(tmp_path / "b"))
    back = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "b")).eval()
    ids = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def _saved(tmp_path):
    _peft_model().save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **change):
    p = os.path.join(path, io.CONFIG_NAME)
    cfg = json.load(open(p))
    cfg.update(change)
    json.dump(cfg, open(p, "w"))


@pytest.mark.parametrize("change,match", [
    ({"r": "4"}, "'r'"), ({"lora_alpha": True}, "lora_alpha"), ({"use_dora": True}, "use_dora"),
    ({"surprise": 1}, "surprise"), ({"layers_to_transform": [0]}, "layers_to_transform"), ({"peft_type": "IA3"}, "peft_type"), ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
])
def test_bad_configs_name_the_key(tmp_path, change, match):
    _edit_config(_saved(tmp_path), **change)
    with pytest.raises((ValueError, TypeError), match=match):
        io.load_peft(_base(), str(tmp_path))


def test_shape_mismatch_names_the_key(tmp_path):
    _edit_config(_saved(tmp_path), rank_pattern={})       # down_proj really has r=6
    with pytest.raises(ValueError, match="down_proj.lora_A.weight"):
        io.load_peft(_base(), str(tmp_path))


def test_truncated_or_pickled_files_are_refused(tmp_path):
    path = _saved(tmp_path)
    w = os.path.join(path, io.WEIGHTS_NAME)
    data = open(w, "rb").read()
    open(w, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        io.load_peft(_base(), str(path))
    os.remove(w)
    torch.save({"x": torch.zeros(1)}, os.path.join(path, "adapter_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickle"):
        io.load_peft(_base(), str(path))


def test_no_pickle_loading_anywhere_in_the_package():
    root = os.path.dirname(lk.__file__)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f)).read()
                assert not re.search(r"torch\.load\(|import pickle|pickle\.loads?\(|weights_only", text), f
