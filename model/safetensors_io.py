"""A package's weights file: the model's state_dict in safetensors, quantized experts as their codes and scales.

A dense model is written with safetensors' own `save_model` / read with `load_model`. A model with quantized
expert weights (QuantizedWeight parameters, kernels/quant.py) would have its state_dict give their dequantized
values (model/moe.py's hook): 4-8x the bytes, and a re-quantization on load. So each such parameter `name` is
stored as `name.codes` and `name.scales`, both in the natural layout (the packing of the kernels is redone on
load, the quantization is not), with its format, group and dtype in the file's metadata; every other tensor as
in the state_dict (tied tensors once, under the first name).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moetune.kernels.quant import QuantizedWeight

QUANT_KEY = "moetune.quantized"  # file metadata: {param name: {"fmt", "group", "dtype", "shape"}}


def quantized_parameters(model: nn.Module) -> dict[str, QuantizedWeight]:
    return {name: p for name, p in model.named_parameters() if isinstance(p, QuantizedWeight)}


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file, save_model

    quantized = quantized_parameters(model)
    if not quantized:
        save_model(model, str(path), metadata={"format": "pt"})
        return
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        if name in quantized:
            continue
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and where in seen:  # a tied tensor: once (load_model's tie-aware loading restores it)
            continue
        seen.add(where)
        tensors[name] = t.detach().contiguous()
    info = {}
    for name, q in quantized.items():
        codes, scales = q.natural()
        tensors[f"{name}.codes"], tensors[f"{name}.scales"] = codes.contiguous(), scales.contiguous()
        info[name] = {
            "fmt": q.fmt,
            "group": q.group,
            "dtype": str(q.dtype).removeprefix("torch."),
            "shape": list(q.shape),
        }
    save_file(tensors, str(path), metadata={"format": "pt", QUANT_KEY: json.dumps(info, sort_keys=True)})


def load_weights(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Load `path` into `model`: quantized parameters become QuantizedWeights of the stored codes (natural layout;
    TunedMoE / patch lay them out for the kernels). Returns (missing, unexpected) keys, as load_model does."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get(QUANT_KEY, "{}"))
    if not info:
        return load_model(model, str(path), strict=False)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    for name, meta in info.items():
        codes, scales = state.pop(f"{name}.codes", None), state.pop(f"{name}.scales", None)
        if codes is None or scales is None:
            raise ValueError(f"the codes or scales of the quantized weight {name} are missing")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr not in module._parameters:
            raise ValueError(f"the model has no parameter {name} for its quantized weight")
        dtype = getattr(torch, meta["dtype"])
        q = QuantizedWeight.from_parts(codes, scales, meta["shape"], dtype, meta["fmt"], meta["group"])
        module._parameters[attr] = nn.Parameter(q, requires_grad=False)
    result = model.load_state_dict(state, strict=False)
    names: dict[int, set[str]] = {}  # a tied parameter's names: the file holds it once
    for key, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(key)
    tied = {k for group in names.values() if group & state.keys() for k in group}
    missing = [k for k in result.missing_keys if k not in info and k not in tied]
    return missing, list(result.unexpected_keys)
