"""Experts stored once: the routed experts' weight parameters replaced by PackedWeights (or, for a quantized
layer, QuantizedWeights) in place.

The CPU kernels read weights in panels (kernels/packed.py). Packing on the fly keeps a packed copy beside each
original parameter, up to one per panel width a plan uses: a patched qwen3-30b-a3b layer (2.42 GB of fp32
experts) held 5.15 GB. `pack_in_place` fixes one panel width per weight (LayerRunner.layouts: the tuned
prefill tile) and makes the runner use it at every M (LayerRunner.pin_layouts), then swaps each expert weight
parameter for a PackedWeight of the same name, shape, dtype and values whose only storage is the packed
buffer; the original storage is freed once nothing else holds it. A state_dict hook on the owning module gives
the dense values back, so `state_dict`, `save_pretrained`, safetensors and `load_state_dict` (which repacks in
place) see no difference. Inference only: the PackedWeights do not require grad.

Only weights the kernels read as they are can be packed in place: a moetune MoE's own, and HF experts stored
concatenated and not transposed (Qwen3-MoE, Mixtral, OLMoE, DeepSeek, ...). Converted copies (gpt-oss's
interleaved gate/up, Llama 4's transposed experts) are left as they are (their kernels pack on the fly).
"""

from __future__ import annotations

import torch
from torch import nn

from moetune.kernels.packed import PackedWeight, StoredWeight
from moetune.kernels.quant import QuantizedWeight
from moetune.model.moe import dense_state
from moetune.model.runtime.plan import PACKED_OPS, LayerRunner, Weights

_WEIGHT_OF = {"experts.gemm1": "experts.gate_up_proj", "experts.gemm2": "experts.down_proj"}
assert set(_WEIGHT_OF) == set(PACKED_OPS)


def _owner_of(root: nn.Module, tensor: torch.Tensor) -> tuple[nn.Module, str] | None:
    """The module and attribute of `root`'s parameter that `tensor` is (or a detached alias of), else None."""
    for module in root.modules():
        for attr, p in module._parameters.items():
            if p is None or p.shape != tensor.shape or p.dtype != tensor.dtype:
                continue
            if isinstance(p, StoredWeight) or isinstance(tensor, StoredWeight):
                same = _buffer(p) is _buffer(tensor)
            else:
                same = p.data_ptr() == tensor.data_ptr() and p.stride() == tensor.stride()
            if same:
                return module, attr
    return None


def _buffer(t: torch.Tensor) -> torch.Tensor:
    """What a stored weight's aliases share: its panels or its codes (a plain tensor is its own)."""
    return getattr(t, "packed", None) if isinstance(t, PackedWeight) else getattr(t, "codes", t)


def _stored(old: torch.Tensor, layout: tuple[int | None, ...], quant: tuple[str, int] | None) -> torch.Tensor:
    """`old` in `layout`: packed panels, or for a quantized layer codes + scales (quantized now if it is dense)."""
    if quant is not None:
        if isinstance(old, QuantizedWeight):
            if (old.fmt, old.group) != quant:
                raise ValueError(f"the layer is {quant[0]} (group {quant[1]}) but its weight is {old!r}")
            return old.in_layout(*layout)
        dense = old.unpack() if isinstance(old, StoredWeight) else old.detach()
        return QuantizedWeight.of(dense, *quant, *layout)
    if isinstance(old, PackedWeight) and old.layout() == layout:
        return old
    return PackedWeight.of(old.unpack() if isinstance(old, PackedWeight) else old.detach(), *layout)


def _weight_layout(problem, target, layout: tuple[int | None, int | None]) -> tuple[int | None, ...]:
    """The tvm kernels' layout of a weight (kernels/tvm_cpu/launchers.py: weight_layout), imported only where a
    panel says the tvm backend runs (the GPU path needs no TVM)."""
    from moetune.kernels.tvm_cpu.launchers import weight_layout

    return weight_layout(problem, target, *layout)


def pack_in_place(root: nn.Module, weights: Weights, runner: LayerRunner) -> dict[str, tuple[int, int | None]]:
    """Pack the routed experts' weights of `root` (the module owning the parameters) in place, as the runner's
    CPU kernels read them. Returns {moetune weight name: (panel, gate|up interleave or None)} for what was
    packed (the stored weight's own `.layout()` adds the k-packing of a dot-product kernel: weight_layout); {}
    where the runner does not use the tvm backend. A quantized layer (runner.cfg.quant) stores codes
    and scales (kernels/quant.py) instead, quantizing dense weights now, in the natural layout (panel None) where
    the runner does not use the tvm backend. The caller must drop its own references to the old weights
    (memoised conversions) for their storage to be freed."""
    cfg = runner.cfg
    quant = None if cfg.quant == "none" else (cfg.weight_quant, cfg.quant_group)
    panels = runner.layouts()
    if not panels and quant is None:
        return {}
    program = runner.plan(1).program
    done: dict[str, tuple[int, int | None]] = {}
    for op, name in _WEIGHT_OF.items():
        tensor = weights.get(name)
        found = _owner_of(root, tensor) if tensor is not None else None
        if found is None:
            continue  # a converted copy: packed on the fly by the kernels
        module, attr = found
        problem = program.op(op)
        panel = panels.get(op)
        interleave = problem["I"] if op == "experts.gemm1" and problem["gated"] and panel is not None else None
        layout = (panel, interleave)
        old = module._parameters[attr]
        stored = _weight_layout(problem, runner.target, layout) if panel is not None else layout
        new = _stored(old, stored, quant)
        if new is not old:
            del old
            setattr(module, attr, nn.Parameter(new, requires_grad=False))
        if not getattr(module, "_moetune_dense_state", False):
            module._register_state_dict_hook(dense_state)
            module._moetune_dense_state = True
        done[name] = layout
    runner.pin_layouts({op: panels[op] for op, name in _WEIGHT_OF.items() if name in done and op in panels})
    return done


def unpack_in_place(root: nn.Module) -> int:
    """The inverse of pack_in_place: every PackedWeight parameter under `root` becomes a dense parameter again
    (e.g. to hand the model back to code that reads the weights directly). Returns how many were unpacked.
    Quantized weights stay quantized (their layout goes back to natural): dense values would be a new model."""
    count = 0
    for module in root.modules():
        for attr, p in list(module._parameters.items()):
            if isinstance(p, PackedWeight):
                setattr(module, attr, nn.Parameter(p.unpack(), requires_grad=False))
                count += 1
            elif isinstance(p, QuantizedWeight) and p.panel is not None:
                setattr(module, attr, nn.Parameter(p.in_layout(None), requires_grad=False))
                count += 1
    return count
