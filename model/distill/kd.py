"""The two knowledge-distillation stages of model/distill/pipeline.py and the training forward they share.

Stage 1 (layerwise_kd): each MoE layer in turn, on cached activations, regressed onto the teacher's layer output.
Stage 2 (end_to_end_kd): the whole student against the teacher, per batch of texts. Losses, the straight-through
router gate and what trains: see model/distill/pipeline.py's docstring.

Legend: B batch, L sequence length, T tokens, H hidden, I per-expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moetune.kernels import reference as ref
from moetune.model.distill.student import MoEStudent, mean_pool, tokenize
from moetune.model.moe import MoE

# ---- the training forward ------------------------------------------------------------------------------


class TrainRouting:
    """MoEFFN.train_forward during KD: MoE.forward's value, differentiable into the router, plus the aux loss.

    All E experts run as one masked dense GEMM pair (the unchosen experts' activations multiplied by 0): on CPU
    this measured 1.6-2.7x faster per token than running only the chosen experts the way MoE.forward does
    (per-expert gathers and scatters in forward and backward cost more than the FLOPs they save at these
    sizes). The routing target needs every expert's output anyway; it is computed without gradient on at most
    `aux_tokens` tokens of the batch.
    """

    def __init__(self, straight_through: bool = True, aux: bool = True, aux_tokens: int = 128):
        self.straight_through = straight_through
        self.aux = aux
        self.aux_tokens = aux_tokens
        self.losses: list[torch.Tensor] = []  # one routing-target loss per MoE layer of the current forward

    def __call__(self, moe: MoE, x: torch.Tensor) -> torch.Tensor:
        cfg, ex = moe.cfg, moe.experts
        lead, h, e, i = x.shape[:-1], cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        x2 = x.reshape(-1, h)  # (T, H)
        logits = ref.router_logits(x2, moe.router.weight, moe.router.bias)  # (T, E) fp32
        weights, ids = ref.select_experts(logits, cfg)  # topk_hard: weights all 1.0
        if self.straight_through:
            p = logits.softmax(dim=-1).gather(1, ids)
            weights = weights + p - p.detach()
        gate = torch.zeros_like(logits).scatter(1, ids, weights)  # (T, E): 1.0 on the chosen experts
        pre = F.linear(x2, ex.gate_up_proj.reshape(e * i, h), ex.gate_up_bias.reshape(e * i))
        a = ref.plain_act(pre, cfg.activation).view(-1, e, i)  # (T, E, I)
        down = ex.down_proj.permute(1, 0, 2)  # (H, E, I)
        out = F.linear((a * gate.unsqueeze(-1)).reshape(-1, e * i), down.reshape(h, e * i)) + gate @ ex.down_bias
        if self.aux:
            rows = torch.linspace(0, x2.shape[0] - 1, min(self.aux_tokens, x2.shape[0])).long()
            with torch.no_grad():  # each expert's output as it is now, centred: the moefy routing target
                y = torch.einsum("tei,hei->teh", a[rows], down)  # (t, E, H)
                scores = (y - y.mean(dim=0)).norm(dim=-1)  # (t, E)
                target = torch.softmax(scores / scores.std(dim=-1, keepdim=True).clamp_min(1e-6), dim=-1)
            self.losses.append(F.cross_entropy(logits[rows], target))
        return out.reshape(*lead, h).to(x.dtype)


def _hidden_loss(hs_s, hs_t, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the relative MSE of the layer outputs on real tokens."""
    m = mask.bool()
    terms = [((s[m] - t[m]).pow(2).sum() / t[m].pow(2).sum()) for s, t in zip(hs_s[1:], hs_t[1:], strict=True)]
    return torch.stack(terms).mean()


def _ffn_params(ffn) -> list[torch.nn.Parameter]:
    """What distillation trains in one MoEFFN: its MoE (router + experts) and its shared expert, if any."""
    return [*ffn.moe.parameters(), *(ffn.shared.parameters() if ffn.shared is not None else ())]


def _trainable(student: MoEStudent, train: str) -> list[torch.nn.Parameter]:
    if train not in ("moe", "all"):
        raise ValueError(f"train must be 'moe' or 'all', got {train!r}")
    for p in student.parameters():
        p.requires_grad_(train == "all")
    moe_params = [p for n in student.moe_cfgs for p in _ffn_params(student.moe_ffn(n))]
    for p in moe_params:
        p.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]


# ---- stage 1: layer by layer, on cached activations --------------------------------------------------


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


@torch.no_grad()
def _real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[mask.bool()].float()


@torch.no_grad()
def _student_ffn_inputs(student: MoEStudent, batches, layer: int) -> torch.Tensor:
    """The student's FFN input at `layer` (its own attention output, earlier MoE layers included): (N, H)."""
    got = []

    def hook(_module, args):
        got.append(args[0])
        raise _Stop

    handle = student.moe_ffn(layer).register_forward_pre_hook(hook)
    try:
        for b in batches:
            with contextlib.suppress(_Stop):
                student(b["input_ids"], b["attention_mask"])
    finally:
        handle.remove()
    return torch.cat([_real_tokens(x, b["attention_mask"]) for x, b in zip(got, batches, strict=True)])


