"""The `triton` backend of every lowered op: check shapes, allocate outputs, launch (kernels/triton_*.py).

Registered for CUDA targets. On CPU tensors the same launchers run the kernels under Triton's interpreter
(kernels/triton/common.py), which is how the CPU tests check them (fp32 and fp16; the interpreter has no bf16
tl.dot) and how `TunedMoE(configs={...: {"backend": "triton"}})` can run on a CPU, slowly.
Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K, BM rows per block, NB blocks,
P = NB*BM padded rows, U = 2 for gated experts else 1.

No launcher reads a device value on the host, so a decode step never waits on the GPU: align allocates the
static bound NB = ops.max_blocks(S, E, BM) and marks unused blocks empty (kernels/ops.py).
Router GEMM: in the kernel (config logits="fused", one launch) or torch's matmul on fp32 copies (logits="torch":
the same numbers as kernels/reference.py; the fp32 weight copy is memoised per tensor version). The tuner picks.
Quantized GEMMs (qgemm1 / qgemm2: w8a16, w4a16): the gemm1 / gemm2 launchers with the weight a QuantizedWeight
(kernels/quant.py), whose natural-layout codes and scales the kernels read (a CPU panel layout is laid out naturally
once, memoised; a dense weight is quantized once, memoised, as kernels.quant.as_quantized does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.kernels.cache import TensorMemo
from moetune.kernels.ops import Aligned, max_blocks
from moetune.kernels.ops import check_tensor as _check
from moetune.kernels.quant import QuantizedWeight, as_quantized, fake_quant_rows
from moetune.kernels.registry import KernelConfig, register_backend, register_impl
from moetune.kernels.triton import (
    align_kernel,
    aot,  # noqa: F401  (imported: hands the prepared verdicts to the space)
    gemm_kernels,
    route_kernel,
)
from moetune.kernels.triton.common import runnable
from moetune.schedules import triton as spaces

register_backend("triton", space=spaces.space, default=spaces.default_point)
_TARGETS = ("cuda",)
_FP32_COPIES = TensorMemo()
_NATURAL = TensorMemo()  # a quantized GEMM's weight as natural-layout codes (quantized, or laid out, once)


def _need(name: str, t: torch.Tensor | None, wanted: bool) -> None:
    if wanted and t is None:
        raise ValueError(f"the problem has a {name} but none was passed")


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Small routing tensors built on the host by a caller (e.g. an ungated shared expert's weights of 1)."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _fp32(w: torch.Tensor) -> torch.Tensor:
    """w.float(), memoised on the tensor's identity and version (the router weight, for torch logits)."""
    if w.dtype == torch.float32:
        return w
    return _FP32_COPIES.get([w], lambda: w.detach().float())


@register_impl("route", "triton", targets=_TARGETS)
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
    _need("router bias", bias, problem["bias"])
    _need("score-correction bias", correction_bias, problem["cbias"])
    point = config.as_dict()
    x, weight = x.contiguous(), weight.contiguous()
    t = x.shape[0]
    logits = None
    if point["logits"] == "torch":
        logits = F.linear(x.float(), _fp32(weight), None if bias is None else bias.float()).contiguous()
    cbias = correction_bias.float().contiguous() if problem["cbias"] else None
    weights = torch.empty(t, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, k, dtype=torch.int32, device=x.device)
    kernel = runnable(route_kernel._route_kernel, x.device)
    route_kernel.launch(kernel, problem, point, x, weight, bias, logits, cbias, weights, ids)
    return weights, ids


@register_impl("align", "triton", targets=_TARGETS)
def align(problem: Problem, config: KernelConfig, target: Target, weights: torch.Tensor, ids: torch.Tensor) -> Aligned:
    e, k, bm = problem["E"], problem["K"], problem["BM"]
    _check("ids", ids, (ids.shape[0], k))
    device = ids.device  # the router's output lives where the layer runs (a GPU, or the CPU interpreter)
    ids = _on(ids, device).to(torch.int32).contiguous()
    weights = _on(weights, device).float().contiguous()
    t = ids.shape[0]
    nb = max_blocks(t * k, e, bm)
    i32 = dict(dtype=torch.int32, device=device)
    token, slot = torch.empty(nb, bm, **i32), torch.empty(nb, bm, **i32)
    sorted_w = torch.empty(nb, bm, dtype=torch.float32, device=device)
    block_expert, inverse = torch.empty(nb, **i32), torch.empty(t, k, **i32)
    counts, offsets = torch.empty(e, **i32), torch.empty(e + 1, **i32)
    kernel = runnable(align_kernel._align_kernel, device)
    align_kernel.launch(
        kernel, problem, config.as_dict(), ids, weights, token, sorted_w, slot, block_expert, inverse, counts, offsets
    )
    return Aligned(token, sorted_w, slot, block_expert, inverse, counts, offsets)


