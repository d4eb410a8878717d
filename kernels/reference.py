"""The one reference implementation of every MoE op: readable torch, no tricks.

Every kernel, test and benchmark in moetune compares against these functions: the layer ops (router, experts,
shared expert) through model.MoE, which is nothing but them wired together, and the lowered ops of
ir/program.py (route = router_logits + select_experts, align, gemm1, gemm2) directly, op by op. Clarity beats
speed here: the experts run in a plain loop over E, the lowered GEMMs in a loop over blocks.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, Is shared intermediate, U = 2 for gated
experts (gate_up rows [gate | up]) and 1 for non-gated ones (cfg.gated; gate_up holds the up projection only).
Numerics: router logits and scores are computed in fp32 whatever the activations' dtype (as HF's
DeepSeek/Qwen routers do); expert outputs are weighted and summed in fp32, then cast to the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moetune.kernels.ops import Aligned
from moetune.kernels.quant import QuantizedWeight, fake_quant_rows
from moetune.model.config import MoEConfig

if TYPE_CHECKING:  # ir.program imports model.config, whose package imports this module
    from moetune.ir.program import Problem


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, H), weight (E, H), bias (E,) or None -> logits (T, E) fp32."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _group_mask(choice: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """choice (T, E) -> bool (T, E): experts in the best `topk_group` of `n_group` groups."""
    t = choice.shape[0]
    grouped = choice.view(t, cfg.n_group, cfg.num_experts // cfg.n_group)
    if cfg.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # top2_sum
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = group_scores.topk(cfg.topk_group, dim=-1).indices  # (T, topk_group)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand_as(grouped).reshape(t, cfg.num_experts)


def select_experts(
    logits: torch.Tensor, cfg: MoEConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, E) fp32 -> (weights (T, K) fp32, ids (T, K) int64), per cfg.router."""
    if cfg.router in ("softmax", "sigmoid"):
        scores = logits.softmax(dim=-1) if cfg.router == "softmax" else logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
    else:  # topk_softmax / topk_sigmoid / topk_hard choose on the raw logits
        scores = choice = logits
    if cfg.n_group > 1:
        choice = choice.masked_fill(~_group_mask(choice, cfg), float("-inf"))
    ids = choice.topk(cfg.top_k, dim=-1).indices
    chosen = scores.gather(1, ids)
    if cfg.router == "topk_softmax":
        weights = chosen.softmax(dim=-1)
    elif cfg.router == "topk_sigmoid":
        weights = chosen.sigmoid()
    elif cfg.router == "topk_hard":  # unweighted selection: each chosen expert counts fully
        weights = torch.ones_like(chosen)
    else:
        weights = chosen
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "relu": F.relu,
}


def plain_act(v: torch.Tensor, kind: str) -> torch.Tensor:
    """act(v), elementwise: the activation of non-gated experts (any kind but swiglu_oai)."""
    if kind not in _ACTS:
        raise ValueError(f"activation {kind!r} has no non-gated form; one of {', '.join(_ACTS)}")
    return _ACTS[kind](v)


def gated_act(gate: torch.Tensor, up: torch.Tensor, kind: str, alpha: float = 0.0, limit: float = 0.0):
    """act(gate) * up, elementwise; `swiglu_oai` is gpt-oss's clamped variant with alpha / limit."""
    if kind == "swiglu_oai":  # (up + 1) * gate * sigmoid(alpha * gate), both clamped
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return plain_act(gate, kind) * up


