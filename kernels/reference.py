"""The one reference implementation of every MoE op: readable torch, no tricks.

Every kernel, test and benchmark in moetune compares against these functions (through model.MoE, which is
nothing but these ops wired together). Clarity beats speed here: the experts run in a plain loop over E.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, Is shared intermediate.
Numerics: router logits and scores are computed in fp32 whatever the activations' dtype (as HF's
DeepSeek/Qwen routers do); expert outputs are weighted and summed in fp32, then cast to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetune.model.config import MoEConfig


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
    else:  # topk_softmax / topk_sigmoid choose on the raw logits
        scores = choice = logits
    if cfg.n_group > 1:
        choice = choice.masked_fill(~_group_mask(choice, cfg), float("-inf"))
    ids = choice.topk(cfg.top_k, dim=-1).indices
    chosen = scores.gather(1, ids)
    if cfg.router == "topk_softmax":
        weights = chosen.softmax(dim=-1)
    elif cfg.router == "topk_sigmoid":
        weights = chosen.sigmoid()
    else:
        weights = chosen
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def activation(gate_up: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """gate_up (..., 2I) laid out [gate | up] -> act(gate) * up (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if cfg.activation == "swiglu_oai":  # gpt-oss: clamped, (up + 1) * gate * sigmoid(alpha * gate)
        gate = gate.clamp(max=cfg.swiglu_limit)
        up = up.clamp(min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * cfg.swiglu_alpha))
    act = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "relu": F.relu,
    }[cfg.activation]
    return act(gate) * up


def expert_mlp(
    x: torch.Tensor,
    gate_up_w: torch.Tensor,  # (2I, H)
    down_w: torch.Tensor,  # (H, I)
    gate_up_b: torch.Tensor | None,  # (2I,)
    down_b: torch.Tensor | None,  # (H,)
    cfg: MoEConfig,
) -> torch.Tensor:
    """One gated MLP: x (N, H) -> (N, H)."""
    return F.linear(activation(F.linear(x, gate_up_w, gate_up_b), cfg), down_w, down_b)


def routed_experts(
    x: torch.Tensor,  # (T, H)
    weights: torch.Tensor,  # (T, K) fp32
    ids: torch.Tensor,  # (T, K) int64
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    down_proj: torch.Tensor,  # (E, H, I)
    gate_up_bias: torch.Tensor | None,  # (E, 2I)
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
        ).float()
        out.index_add_(0, token, ye if cfg.apply_router_weight_on_input else ye * w)
    return out.to(x.dtype)


def shared_expert(
    x: torch.Tensor,  # (T, H)
    gate_up_w: torch.Tensor,  # (2Is, H)
    down_w: torch.Tensor,  # (H, Is)
    gate_w: torch.Tensor | None,  # (1, H): sigmoid gate on the output (Qwen2-MoE)
    cfg: MoEConfig,
) -> torch.Tensor:
    """The always-on shared expert(s) -> (T, H). Uses the routed experts' activation."""
    y = expert_mlp(x, gate_up_w, down_w, None, None, cfg)
    if gate_w is not None:
        y = torch.sigmoid(F.linear(x, gate_w)) * y
    return y