def _weight(problem: Problem, w: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, scales) the GEMM kernels read: the dense weight and None, or a quantized GEMM's natural-layout
    codes and scales (a QuantizedWeight of the problem's format and group, or a dense weight quantized now)."""
    if problem.quant == "none":
        return w.contiguous(), None
    fmt, group = problem["wq"], problem["G"]
    if isinstance(w, QuantizedWeight) and w.panel is None:
        q = as_quantized(w, fmt, group)  # checks the format
    else:
        q = _NATURAL.get([w], lambda: as_quantized(w, fmt, group).in_layout(None), group=(fmt, group))
    if q.codes.device != device:
        raise ValueError(
            f"{problem.op}: the quantized weight is on {q.codes.device}, the activations on {device}: move it with "
            ".to(device) (it stays quantized)"
        )
    return q.codes.contiguous(), q.scales.contiguous()


@register_impl("gemm1", "triton", targets=_TARGETS)
@register_impl("qgemm1", "triton", targets=_TARGETS)
def gemm1(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    x: torch.Tensor,
    al: Aligned,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
) -> torch.Tensor:
    h, i, e, bm = problem["H"], problem["I"], problem["E"], problem["BM"]
    u = 2 if problem["gated"] else 1
    _check("gate_up_proj", gate_up_proj, (e, u * i, h), x.dtype)
    _check("aligned rows", al.sorted_token, (al.num_blocks, bm))
    _need("gate_up bias", gate_up_bias, problem["bias"])
    if problem["bias"]:
        _check("gate_up_bias", gate_up_bias, (e, u * i))
    x = x.contiguous()
    if problem.act_quant:  # w8a8 / w4a8 on the GPU: the weight-only kernel on the quantized input's values
        x = fake_quant_rows(x, problem["G"]).to(x.dtype)
    w, scales = _weight(problem, gate_up_proj, x.device)
    b = gate_up_bias.contiguous() if problem["bias"] else None
    out = torch.empty(al.num_blocks, bm, i, dtype=x.dtype, device=x.device)
    kernel = runnable(gemm_kernels._gemm1_kernel, x.device)
    gemm_kernels.launch_gemm1(
        kernel,
        problem,
        config.as_dict(),
        x,
        w,
        b,
        al.sorted_token.reshape(-1),
        al.sorted_weight.reshape(-1),
        al.block_expert,
        out.view(-1, i),
        scales,
    )
    return out


@register_impl("gemm2", "triton", targets=_TARGETS)
@register_impl("qgemm2", "triton", targets=_TARGETS)
def gemm2(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    act: torch.Tensor,
    al: Aligned,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    h, i, e, k, bm = problem["H"], problem["I"], problem["E"], problem["K"], problem["BM"]
    _check("down_proj", down_proj, (e, h, i), act.dtype)
    _check("act", act, (al.num_blocks, bm, i), act.dtype)
    _need("down bias", down_bias, problem["bias"])
    if problem["bias"]:
        _check("down_bias", down_bias, (e, h))
    point = config.as_dict()
    act = act.contiguous()
    if problem.act_quant:
        act = fake_quant_rows(act, problem["G"]).to(act.dtype)
    w, scales = _weight(problem, down_proj, act.device)
    b = down_bias.contiguous() if problem["bias"] else None
    t, dev = al.inverse.shape[0], act.device
    atomic = point["combine"] == "atomic"
    # slots: every slot row is written by exactly one padded row, so no zero fill; atomic: a zeroed sum
    z = torch.zeros(t, h, dtype=torch.float32, device=dev) if atomic else torch.empty(t * k, h, device=dev)
    kernel = runnable(gemm_kernels._gemm2_kernel, dev)
    gemm_kernels.launch_gemm2(
        kernel,
        problem,
        point,
        act.view(-1, i),
        w,
        b,
        al.sorted_weight.reshape(-1),
        al.sorted_slot.reshape(-1),
        al.block_expert,
        z,
        scales,
    )
    out = torch.empty(t, h, dtype=act.dtype, device=dev)
    gemm_kernels.launch_combine(runnable(gemm_kernels._combine_kernel, dev), z, out, 1 if atomic else k)
    return out