def activation(gate_up: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """gate_up (..., UI) -> (..., I): act(gate) * up of [gate | up] when gated, else act(up)."""
    if not cfg.gated:
        return plain_act(gate_up, cfg.activation)
    gate, up = gate_up.chunk(2, dim=-1)
    return gated_act(gate, up, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)


def expert_mlp(
    x: torch.Tensor,
    gate_up_w: torch.Tensor,  # (UI, H)
    down_w: torch.Tensor,  # (H, I)
    gate_up_b: torch.Tensor | None,  # (UI,)
    down_b: torch.Tensor | None,  # (H,)
    cfg: MoEConfig,
    act_quant: bool = False,
) -> torch.Tensor:
    """One expert MLP (gated or not, per cfg.gated): x (N, H) -> (N, H). `act_quant` (w8a8 / w4a8 routed
    experts): each GEMM's input is first replaced by its int8 codes' values per row and group (kernels/quant.py)."""

    def inp(v: torch.Tensor) -> torch.Tensor:
        return fake_quant_rows(v, cfg.quant_group).to(v.dtype) if act_quant else v

    return F.linear(inp(activation(F.linear(inp(x), gate_up_w, gate_up_b), cfg)), down_w, down_b)


def routed_experts(
    x: torch.Tensor,  # (T, H)
    weights: torch.Tensor,  # (T, K) fp32
    ids: torch.Tensor,  # (T, K) int64
    gate_up_proj: torch.Tensor,  # (E, UI, H)
    down_proj: torch.Tensor,  # (E, H, I)
    gate_up_bias: torch.Tensor | None,  # (E, UI)
    down_bias: torch.Tensor | None,  # (E, H)
    cfg: MoEConfig,
) -> torch.Tensor:
    """Sum over the K chosen experts of weight * expert(x) -> (T, H), in x's dtype."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(cfg.num_experts):
        token, slot = (ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        w = weights[token, slot].unsqueeze(-1)  # (n, 1) fp32
        xe = x[token]
        if cfg.apply_router_weight_on_input:
            xe = xe * w.to(xe.dtype)
        ye = expert_mlp(
            xe,
            gate_up_proj[e],
            down_proj[e],
            None if gate_up_bias is None else gate_up_bias[e],
            None if down_bias is None else down_bias[e],
            cfg,
            cfg.act_quant,
        ).float()
        out.index_add_(0, token, ye if cfg.apply_router_weight_on_input else ye * w)
    return out.to(x.dtype)


def shared_expert(
    x: torch.Tensor,  # (T, H)
    gate_up_w: torch.Tensor,  # (UIs, H)
    down_w: torch.Tensor,  # (H, Is)
    gate_w: torch.Tensor | None,  # (1, H): sigmoid gate on the output (Qwen2-MoE)
    cfg: MoEConfig,
) -> torch.Tensor:
    """The always-on shared expert(s) -> (T, H). Uses the routed experts' activation and gatedness."""
    y = expert_mlp(x, gate_up_w, down_w, None, None, cfg)
    if gate_w is not None:
        y = torch.sigmoid(F.linear(x, gate_w)) * y
    return y


# ---- lowered ops (ir/program.py) --------------------------------------------------------------------


def align(weights: torch.Tensor, ids: torch.Tensor, num_experts: int, block_m: int) -> Aligned:
    """weights (T, K) fp32, ids (T, K) -> Aligned: slots grouped by expert (ascending slot order within one)."""
    t, k = ids.shape
    flat_ids, flat_w = ids.reshape(-1).tolist(), weights.reshape(-1).tolist()
    tokens, wts, slots, block_expert, counts, offsets = [], [], [], [], [], [0]
    inverse = [0] * (t * k)
    for e in range(num_experts):
        mine = [s for s in range(t * k) if flat_ids[s] == e]
        counts.append(len(mine))
        padded = -(-len(mine) // block_m) * block_m
        for j in range(padded):
            if j < len(mine):
                inverse[mine[j]] = len(tokens)
                tokens.append(mine[j] // k), wts.append(flat_w[mine[j]]), slots.append(mine[j])
            else:
                tokens.append(0), wts.append(0.0), slots.append(-1)
        block_expert += [e] * (padded // block_m)
        offsets.append(len(tokens))
    i32 = torch.int32
    return Aligned(
        sorted_token=torch.tensor(tokens, dtype=i32).view(-1, block_m),
        sorted_weight=torch.tensor(wts, dtype=torch.float32).view(-1, block_m),
        sorted_slot=torch.tensor(slots, dtype=i32).view(-1, block_m),
        block_expert=torch.tensor(block_expert, dtype=i32),
        inverse=torch.tensor(inverse, dtype=i32).view(t, k),
        counts=torch.tensor(counts, dtype=i32),
        offsets=torch.tensor(offsets, dtype=i32),
    )


def gemm1_act(pre: torch.Tensor, problem: Problem) -> torch.Tensor:
    """gemm1's epilogue activation: pre (..., UI) fp32 -> (..., I), gated [gate | up] or not per the problem."""
    if not problem["gated"]:
        return plain_act(pre, problem["act"])
    i = problem["I"]
    return gated_act(pre[..., :i], pre[..., i:], problem["act"], problem["alpha"], problem["limit"])


def gemm1(
    problem: Problem, x: torch.Tensor, al: Aligned, gate_up_proj: torch.Tensor, gate_up_bias: torch.Tensor | None
) -> torch.Tensor:
    """Per block: rows of x (scaled by their weight if w_in) @ gate_up_proj[e]^T + bias -> act. (NB, BM, I).

    gate_up_proj (E, UI, H), gate_up_bias (E, UI) | None; U = 2 when problem["gated"], else 1. An empty block
    (block_expert -1, see kernels/ops.py) gives zeros."""
    i = problem["I"]
    out = torch.zeros(al.num_blocks, al.block_m, i, dtype=x.dtype)
    for b in range(al.num_blocks):
        e = int(al.block_expert[b])
        if e < 0:
            continue
        pre = F.linear(x[al.sorted_token[b].long()].float(), gate_up_proj[e].float())
        if problem["w_in"]:
            pre = pre * al.sorted_weight[b].unsqueeze(-1)
        if gate_up_bias is not None:
            pre = pre + gate_up_bias[e].float()
        out[b] = gemm1_act(pre, problem).to(x.dtype)
    return out


def gemm2(
    problem: Problem,
    act: torch.Tensor,
    al: Aligned,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor | None,
    num_tokens: int,
) -> torch.Tensor:
    """Per block: act @ down_proj[e]^T + bias, times the weight if w_out; then sum each token's K rows.

    Empty blocks (block_expert -1) are skipped: no slot maps to them."""
    z = torch.zeros(al.num_blocks, al.block_m, problem["H"], dtype=torch.float32)
    for b in range(al.num_blocks):
        e = int(al.block_expert[b])
        if e < 0:
            continue
        zb = F.linear(act[b].float(), down_proj[e].float())
        if down_bias is not None:
            zb = zb + down_bias[e].float()
        z[b] = zb * al.sorted_weight[b].unsqueeze(-1) if problem["w_out"] else zb
    rows = z.reshape(-1, problem["H"])
    out = torch.zeros(num_tokens, problem["H"], dtype=torch.float32)
    for t in range(num_tokens):
        for k in range(al.inverse.shape[1]):
            out[t] += rows[int(al.inverse[t, k])]
    return out.to(act.dtype)


def _dequantized(w: torch.Tensor, problem: Problem) -> torch.Tensor:
    if not isinstance(w, QuantizedWeight) or (w.fmt, w.group) != (problem["wq"], problem["G"]):
        fmt = getattr(w, "fmt", w.dtype)
        raise ValueError(f"{problem.op} takes a {problem['wq']} QuantizedWeight of group {problem['G']}, got {fmt}")
    return w.dequantized()


def _input(problem: Problem, rows: torch.Tensor) -> torch.Tensor:
    """A quantized GEMM's input as it multiplies it: w8a8 / w4a8 (aq) the fp32 values of its int8 codes per row
    and group (kernels/quant.py), else as it is."""
    return fake_quant_rows(rows, problem["G"]) if problem.act_quant else rows


def qgemm1(
    problem: Problem, x: torch.Tensor, al: Aligned, gate_up_proj: QuantizedWeight, gate_up_bias: torch.Tensor | None
) -> torch.Tensor:
    """gemm1 on the dequantized weights (fp32 values c * s, kernels/quant.py), and with aq the quantized input."""
    act = gemm1(problem.dense(), _input(problem, x), al, _dequantized(gate_up_proj, problem), gate_up_bias)
    return act.to(x.dtype)


def qgemm2(
    problem: Problem,
    act: torch.Tensor,
    al: Aligned,
    down_proj: QuantizedWeight,
    down_bias: torch.Tensor | None,
    num_tokens: int,
) -> torch.Tensor:
    """gemm2 on the dequantized weights (fp32 values c * s, kernels/quant.py), and with aq the quantized input."""
    out = gemm2(problem.dense(), _input(problem, act), al, _dequantized(down_proj, problem), down_bias, num_tokens)
    return out.to(act.dtype)
