"""MoEfication: split each dense BERT FFN into E experts by neuron co-activation, then fit a router per layer.

Data flow: calibration text -> teacher forward with hooks -> per layer, the FFN inputs x (N, H) of sampled tokens
-> neuron activations a = act(x W1^T + b1) (N, I_total) -> balanced k-means of the neurons on their
contribution patterns (I_total, N) -> E clusters of I = I_total / E neurons -> expert e holds W1[S_e], b1[S_e],
W2[:, S_e] (a permutation of the dense FFN's neurons, so the E experts together ARE the dense FFN) -> router
(linear H -> E, with bias) fitted to predict the K experts that carry most of each token's FFN output.

Measured on all-MiniLM-L6-v2 (E=8, K=2, held-out calibration tokens, oracle routing): the co-activation
clusters leave a routed error ||routed - dense|| / ||dense - mean|| of 0.244 on layer 1 and 0.397 on layer 3,
against 0.290 / 0.481 for a random split; even the best 25% of single neurons chosen per token (no expert
structure at all) leaves 0.124 / 0.224, since GELU activations are dense. Hence the distillation after it.

Shared expert (issue #20). With `shared` = S > 0, the S most IMPORTANT neurons (neuron_importance: the RMS
error of replacing a neuron by its mean, std_t(a_ti) * ||W2[:, i]||) are copied exactly, b1 and b2 included, into
an always-on SharedFFN (model/distill/student.py); the routed experts split the other It - S neurons as above, so
errors come only from dropped routed neurons. Measured on MiniLM right after moefy (256 held-out texts, no
training; results/distill/recipes.md): E=8 K=2 (25% FLOPs) 0.775; S=256 + E=32 K=6 (33%) 0.828; S=0, E=32 K=10
(32%) 0.842: GELU's dense activations make no few neurons dominant, so the shared expert pays off only after
distillation (0.924 vs 0.919 after the same layer-wise stage).

Legend: N calibration tokens, H hidden, It = I_total dense intermediate, I = (It - S) / E per expert, E, K, S.

Biases. The dense output bias b2 is spread over the experts' down_bias so that the K chosen ones always sum to
it (exactly K are chosen). On top, each expert carries a compensation: c_e = mean output of expert e over the
tokens that do not choose it (under the oracle routing). down_bias_e = b2/K - c_e + C/K with C = sum_e c_e, so
the K chosen experts add up to b2 + sum over the unchosen experts of c_e: a dropped expert is replaced by its
average contribution instead of by zero (GELU neurons are rarely exactly 0; on MiniLM, E=8 K=2, the oracle routed
error drops 0.273 -> 0.261 on layer 1, 0.435 -> 0.409 on layer 3). With K = E the compensations cancel: the
experts reproduce the dense FFN exactly.

Routing target. For token t and expert e, score s_te = ||y_te - c_e||: how far the expert's output is from
the constant that replaces it when it is dropped; the best K experts for t are the top-K of s_t. The router
(top-k on its raw logits, so only the order of the logits per token matters) is the ridge least-squares fit of
the per-token z-scored scores: closed form, and it routes as well as a soft-target cross entropy trained by Adam.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetune.kernels import reference as ref
from moetune.model.config import MoEConfig

_HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_HF_ACTS.update({"silu": "silu", "swish": "silu"})


# ---- teacher structure (BERT-style encoders) -------------------------------------------------------------


def bert_layers(teacher: nn.Module) -> nn.ModuleList:
    """The encoder layers of a BERT-style model; ValueError for any other architecture."""
    layers = getattr(getattr(teacher, "encoder", None), "layer", None)
    ok = layers is not None and all(
        hasattr(layer, "intermediate") and hasattr(getattr(layer.intermediate, "dense", None), "weight")
        for layer in layers
    )
    if not ok:
        kind = getattr(getattr(teacher, "config", None), "model_type", type(teacher).__name__)
        raise ValueError(f"unsupported teacher architecture {kind!r}: only BERT-style encoders can be MoEfied")
    return layers


def moe_activation(hf_act) -> str:
    if not isinstance(hf_act, str) or hf_act not in _HF_ACTS:
        raise ValueError(f"teacher activation {hf_act!r} has no moetune equivalent; one of {', '.join(_HF_ACTS)}")
    return _HF_ACTS[hf_act]


def check_split(intermediate: int, experts: int, top_k: int, shared: int = 0) -> None:
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ValueError(f"experts must be a positive integer, got {experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared < intermediate:
        raise ValueError(f"shared must be an integer in [0, I={intermediate}), got {shared!r}")
    if (intermediate - shared) % experts:
        raise ValueError(
            f"experts E={experts} must divide the teacher's intermediate size I={intermediate}"
            + (f" minus the shared neurons ({shared}): {intermediate - shared}" if shared else "")
        )
    if top_k > experts:
        raise ValueError(f"top_k K={top_k} must be <= experts E={experts}")


def student_config(hidden: int, intermediate: int, experts: int, top_k: int, activation: str) -> MoEConfig:
    """The MoEConfig of one MoEfied FFN: non-gated experts of `intermediate`/E neurons (the routed neurons),
    unweighted top-k routing."""
    return MoEConfig(
        hidden_size=hidden,
        intermediate_size=intermediate // experts,
        num_experts=experts,
        top_k=top_k,
        router="topk_hard",
        norm_topk_prob=False,  # the K chosen experts are summed like the dense FFN's neurons, weight 1.0 each
        router_bias=True,
        gated=False,
        expert_bias=True,
        activation=activation,
        name="moefied-ffn",
    )


@torch.no_grad()
def capture_ffn_inputs(
    teacher: nn.Module, batches: list[dict[str, torch.Tensor]], max_tokens: int, seed: int = 0
) -> list[torch.Tensor]:
    """Per layer, the FFN input (the attention block's output) of up to max_tokens real tokens: (N, H) fp32."""
    layers = bert_layers(teacher)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    mask_now: list[torch.Tensor] = []

    def hook(n):
        def fn(_module, args):
            seen[n].append(args[0][mask_now[0]].detach().float())

        return fn

    handles = [layer.intermediate.register_forward_pre_hook(hook(n)) for n, layer in enumerate(layers)]
    try:
        for batch in batches:
            mask_now[:] = [batch["attention_mask"].bool()]
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for chunks in seen:
        x = torch.cat(chunks)
        if x.shape[0] > max_tokens:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_tokens]]
        out.append(x)
    return out


