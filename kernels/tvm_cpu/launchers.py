"""The `tvm` backend of every lowered op on the CPU target: pack weights, allocate outputs, launch.

Each launcher checks shapes, allocates its outputs and calls the compiled module on torch tensors directly
(DLPack, no copies). Weights are packed into the panel layout of ir/tvm_ir.py once and memoised per
(tensor, version, panel width): an in-place update of a parameter bumps its version and forces a repack. At
most MAX_LAYOUTS panel widths are kept per weight (least recently used dropped): each is a full copy, and a
tuner trying every width on a Mixtral-size layer would otherwise hold four (the worker was OOM-killed at 24 GB).
A weight that is already a PackedWeight of the launch's layout (TunedMoE.pack_weights; kernels/packed.py) is
read as it is: no copy at all.
The GEMMs run on the used blocks of an align output (`Aligned.trimmed`, a free host read on the CPU), so one
with empty trailing blocks (kernels/ops.py) works too; gemm1 zeroes those blocks' rows.
Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per block, NB blocks, P panel.
"""

from __future__ import annotations

from typing import Any

import torch

from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.kernels.cache import TensorMemo
from moetune.kernels.ops import Aligned, max_blocks
from moetune.kernels.ops import check_tensor as _check
from moetune.kernels.packed import PackedWeight, layout_of, pack
from moetune.kernels.quant import QuantizedWeight, fake_quant_rows
from moetune.kernels.registry import KernelConfig, register_backend, register_impl
from moetune.kernels.scratch import scratch
from moetune.kernels.tvm_cpu.build import build
from moetune.schedules import tvm_cpu

register_backend("tvm", space=tvm_cpu.space, default=tvm_cpu.default_point)

MAX_LAYOUTS = 2  # packed copies kept per weight and k-packing (e.g. a decode and a prefill panel width)
_PACKED = TensorMemo(per_group=MAX_LAYOUTS)  # per (weight, part, interleave): its panel widths, least recent first


_MODULES: dict[tuple, Any] = {}


def _module(problem: Problem, config: KernelConfig, target: Target) -> Any:
    """build() memoised on the hashable (problem, config, target): a launch skips hashing build's cache key (half
    of a small layer's host time at T=1: 180 -> 132 us per call on the Zen4 host)."""
    key = (problem, config, target.name)
    if key not in _MODULES:
        _MODULES[key] = build(problem, config.as_dict(), target)
    return _MODULES[key]


def _packed(source: torch.Tensor, part: slice, panel: int, interleave: int | None = None, kpack=1) -> torch.Tensor:
    """pack(source[:, part]) memoised on the owning tensor's identity and version (kernels/cache.py).

    `interleave=I` packs a (G, 2I, Kd) [gate | up] tensor into (G, ceil(I/P), Kd, 2P) panels of P gate
    columns followed by the P matching up columns (gemm1's layout); kpack 2 pairs consecutive k (kernels/
    packed.py). `source` may be a fresh view (e.g. weight.unsqueeze(0)): views share their base's version
    counter, so the memo is keyed on the base.
    """
    if (
        isinstance(source, PackedWeight)
        and source.layout() == layout_of(panel, interleave, kpack)
        and part == slice(None)
    ):
        return source.packed  # packed in place (TunedMoE.pack_weights): the only copy there is

    def make() -> torch.Tensor:
        w = source.unpack() if isinstance(source, PackedWeight) else source.detach()
        return pack(w if interleave is not None else w[:, part], panel, interleave, kpack)

    return _PACKED.get([source], make, group=(part.start, part.stop, interleave, kpack), variant=panel)


KPACK = {"vnni": 4, "bf16": 2}  # k per 32-bit word of each dot-product kernel's weight layout


def weight_layout(problem: Problem, target: Target, panel: int, interleave: int | None) -> tuple[int | None, ...]:
    """The layout a GEMM's kernel reads its weight in (PackedWeight / QuantizedWeight .layout()): the panels,
    with the k-packing of the dot-product kernels (kpack 4: VNNI codes; 2: bf16 pairs) where they run. The one
    place that decides it: the launchers and TunedMoE's in-place packing (model/runtime/inplace.py) both ask."""
    kind = tvm_cpu.dot_kernel(problem, target)
    return layout_of(panel, interleave, 1 if kind is None else KPACK[kind])


