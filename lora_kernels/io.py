"""peft adapter files (adapter_config.json + adapter_model.safetensors), read and written without peft.

Only safetensors is ever read: no pickle, no torch.load, so loading an adapter cannot run code.
`load_peft(model, path)` wraps the targeted nn.Linear layers of a plain model in FusedLoRALinear
(r, alpha, rsLoRA, rank_pattern and alpha_pattern from the config) and loads the weights;
`save_peft(model, path)` writes the same format, which peft's PeftModel.from_pretrained loads.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .modules import FusedLoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Keys this loader interprets, with their types.
_USED = {"r": int, "lora_alpha": (int, float), "target_modules": (list, str), "use_rslora": bool,
         "rank_pattern": dict, "alpha_pattern": dict, "peft_type": str, "lora_dropout": (int, float)}
# Keys that change what gets adapted or how: only their "off" values are supported.
_MUST_BE_OFF = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
                "bias": "none", "layers_to_transform": None, "exclude_modules": None, "modules_to_save": None,
                "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}
# Keys that describe the file, not the math.
_INERT = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "auto_mapping",
          "megatron_config", "megatron_core", "peft_version", "qalora_group_size", "layers_pattern", "loftq_config"}


def _check_config(cfg: dict, where: str) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key, value in cfg.items():
        if key in _USED:
            if isinstance(value, bool) and _USED[key] is not bool or not isinstance(value, _USED[key]):
                raise TypeError(f"{where}: key {key!r} has type {type(value).__name__}, expected {_USED[key]}")
        elif key in _MUST_BE_OFF:
            if value not in (_MUST_BE_OFF[key], None, [], {}):
                raise ValueError(f"{where}: key {key!r}={value!r} is not supported by the fused layer")
        elif key not in _INERT and value not in (None, False, [], {}, ""):
            # A newer peft may add options; switched off they change nothing, switched on we can't honour them.
            raise ValueError(f"{where}: unknown key {key!r} (value {value!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{where}: missing key {key!r}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: key 'peft_type' is {cfg['peft_type']!r}, expected 'LORA'")
    if cfg["r"] < 1:
        raise ValueError(f"{where}: key 'r' must be >= 1, got {cfg['r']}")
    for pat_key, typ in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        for k, v in cfg.get(pat_key, {}).items():
            if isinstance(v, bool) or not isinstance(v, typ):
                raise TypeError(f"{where}: {pat_key}[{k!r}] has type {type(v).__name__}")
    return cfg


def read_peft(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config, tensors) of a peft adapter directory; safetensors only, validated."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    w_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no adapter config")
    if not os.path.isfile(w_path):
        other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" ({', '.join(other)} found: pickle files are never loaded; convert them to safetensors)" if other \
            else ""
        raise FileNotFoundError(f"{w_path}: no safetensors weights{hint}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    _check_config(cfg, cfg_path)
    from safetensors.torch import load_file
    try:
        tensors = load_file(w_path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{w_path}: unreadable safetensors file ({type(e).__name__}: {e})") from e
    return cfg, tensors


def _pattern_value(patterns: dict, name: str, default):
    # As peft matches them: a pattern names a module by its full path or a dotted suffix (a regex).
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return value
    return default


def _targets(cfg: dict, name: str) -> bool:
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        return re.fullmatch(tm, name) is not None
    return name.split(".")[-1] in tm or name in tm


def load_peft(model: nn.Module, path: str, backend: str = "auto") -> nn.Module:
    """Give a plain model the adapter in `path`: targeted nn.Linear layers become FusedLoRALinear."""
    cfg, tensors = read_peft(path)
    used = set()
    for name, module in list(model.named_modules()):
        if not (isinstance(module, (nn.Linear, FusedLoRALinear)) and _targets(cfg, name)):
            continue
        r = _pattern_value(cfg.get("rank_pattern", {}), name, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern", {}), name, cfg["lora_alpha"])
        key_a, key_b = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        for key in (key_a, key_b):
            if key not in tensors:
                raise ValueError(f"{path}: key {key!r} is missing for targeted module {name!r}")
        a, b = tensors[key_a], tensors[key_b]
        if tuple(a.shape) != (r, module.in_features):
            raise ValueError(f"{path}: key {key_a!r} has shape {tuple(a.shape)}, expected ({r}, {module.in_features})")
        if tuple(b.shape) != (module.out_features, r):
            raise ValueError(f"{path}: key {key_b!r} has shape {tuple(b.shape)}, "
                             f"expected ({module.out_features}, {r})")
        if isinstance(module, FusedLoRALinear):
            module.unmerge()
            base = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            base.weight, base.bias = module.weight, module.bias
        else:
            base = module
        layer = FusedLoRALinear.from_linear(base, r=r, lora_alpha=alpha, use_rslora=cfg.get("use_rslora", False),
                                            lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                                            init_lora_weights=False, backend=backend,
                                            adapter_dtype=a.dtype)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        _set_submodule(model, name, layer)
        used.update((key_a, key_b))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path}: key {unused[0]!r} matches no targeted nn.Linear in the model "
                         f"({len(unused)} unmatched keys)")
    return model


def _set_submodule(model, name, layer):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def save_peft(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write every FusedLoRALinear's adapter in peft's format (loadable by PeftModel.from_pretrained)."""
    from safetensors.torch import save_file
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    if not layers:
        raise ValueError("save_peft: the model has no FusedLoRALinear layers")
    rs = {n: m.r for n, m in layers.items()}
    alphas = {n: m.lora_alpha for n, m in layers.items()}
    rsl = {m.use_rslora for m in layers.values()}
    if len(rsl) != 1:
        raise ValueError("save_peft: layers mix use_rslora True and False; peft's config holds one value")
    r0 = Counter(rs.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
           "r": r0, "lora_alpha": a0, "use_rslora": rsl.pop(), "lora_dropout": 0.0, "bias": "none",
           "target_modules": sorted({n.split(".")[-1] for n in layers}),
           "rank_pattern": {n: r for n, r in rs.items() if r != r0},
           "alpha_pattern": {n: a for n, a in alphas.items() if a != a0},
           "fan_in_fan_out": False, "use_dora": False, "inference_mode": True}
    tensors = {}
    for n, m in layers.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