# ---- clustering -----------------------------------------------------------------------------------------


def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """sim (It, E) -> cluster id per neuron (It,), each cluster exactly `capacity` neurons, greedy by similarity."""
    n, e = sim.shape
    order = torch.argsort(sim.reshape(-1), descending=True).tolist()
    assign = [-1] * n
    room = [capacity] * e
    left = n
    for flat in order:
        i, c = divmod(flat, e)
        if assign[i] < 0 and room[c] > 0:
            assign[i] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assign)


def balanced_kmeans(features: torch.Tensor, clusters: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """features (It, D), rows unit-norm -> cluster ids (It,) of `clusters` equal-size groups (spherical k-means)."""
    n = features.shape[0]
    capacity = n // clusters
    gen = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=gen)[:clusters]].clone()
    assign = torch.full((n,), -1)
    for _ in range(iters):
        new = _balanced_assign(features @ centroids.T, capacity)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(clusters):
            centroids[c] = F.normalize(features[assign == c].mean(dim=0), dim=0)
    return assign


def neuron_features(a: torch.Tensor, w2: torch.Tensor):
    """Each neuron's contribution pattern over the tokens, centred and unit-norm: (It, N), from a (N, It).

    Contribution of neuron i to token t = (a_ti - mean_t a_ti) * ||W2[:, i]||: neurons that deviate from their
    mean on the same tokens are co-activated and belong in one expert.
    """
    a = (a - a.mean(dim=0)) * w2.norm(dim=0)
    return F.normalize(a.T, dim=1)


IMPORTANCE = ("std", "abs")


def neuron_importance(a: torch.Tensor, w2: torch.Tensor, kind: str = "std") -> torch.Tensor:
    """Importance of each neuron (It,) from its activations a (N, It) and the output weights w2 (H, It).

    "std": std_t(a_ti) * ||W2[:, i]||, the RMS error of replacing the neuron by its mean (what a dropped routed
    neuron costs); "abs": mean_t |a_ti| * ||W2[:, i]||, the RMS size of its contribution.
    """
    if kind not in IMPORTANCE:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {kind!r}")
    spread = a.std(dim=0) if kind == "std" else a.abs().mean(dim=0)
    return spread * w2.norm(dim=0)


