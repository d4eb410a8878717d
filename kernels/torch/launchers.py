"""The `torch` backend of every lowered op: vectorised and sort-based, always available.

It is a tuning candidate like any other backend (its config space is empty), so a tuned layer is never slower
than plain torch on the tuning machine. Python loops run over *experts* that received rows, never over tokens.
Device-agnostic (CPU and CUDA tensors); align and the GEMMs read row counts on the host (a sync on a GPU). The
GEMMs accept an align output with empty trailing blocks (kernels/ops.py): gemm1 zeroes their rows.
Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K, BM rows per block, NB blocks,
U = 2 for gated experts' gate_up rows [gate | up], 1 for non-gated ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetune.ir.program import Problem, route_config
from moetune.ir.target import Target
from moetune.kernels import reference as ref
from moetune.kernels.ops import Aligned
from moetune.kernels.quant import as_quantized, dequantize, fake_quant_rows
from moetune.kernels.registry import KernelConfig, register_backend, register_impl
from moetune.schedules.space import SearchSpace

# torch has nothing to tune: an empty space, whose only point is {}.
register_backend("torch", space=lambda problem, target: SearchSpace(problem.op), default=lambda problem, target: {})
_TARGETS = ("cpu", "cuda")


@register_impl("route", "torch", targets=_TARGETS)
def route(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    correction_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = ref.router_logits(x, weight, bias)
    weights, ids = ref.select_experts(logits, route_config(problem), correction_bias)
    return weights, ids.to(torch.int32)


@register_impl("align", "torch", targets=_TARGETS)
def align(problem: Problem, config: KernelConfig, target: Target, weights: torch.Tensor, ids: torch.Tensor) -> Aligned:
    e, bm = problem["E"], problem["BM"]
    t, k = ids.shape
    dev = ids.device
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, ascending slot within an expert
    counts = torch.bincount(flat, minlength=e)
    padded = (counts + bm - 1) // bm * bm
    offsets = torch.zeros(e + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    starts = torch.cumsum(counts, 0) - counts  # unpadded start of each expert in `order`
    sorted_e = flat[order]
    pos = offsets[sorted_e] + torch.arange(t * k, device=dev) - starts[sorted_e]  # padded position of order[j]
    total = int(offsets[-1])
    slot = torch.full((total,), -1, dtype=torch.int32, device=dev)
    slot[pos] = order.to(torch.int32)
    token = torch.zeros(total, dtype=torch.int32, device=dev)
    token[pos] = (order // k).to(torch.int32)
    wts = torch.zeros(total, dtype=torch.float32, device=dev)
    wts[pos] = weights.reshape(-1).float()[order]
    inverse = torch.empty(t * k, dtype=torch.int32, device=dev)
    inverse[order] = pos.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(e, dtype=torch.int32, device=dev), padded // bm)
    return Aligned(
        token.view(-1, bm),
        wts.view(-1, bm),
        slot.view(-1, bm),
        block_expert,
        inverse.view(t, k),
        counts.to(torch.int32),
        offsets.to(torch.int32),
    )


def _segments(al: Aligned):
    """(expert, start, end) padded-row ranges of the experts that have rows."""
    offs = al.offsets.tolist()
    return [(e, offs[e], offs[e + 1]) for e in range(len(offs) - 1) if offs[e + 1] > offs[e]]


def _experts(problem: Problem, w: torch.Tensor):
    """expert e -> its (N, Kd) weight: a dense weight's slice, or a quantized GEMM's expert dequantized (only the
    experts that have rows are, in the activations' dtype)."""
    if problem.quant == "none":
        return w.__getitem__
    q = as_quantized(w, problem["wq"], problem["G"]).in_layout(None)
    return lambda e: dequantize(q.codes[e : e + 1], q.scales[e : e + 1], q.fmt)[0].to(q.dtype)


@register_impl("gemm1", "torch", targets=_TARGETS)
@register_impl("qgemm1", "torch", targets=_TARGETS)
def gemm1(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    x: torch.Tensor,
    al: Aligned,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
) -> torch.Tensor:
    i, weight_of = problem["I"], _experts(problem, gate_up_proj)
    rows = x[al.sorted_token.reshape(-1).long()]  # (NB*BM, H)
    if problem.act_quant:  # w8a8 / w4a8: the quantized input's values (kernels/quant.py)
        rows = fake_quant_rows(rows, problem["G"]).to(x.dtype)
    # (NB*BM, UI): U = 2 gated, else 1
    pre = torch.empty(rows.shape[0], gate_up_proj.shape[1], dtype=x.dtype, device=x.device)
    for e, lo, hi in _segments(al):
        pre[lo:hi] = F.linear(rows[lo:hi], weight_of(e))
    pre = pre.float()
    if problem["w_in"]:
        pre = pre * al.sorted_weight.reshape(-1, 1)
    if gate_up_bias is not None:
        pre = pre + gate_up_bias.float()[al.block_expert.long()].repeat_interleave(al.block_m, 0)
    out = ref.gemm1_act(pre, problem).to(x.dtype).view(al.num_blocks, al.block_m, i)
    used = al.used_blocks()
    if used < al.num_blocks:  # empty trailing blocks (a no-host-sync align): zeros, as kernels/ops.py says
        out[used:] = 0
    return out


@register_impl("gemm2", "torch", targets=_TARGETS)
@register_impl("qgemm2", "torch", targets=_TARGETS)
def gemm2(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    act: torch.Tensor,
    al: Aligned,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    h, weight_of = problem["H"], _experts(problem, down_proj)
    rows = act.reshape(-1, act.shape[-1])  # (NB*BM, I)
    if problem.act_quant:
        rows = fake_quant_rows(rows, problem["G"]).to(act.dtype)
    z = torch.empty(rows.shape[0], h, dtype=act.dtype, device=act.device)
    for e, lo, hi in _segments(al):
        z[lo:hi] = F.linear(rows[lo:hi], weight_of(e))
    z = z.float()
    if down_bias is not None:
        z = z + down_bias.float()[al.block_expert.long()].repeat_interleave(al.block_m, 0)
    if problem["w_out"]:
        z = z * al.sorted_weight.reshape(-1, 1)
    t, k = al.inverse.shape
    return z[al.inverse.reshape(-1).long()].view(t, k, h).sum(1).to(act.dtype)
