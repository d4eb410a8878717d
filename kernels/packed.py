"""The CPU kernels' panel layout of a weight, and PackedWeight: a weight stored in that layout only.

Layout (ir/tvm_ir.py): a (G, N, Kd) weight, N output columns over a reduction of Kd, is stored as
(G, ceil(N/P), Kd, P) panels of P consecutive columns, zero-padded; a gated gemm1's (G, 2I, Kd) [gate | up]
weight interleaves its halves as (G, ceil(I/P), Kd, 2P): P gate columns, then the P matching up columns.
k-packed (kpack 2, the bf16 dot-product kernels of ir/tvm_bf16.py): the values of 2 consecutive k of one
column sit side by side, (G, ceil(N/P), Kd/2, W, 2), so each 32-bit word holds one column's pair of bf16.

StoredWeight is the torch side of such a weight (also the base of kernels/quant.py's QuantizedWeight).
PackedWeight is what `TunedMoE.pack_weights()` puts in place of an expert weight parameter: a tensor of the
original shape and dtype whose only storage is the packed buffer, so a model holds its experts once (the
packed copy used to sit beside the original: 2-3x the weights' memory). The tvm launchers read `.packed`
directly; every other use sees the original values:
  - any torch op on it runs on the unpacked values (a dense copy made for that op: correct, slow);
  - an in-place op (`copy_` from `load_state_dict`, `mul_`, ...) is applied to the unpacked values and packed
    back into the same buffer;
  - `detach`/`alias` (what `nn.Parameter`, `.data` and `state_dict` take) share the buffer.
A state_dict holds PackedWeights; the owner's state_dict hook (model/runtime/tuned.py) swaps them for dense
tensors, so checkpoints (safetensors, torch.save) stay plain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

aten = torch.ops.aten


def pack_panels(w: torch.Tensor, panel: int) -> torch.Tensor:
    """(G, N, Kd) -> (G, ceil(N/P), Kd, P): P consecutive output columns contiguous, zero-padded."""
    g, n, kd = w.shape
    n_pad = -(-n // panel) * panel
    if n_pad != n:
        w = torch.cat([w, w.new_zeros(g, n_pad - n, kd)], dim=1)
    return w.reshape(g, n_pad // panel, panel, kd).transpose(2, 3).contiguous()


def pack_gate_up(w: torch.Tensor, i: int, panel: int) -> torch.Tensor:
    """(G, 2I, Kd) [gate | up] -> (G, ceil(I/P), Kd, 2P): P gate columns, then the P matching up columns.

    Written straight into the result (one copy of the weights, no temporaries: Mixtral-8x7B's gate_up is
    3.8 GB in fp32)."""
    g, _, kd = w.shape
    npanel = -(-i // panel)
    out = (w.new_zeros if i % panel else w.new_empty)(g, npanel, kd, 2 * panel)
    for half, rows in enumerate((w[:, :i], w[:, i : 2 * i])):
        dest = out[..., half * panel : (half + 1) * panel]
        if i % panel:  # ragged last panel (small shapes): the padding path
            dest.copy_(pack_panels(rows, panel))
        else:
            dest.copy_(rows.reshape(g, npanel, panel, kd).transpose(2, 3))
    return out


DENSE_KPACKS = (1, 2)  # consecutive k of one column stored together: 1 (the panels), 2 (bf16 pairs)


def layout_of(panel: int | None, interleave: int | None, kpack: int = 1) -> tuple[int | None, ...]:
    """A stored weight's layout as the kernels name it: (panel, interleave), with the kpack appended when it is
    not 1 (PackedWeight / QuantizedWeight .layout(), kernels/tvm_cpu/launchers.py: weight_layout)."""
    return (panel, interleave) if kpack == 1 else (panel, interleave, kpack)


def pack(w: torch.Tensor, panel: int, interleave: int | None = None, kpack: int = 1) -> torch.Tensor:
    """pack_panels, or pack_gate_up when `interleave` is I (a gated gemm1's [gate | up] weight); kpack 2: then
    each column's consecutive k paired, (G, NP, Kd/2, W, 2) (module doc)."""
    if kpack not in DENSE_KPACKS or w.shape[-1] % kpack:
        raise ValueError(f"kpack must be one of {DENSE_KPACKS} and divide the reduction {w.shape[-1]}, got {kpack}")
    panels = pack_panels(w, panel) if interleave is None else pack_gate_up(w, interleave, panel)
    if kpack == 1:
        return panels
    g, npanel, kd, width = panels.shape
    return panels.view(g, npanel, kd // kpack, kpack, width).transpose(-1, -2).contiguous()


def unpack(packed: torch.Tensor, n: int, panel: int, interleave: int | None = None, kpack: int = 1) -> torch.Tensor:
    """The inverse of `pack`: (G, ceil(N/P), Kd, W) panels, or with kpack 2 their (G, NP, Kd/2, W, 2) form -> the
    (G, N, Kd) weight (a new contiguous tensor)."""
    if kpack != 1:
        packed = packed.transpose(-1, -2).flatten(2, 3)
    g, npanel, kd, _ = packed.shape

    def plain(p: torch.Tensor, rows: int) -> torch.Tensor:
        return p.transpose(2, 3).reshape(g, npanel * panel, kd)[:, :rows]

    if interleave is None:
        return plain(packed, n).contiguous()
    i = interleave
    return torch.cat([plain(packed[..., :panel], i), plain(packed[..., panel:], i)], dim=1)


class StoredWeight(torch.Tensor):
    """A weight of some logical shape and dtype whose storage is something else (panels, codes + scales).

    Subclasses say how to get the dense values (`unpack`), how to store new dense values into their own buffers
    (`_store`), and how to make an alias sharing those buffers (`_alias`); this class makes torch see the values
    (see the module doc): any op on it runs on `unpack()`, an in-place op or `copy_` stores the result back."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # ops reach __torch_dispatch__ as plain tensors

    def unpack(self) -> torch.Tensor:
        raise NotImplementedError

    def _store(self, dense: torch.Tensor) -> None:
        raise NotImplementedError

    def _alias(self) -> StoredWeight:
        raise NotImplementedError

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._alias()
        if func is aten.copy_.default and isinstance(args[0], StoredWeight):  # load_state_dict: store in place
            dest, src = args[0], args[1]
            src = src.unpack() if isinstance(src, StoredWeight) else src
            if tuple(src.shape) != tuple(dest.shape):
                name = type(dest).__name__
                raise RuntimeError(f"copy_ into {name}{tuple(dest.shape)} from a tensor of {tuple(src.shape)}")
            dest._store(src.to(dest.dtype))
            return dest
        dense: dict[int, torch.Tensor] = {}

        def unwrap(t: Any) -> Any:
            if isinstance(t, StoredWeight):
                dense.setdefault(id(t), t.unpack())
                return dense[id(t)]
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        written = [a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if written:  # an in-place or out= op on a stored weight: store its new values back
            named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | kwargs
            for name in written:
                target = named.get(name)
                if isinstance(target, StoredWeight):
                    target._store(dense[id(target)])
                    if out is dense[id(target)]:
                        out = target
        return out


class PackedWeight(StoredWeight):
    """A (G, N, Kd) weight whose storage is its packed panels (see the module doc)."""

    packed: torch.Tensor
    panel: int
    interleave: int | None
    kpack: int

    @staticmethod
    def __new__(cls, packed: torch.Tensor, shape: torch.Size, panel: int, interleave: int | None = None, kpack=1):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=packed.dtype, device=packed.device)
        t.packed, t.panel, t.interleave, t.kpack = packed, panel, interleave, kpack
        return t

    @classmethod
    def of(cls, w: torch.Tensor, panel: int, interleave: int | None = None, kpack: int = 1) -> PackedWeight:
        """Pack `w` (G, N, Kd) in panels of `panel` columns (gate|up interleaved when `interleave` is I; k pairs
        side by side when kpack is 2)."""
        if w.dim() != 3:
            raise ValueError(f"PackedWeight packs (G, N, Kd) weights, got shape {tuple(w.shape)}")
        return cls(pack(w.detach(), panel, interleave, kpack), w.shape, panel, interleave, kpack)

    def unpack(self) -> torch.Tensor:
        """The weight in its own layout: a new dense tensor."""
        return unpack(self.packed, self.shape[1], self.panel, self.interleave, self.kpack)

    def _store(self, dense: torch.Tensor) -> None:
        self.packed.copy_(pack(dense, self.panel, self.interleave, self.kpack))

    def _alias(self) -> PackedWeight:
        return PackedWeight(self.packed, self.shape, self.panel, self.interleave, self.kpack)

    def layout(self) -> tuple[int | None, ...]:
        return layout_of(self.panel, self.interleave, self.kpack)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        gated = f", gate|up interleaved at I={self.interleave}" if self.interleave else ""
        pairs = f", kpack={self.kpack}" if self.kpack != 1 else ""
        return f"PackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, panel={self.panel}{gated}{pairs})"