# ---- one layer: split + router ----------------------------------------------------------------------------


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, gate_up_b: torch.Tensor, down: torch.Tensor, act: str):
    """x (N, H), gate_up (E, I, H), gate_up_b (E, I), down (E, H, I) -> every expert's output (N, E, H), no bias."""
    a = ref.plain_act(torch.einsum("nh,eih->nei", x, gate_up) + gate_up_b, act)
    return torch.einsum("nei,ehi->neh", a, down)


def routing_scores(y: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """y (N, E, H) expert outputs, comp (E, H) their stand-ins when dropped -> scores (N, E) = ||y - comp||."""
    return (y - comp).norm(dim=-1)


def compensation(y: torch.Tensor, top_k: int) -> torch.Tensor:
    """c_e (E, H): the mean output of expert e over the tokens whose oracle top-K (by ||y||) leaves e out."""
    n, e, _ = y.shape
    if top_k == e:
        return torch.zeros(e, y.shape[-1])
    comp = torch.zeros(e, y.shape[-1])
    for _ in range(2):  # the oracle choice depends on the compensation; two fixed-point rounds settle it
        chosen = torch.zeros(n, e, dtype=torch.bool)
        chosen.scatter_(1, routing_scores(y, comp).topk(top_k, dim=-1).indices, True)
        off = (~chosen).float().unsqueeze(-1)  # (N, E, 1)
        comp = (y * off).sum(dim=0) / off.sum(dim=0).clamp_min(1.0)
    return comp


def fit_router(x: torch.Tensor, scores: torch.Tensor, ridge: float = 1e-2):
    """Linear router (E, H) + bias (E,): ridge least squares from x (N, H) onto the per-token z-scored scores.

    Top-k on the raw logits needs only their order per token, so the logits regress onto the scores standardised
    per token. Closed form, ~0.2 s per layer; it routed as well as 300 Adam steps of a listwise soft-target
    cross entropy did (held-out routed error 0.268 vs 0.267 on MiniLM layer 1, 0.419 vs 0.419 on layer 3).
    """
    xb = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()  # (N, H+1): the last column fits the bias
    z = (scores - scores.mean(dim=-1, keepdim=True)) / scores.std(dim=-1, keepdim=True).clamp_min(1e-6)
    gram = xb.T @ xb
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xb.T @ z.double()).float()  # (H+1, E)
    return w[:-1].T.contiguous(), w[-1].contiguous()


def routed_rel_err(y: torch.Tensor, ids: torch.Tensor, comp: torch.Tensor, full: torch.Tensor | None = None) -> float:
    """||routed - dense|| / ||full - mean||: the routed output (chosen experts + comps of the rest) vs all
    experts, relative to the whole dense FFN's output `full` (N, H) (default: the experts' sum, no shared)."""
    n, e, _ = y.shape
    chosen = torch.zeros(n, e, dtype=torch.bool).scatter_(1, ids, True).unsqueeze(-1)
    routed = torch.where(chosen, y, comp).sum(dim=1)
    dense = y.sum(dim=1)
    full = dense if full is None else full
    return ((routed - dense).norm() / (full - full.mean(dim=0)).norm()).item()