def _quantized(source: torch.Tensor, problem: Problem, layout: tuple[int | None, ...]) -> list[torch.Tensor]:
    """[codes, scales] of a quantized GEMM's weight in `layout` (weight_layout): a QuantizedWeight of that layout
    as it is (quantized in place: TunedMoE.pack_weights), else re-laid out or quantized once and memoised."""
    fmt, group = problem["wq"], problem["G"]
    if isinstance(source, QuantizedWeight) and (source.fmt, source.group) != (fmt, group):
        raise ValueError(f"{problem.op} needs {fmt} weights of group {group}, got {source!r}")

    def make() -> QuantizedWeight:
        if isinstance(source, QuantizedWeight):
            return source.in_layout(*layout)
        return QuantizedWeight.of(source.detach(), fmt, group, *layout)

    if isinstance(source, QuantizedWeight) and source.layout() == layout:
        q = source
    else:
        q = _PACKED.get([source], make, group=("q", *layout[1:]), variant=layout[0])
    return [q.codes, q.scales]


def _weight_args(
    problem: Problem, source: torch.Tensor, panel: int, interleave: int | None, lhs: torch.Tensor
) -> list[torch.Tensor]:
    """The kernel arguments of a GEMM's weight: its packed panels, or a quantized one's codes and scales (int4:
    and the input `lhs` summed per group of G, which the kernel subtracts 8 times per group: ir/tvm_ir.py)."""
    if problem.quant == "none":
        return [_packed(source, slice(None), panel, interleave)]
    args = _quantized(source, problem, (panel, interleave))
    if problem.quant == "int4":
        group = problem["G"]
        args.append(lhs.float().unflatten(-1, (lhs.shape[-1] // group, group)).sum(-1).contiguous())
    return args


def _dot_args(
    mod: Any, kind: str, problem: Problem, target: Target, source: torch.Tensor, panel: int, interleave, lhs
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The arguments of a dot-product kernel's reduction before rows and bexp, and after them. bf16
    (ir/tvm_bf16.py): the input (R, K) as 32-bit words of k pairs; the weight's k-paired words. w8a8 / w4a8
    (ir/tvm_vnni.py): the input quantized per row and group by the module's "quant" (codes as 32-bit words,
    scales, code sums); the weight's VNNI words and scales."""
    if kind == "bf16":
        words = _packed(source, slice(None), *weight_layout(problem, target, panel, interleave))
        lhs = lhs if lhs.storage_offset() % 2 == 0 else lhs.clone()  # 32-bit words need an even bf16 offset
        return [lhs.view(torch.int32)], [words.view(torch.int32).squeeze(-1)]
    rows, k = lhs.shape
    xq = scratch("xq", (rows, k), torch.int8)
    groups = k // problem["G"]
    xs, xsum = scratch("xs", (rows, groups), torch.float32), scratch("xsum", (rows, groups), torch.int32)
    mod["quant"](lhs, xq, xs, xsum)
    codes, scales = _quantized(source, problem, weight_layout(problem, target, panel, interleave))
    return [xq.view(torch.int32), xs, xsum], [codes.view(torch.int32).squeeze(-1), scales]


@register_impl("route", "tvm")
def route(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    correction_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    h, e, k = problem["H"], problem["E"], problem["K"]
    _check("route weight", weight, (e, h), x.dtype)
    mod = _module(problem, config, target)
    x = x.contiguous()
    t = x.shape[0]
    logits = torch.empty(t, e, dtype=torch.float32)
    args = [x, _packed(weight.unsqueeze(0), slice(None), config["nt"])[0]]
    if problem["bias"]:
        args.append(bias.contiguous())
    mod["logits"](*args, logits)
    cb = correction_bias.float().contiguous() if problem["cbias"] else torch.zeros(e)
    weights, ids = torch.empty(t, k, dtype=torch.float32), torch.empty(t, k, dtype=torch.int32)
    mod["select"](logits, cb, weights, ids)
    return weights, ids


@register_impl("align", "tvm")
def align(problem: Problem, config: KernelConfig, target: Target, weights: torch.Tensor, ids: torch.Tensor) -> Aligned:
    e, bm = problem["E"], problem["BM"]
    t, k = ids.shape
    nbmax = max_blocks(t * k, e, bm)
    i32 = torch.int32
    tok, slot = torch.empty(nbmax, bm, dtype=i32), torch.empty(nbmax, bm, dtype=i32)
    wt, bexp = torch.empty(nbmax, bm, dtype=torch.float32), torch.empty(nbmax, dtype=i32)
    inv, counts = torch.empty(t, k, dtype=i32), torch.empty(e, dtype=i32)
    offsets, nblocks = torch.empty(e + 1, dtype=i32), torch.empty(1, dtype=i32)
    _module(problem, config, target)["align"](
        ids.to(i32).contiguous(), weights.float().contiguous(), tok, wt, slot, bexp, inv, counts, offsets, nblocks
    )
    nb = int(nblocks[0])
    return Aligned(tok[:nb], wt[:nb], slot[:nb], bexp[:nb], inv, counts, offsets)


@register_impl("gemm1", "tvm")
@register_impl("qgemm1", "tvm")
def gemm1(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    x: torch.Tensor,
    al: Aligned,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
) -> torch.Tensor:
    h, i, e, bm, gated = problem["H"], problem["I"], problem["E"], problem["BM"], problem["gated"]
    _check("gate_up_proj", gate_up_proj, (e, (2 if gated else 1) * i, h), x.dtype)  # a QuantizedWeight for qgemm1
    _check("aligned rows", al.sorted_token, (al.num_blocks, bm))
    nb_all, al = al.num_blocks, al.trimmed()
    mod = _module(problem, config, target)
    nt = config["nt"]
    out = torch.empty(nb_all, bm, i, dtype=x.dtype)
    out[al.num_blocks :] = 0  # empty trailing blocks
    kind = tvm_cpu.dot_kernel(problem, target)
    if kind is not None:
        lhs, weight = _dot_args(mod, kind, problem, target, gate_up_proj, nt, i if gated else None, x.contiguous())
        acc = scratch("acc", (al.num_blocks, bm, weight[0].shape[1] * weight[0].shape[3]), torch.float32)
        mod["acc"](*lhs, al.sorted_token, al.block_expert, *weight, acc)
        bias = [gate_up_bias.contiguous()] if problem["bias"] else []
        mod["main"](al.sorted_weight, al.block_expert, *bias, acc, out[: al.num_blocks])
        return out
    if problem.act_quant:  # w8a8 / w4a8 without VNNI: the weight-only kernel on the quantized input's values
        x = fake_quant_rows(x, problem["G"]).to(x.dtype)
    args = [
        x.contiguous(),
        al.sorted_token,
        al.sorted_weight,
        al.block_expert,
        # gated: interleaved gate|up panels (pack_gate_up); non-gated: plain up panels (pack_panels)
        *_weight_args(problem, gate_up_proj, nt, i if gated else None, x),
    ]
    if problem["bias"]:
        args.append(gate_up_bias.contiguous())
    mod["main"](*args, out[: al.num_blocks])
    return out


@register_impl("gemm2", "tvm")
@register_impl("qgemm2", "tvm")
def gemm2(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    act: torch.Tensor,
    al: Aligned,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    h, i, e, bm = problem["H"], problem["I"], problem["E"], problem["BM"]
    _check("down_proj", down_proj, (e, h, i), act.dtype)
    _check("act", act, (al.num_blocks, bm, i), act.dtype)
    al = al.trimmed()
    mod = _module(problem, config, target)
    rows = act[: al.num_blocks].contiguous()
    t = al.inverse.shape[0]
    z = scratch("z", (al.num_blocks, bm, h), torch.float32)
    out = torch.empty(t, h, dtype=act.dtype)
    kind = tvm_cpu.dot_kernel(problem, target)
    if kind is not None:
        lhs, weight = _dot_args(mod, kind, problem, target, down_proj, config["nt"], None, rows.view(-1, i))
        slots = torch.arange(al.num_blocks * bm, dtype=torch.int32).view(-1, bm)
        acc = scratch("acc", (al.num_blocks, bm, weight[0].shape[1] * weight[0].shape[3]), torch.float32)
        mod["acc"](*lhs, slots, al.block_expert, *weight, acc)
        bias = [down_bias.contiguous()] if problem["bias"] else []
        mod["main"](al.sorted_weight, al.block_expert, al.inverse, *bias, acc, z, out)
        return out
    if problem.act_quant:
        rows = fake_quant_rows(rows, problem["G"]).to(rows.dtype)
    args = [
        rows,
        al.sorted_weight,
        al.block_expert,
        al.inverse,
        *_weight_args(problem, down_proj, config["nt"], None, rows),
    ]
    if problem["bias"]:
        args.append(down_bias.contiguous())
    mod["main"](*args, z, out)
    return out