def layerwise_kd(
    student: MoEStudent,
    teacher,
    batches: list[dict[str, torch.Tensor]],
    *,
    epochs: int = 4,
    lr: float = 1e-3,
    batch_tokens: int = 1024,
    router_weight: float = 0.1,
    seed: int = 0,
    note: Callable[[dict[str, Any]], None] = lambda _info: None,
) -> list[dict[str, float]]:
    """Train each MoE layer in turn (router + experts) so that LayerNorm(MoE(x_s) + x_s) = the teacher's layer output.

    x_s is the student's own FFN input (the layers before it already MoE), so each layer also learns to undo the
    error of the ones before; the teacher's layer outputs are computed once. Cheap: no attention, no backward
    through the network, only one FFN at a time. Returns the per-layer relative error before / after.
    """
    gen = torch.Generator().manual_seed(seed)
    outs = []  # per batch, the teacher's layer outputs on real tokens only (no padding kept in memory)
    with torch.no_grad():
        for b in batches:
            hs = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            outs.append([_real_tokens(h, b["attention_mask"]) for h in hs.hidden_states])
    stats = []
    routing = TrainRouting(straight_through=True, aux=router_weight > 0)
    for pos, n in enumerate(student.moe_cfgs):
        target = torch.cat([o[n + 1] for o in outs])
        x = _student_ffn_inputs(student, batches, n)
        ffn = student.moe_ffn(n)
        scale = (target - target.mean(dim=0)).pow(2).sum(dim=-1).mean()

        def rel_err(ffn=ffn, x=x, target=target, scale=scale) -> float:
            with torch.no_grad():
                got = torch.cat([ffn(x[j : j + 4096], x[j : j + 4096]) for j in range(0, x.shape[0], 4096)])
                return ((got - target).pow(2).sum(dim=-1).mean() / scale).sqrt().item()

        before = rel_err()
        params = _ffn_params(ffn)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        total = epochs * -(-x.shape[0] // batch_tokens)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, total=total: 0.5 * (1 + math.cos(math.pi * s / total)))
        ffn.train_forward = routing
        try:
            for _ in range(epochs):
                perm = torch.randperm(x.shape[0], generator=gen)
                for j in range(0, x.shape[0], batch_tokens):
                    rows = perm[j : j + batch_tokens]
                    routing.losses.clear()
                    got = ffn(x[rows], x[rows])
                    loss = (got - target[rows]).pow(2).sum(dim=-1).mean() / scale
                    if routing.losses:
                        loss = loss + router_weight * routing.losses[0]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        finally:
            ffn.train_forward = None
            for p in params:
                p.requires_grad_(False)
        row = {"layer": n, "tokens": x.shape[0], "rel_err_before": before, "rel_err_after": rel_err()}
        stats.append(row)
        note({"phase": "layerwise", "step": pos + 1, "steps": len(student.moe_cfgs), "loss": row["rel_err_after"]})
    return stats


# ---- stage 2: end to end -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KDParams:
    """The end-to-end stage's hyper-parameters; distill() takes them as keyword arguments of the same names.

    The loss terms and the router gate: model/distill/pipeline.py's docstring. router_weight also weights stage 1's
    routing term.
    """

    batch_size: int = 32  # training texts per step
    lr: float = 3e-4  # AdamW's peak learning rate: linear warm-up, then cosine decay
    train: str = "moe"  # what trains: "moe" (routers + experts) or "all" (also attention, embeddings, LayerNorms)
    hidden_weight: float = 1.0
    embed_weight: float = 1.0
    router_weight: float = 0.1
    straight_through: bool = True  # the straight-through router gate (off: no gradient reaches the router)


def end_to_end_kd(
    student: MoEStudent,
    teacher,
    tokenizer,
    texts: list[str],
    steps: int,
    hp: KDParams = KDParams(),
    *,
    max_length: int = 128,
    seed: int = 0,
    note: Callable[[dict[str, Any]], None] = lambda _info: None,
    at_step: Callable[[int], None] = lambda _step: None,
) -> list[dict[str, float]]:
    """`steps` AdamW steps of the KD loss (module docstring) with hyper-parameters `hp` on batches of training
    texts (at most `max_length` tokens each); -> the loss rows.

    at_step(n) runs after step n (the caller's checkpoint evaluations; its time is the caller's to account).
    """
    params = _trainable(student, hp.train)
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.0)
    warm = max(1, min(20, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
    )
    routing = TrainRouting(straight_through=hp.straight_through, aux=hp.router_weight > 0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    rows = []
    student.eval()  # dropout off: the student matches a deterministic teacher
    try:
        for step in range(1, steps + 1):
            if len(order) < hp.batch_size:
                order += torch.randperm(len(texts), generator=gen).tolist()
            batch = tokenize(tokenizer, [texts[j] for j in order[: hp.batch_size]], max_length)
            del order[: hp.batch_size]
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with torch.no_grad():
                t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            routing.losses.clear()
            for n in student.moe_cfgs:
                student.moe_ffn(n).train_forward = routing
            s_out = student(ids, mask, output_hidden_states=True)
            l_hidden = _hidden_loss(s_out.hidden_states, t_out.hidden_states, mask)
            cos = (mean_pool(s_out.last_hidden_state, mask) * mean_pool(t_out.last_hidden_state, mask)).sum(-1)
            l_embed = (1 - cos).mean()
            l_router = torch.stack(routing.losses).mean() if routing.losses else torch.zeros(())
            loss = hp.hidden_weight * l_hidden + hp.embed_weight * l_embed + hp.router_weight * l_router
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            row = {"step": step, "loss": loss.item(), "hidden": l_hidden.item(), "embed": l_embed.item()}
            row["router"] = l_router.item()
            rows.append(row)
            note({"phase": "train", "steps": steps, **row})
            for n in student.moe_cfgs:
                student.moe_ffn(n).train_forward = None
            at_step(step)
    finally:
        for n in student.moe_cfgs:
            student.moe_ffn(n).train_forward = None
        for p in student.parameters():
            p.requires_grad_(False)
    return rows