@torch.no_grad()
def moefy_layer(
    layer: nn.Module, ffn: nn.Module, x: torch.Tensor, cfg: MoEConfig, seed: int = 0, importance: str = "std"
):
    """Fill ffn (a student MoEFFN) from one teacher BertLayer's FFN, given its calibration inputs x (N, H).

    With a shared expert (ffn.shared), it gets an exact copy of the `shared` most important neurons (b1 and b2
    included); the routed experts split the rest.
    """
    e, k, act = cfg.num_experts, cfg.top_k, cfg.activation
    w1, b1 = layer.intermediate.dense.weight.float(), layer.intermediate.dense.bias.float()  # (It, H), (It,)
    w2, b2 = layer.output.dense.weight.float(), layer.output.dense.bias.float()  # (H, It), (H,)
    a = ref.plain_act(F.linear(x, w1, b1), act)  # (N, It)
    rest = torch.arange(w1.shape[0])
    if ffn.shared is not None:
        order = torch.argsort(neuron_importance(a, w2, importance), descending=True)
        keep, rest = order[: ffn.shared.up.out_features], order[ffn.shared.up.out_features :].sort().values
        ffn.shared.up.weight.copy_(w1[keep])
        ffn.shared.up.bias.copy_(b1[keep])
        ffn.shared.down.weight.copy_(w2[:, keep])
        ffn.shared.down.bias.copy_(b2)
        b2 = torch.zeros_like(b2)
    # clustering sees at most 2048 tokens: more change the clusters little and cost linearly
    assign = balanced_kmeans(neuron_features(a[:2048, rest], w2[:, rest]), e, seed=seed)
    idx = rest[torch.stack([torch.nonzero(assign == c).squeeze(1) for c in range(e)])]  # (E, I) neuron ids
    gate_up, gate_up_b = w1[idx], b1[idx]  # (E, I, H), (E, I)
    down = w2[:, idx].permute(1, 0, 2).contiguous()  # (E, H, I)
    # fit on the first 3/4 of the (shuffled) tokens, report the routing error on the last 1/4
    n_fit = max(1, (3 * x.shape[0]) // 4)
    y = expert_outputs(x, gate_up, gate_up_b, down, act)  # (N, E, H)
    comp = compensation(y[:n_fit], k)
    scores = routing_scores(y, comp)
    rw, rb = fit_router(x[:n_fit], scores[:n_fit])
    moe = ffn.moe
    dt = moe.experts.gate_up_proj.dtype
    moe.experts.gate_up_proj.copy_(gate_up.to(dt))
    moe.experts.gate_up_bias.copy_(gate_up_b.to(dt))
    moe.experts.down_proj.copy_(down.to(dt))
    moe.experts.down_bias.copy_((b2 / k - comp + comp.sum(dim=0) / k).to(dt))
    moe.router.weight.copy_(rw.to(moe.router.weight.dtype))
    moe.router.bias.copy_(rb.to(moe.router.bias.dtype))
    ffn.LayerNorm.load_state_dict(layer.output.LayerNorm.state_dict())
    held = slice(n_fit, None) if n_fit < x.shape[0] else slice(None)
    held_x, held_y, full = x[held], y[held], a[held] @ w2.T
    oracle = routing_scores(held_y, comp).topk(k, dim=-1).indices
    routed = F.linear(held_x, rw, rb).topk(k, dim=-1).indices
    return {
        "oracle_rel_err": routed_rel_err(held_y, oracle, comp, full),
        "router_rel_err": routed_rel_err(held_y, routed, comp, full),
        "router_recall": (routed.unsqueeze(-1) == oracle.unsqueeze(-2)).any(-1).float().mean().item(),
    }


def moefy(
    teacher,
    experts: int,
    top_k: int,
    calib_texts: list[str],
    *,
    tokenizer=None,
    max_tokens: int = 8192,
    max_length: int | None = None,
    seed: int = 0,
    stats: list[dict] | None = None,
    shared: int = 0,
    importance: str = "std",
):
    """A MoEStudent made from teacher (a model, or the (model, tokenizer) pair of load_teacher).

    Every layer's FFN becomes an MoE of `experts` experts, `top_k` active per token, beside an always-on shared
    expert of the `shared` most important neurons (by neuron_importance `importance`) when shared > 0; the
    routed experts split the other I - shared neurons. `stats`, if given, receives per layer the held-out
    routing error of the oracle choice and of the fitted router, and the router's recall.
    """
    import copy

    from moetune.model.distill.student import MoEStudent, teacher_max_length, tokenize

    model, tok = teacher if isinstance(teacher, tuple) else (teacher, tokenizer)
    if tok is None:
        raise ValueError("moefy needs the teacher's tokenizer: pass (model, tokenizer) or tokenizer=")
    layers = bert_layers(model)
    hf = model.config
    check_split(hf.intermediate_size, experts, top_k, shared)
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if not calib_texts:
        raise ValueError("moefy needs calibration texts (got none)")
    max_length = max_length or teacher_max_length(model, tok)
    act = moe_activation(hf.hidden_act)
    cfg = student_config(hf.hidden_size, hf.intermediate_size - shared, experts, top_k, act)
    model.eval()
    by_len = sorted(calib_texts, key=len)  # batches of similar length: little padding
    batches = [tokenize(tok, by_len[i : i + 64], max_length) for i in range(0, len(by_len), 64)]
    xs = capture_ffn_inputs(model, batches, max_tokens, seed=seed)
    bert = copy.deepcopy(model).float().eval()
    bert.pooler = None  # sentence embeddings pool the last hidden state; the [CLS] pooler is dead weight
    student = MoEStudent(bert, tok, dict.fromkeys(range(len(layers)), cfg), max_length, shared)
    for n, layer in enumerate(layers):
        layer_stats = moefy_layer(layer, student.moe_ffn(n), xs[n], cfg, seed + n, importance)
        if stats is not None:
            stats.append({"layer": n, **layer_stats})
    return student
