"""The reference MoE module: shapes, dtypes, parameter names, and the routing semantics it promises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from moetune.kernels import reference as ref
from moetune.model import MoE, MoEConfig

SMALL = {"hidden_size": 32, "intermediate_size": 24, "num_experts": 6, "top_k": 2}


def test_forward_keeps_leading_dims_and_dtype():
    for dtype in ("float32", "bfloat16"):
        moe = MoE(MoEConfig(**SMALL, dtype=dtype))
        x = torch.randn(2, 3, 32, dtype=moe.cfg.torch_dtype)
        y = moe(x)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y.float()).all()


def test_wrong_hidden_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"MoE expects x\[\.\.\., 32\]"):
        MoE(MoEConfig(**SMALL))(torch.randn(4, 31))


def test_state_dict_keys_and_shapes():
    cfg = MoEConfig(
        **SMALL,
        router_bias=True,
        expert_bias=True,
        score_correction_bias=True,
        num_shared_experts=2,
        shared_intermediate_size=8,
        shared_expert_gate=True,
    )
    shapes = {k: tuple(v.shape) for k, v in MoE(cfg).state_dict().items()}
    assert shapes == {
        "router.weight": (6, 32),
        "router.bias": (6,),
        "router.e_score_correction_bias": (6,),
        "experts.gate_up_proj": (6, 48, 32),
        "experts.down_proj": (6, 32, 24),
        "experts.gate_up_bias": (6, 48),
        "experts.down_bias": (6, 32),
        "shared_expert.gate_up_proj": (32, 32),
        "shared_expert.down_proj": (32, 16),
        "shared_expert.gate_weight": (1, 32),
    }

    plain = {k: tuple(v.shape) for k, v in MoE(cfg.replace(gated=False, activation="gelu")).state_dict().items()}
    assert plain == {  # non-gated: the same keys, gate_up_* hold the up projection alone (I rows, not 2I)
        **shapes,
        "experts.gate_up_proj": (6, 24, 32),
        "experts.gate_up_bias": (6, 24),
        "shared_expert.gate_up_proj": (16, 32),
    }


def _dense_mixture(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a dense (T, E) weight matrix: an independent formulation."""
    w, ids = moe.route(x)
    dense = torch.zeros(x.shape[0], moe.cfg.num_experts).scatter_add_(1, ids, w)
    ex = moe.experts
    per_expert = torch.stack(
        [
            ref.expert_mlp(x, ex.gate_up_proj[e], ex.down_proj[e], None, None, moe.cfg)
            for e in range(moe.cfg.num_experts)
        ],
        dim=1,
    )  # (T, E, H)
    return (dense.unsqueeze(-1) * per_expert).sum(1)


def test_sparse_loop_equals_dense_mixture():
    moe = MoE(MoEConfig(**SMALL))
    x = torch.randn(9, 32)
    with torch.no_grad():
        assert rel_err(moe(x), _dense_mixture(moe, x)) < 1e-5


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "topk_softmax", "topk_sigmoid", "topk_hard"])
def test_router_weights(router):
    cfg = MoEConfig(
        **{**SMALL, "top_k": 3}, router=router, norm_topk_prob=router == "softmax", routed_scaling_factor=2.0
    )
    logits = torch.randn(5, 6)
    w, ids = ref.select_experts(logits, cfg)
    assert ids.shape == (5, 3) and (ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts
    if router == "softmax":  # renormalised then scaled
        torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.0))
    if router == "topk_softmax":
        torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.0))
    if router == "topk_hard":  # unweighted selection: every chosen expert weighs 1, then scaled
        torch.testing.assert_close(w, torch.full((5, 3), 2.0))
        normed, _ = ref.select_experts(logits, cfg.replace(norm_topk_prob=True))
        torch.testing.assert_close(normed, torch.full((5, 3), 2.0 / 3))  # norm_topk_prob: 1/K each
    if router in ("topk_softmax", "topk_sigmoid", "topk_hard"):  # chosen on logits: the k largest logits
        torch.testing.assert_close(logits.gather(1, ids).sort(-1).values, logits.topk(3).values.sort(-1).values)


def test_group_limited_choice_stays_in_the_best_groups():
    cfg = MoEConfig(hidden_size=8, intermediate_size=8, num_experts=8, top_k=2, n_group=4, topk_group=1)
    logits = torch.tensor([[0.0, 5.0, 4.9, 4.8, 0.0, 0.0, 0.0, 0.0]])
    # softmax scores per group (max): g0=e1 wins; e2 (group 1) is excluded although it is second best
    _, ids = ref.select_experts(logits, cfg)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_correction_bias_changes_the_choice_not_the_weight():
    cfg = MoEConfig(
        hidden_size=8,
        intermediate_size=8,
        num_experts=4,
        top_k=1,
        router="sigmoid",
        norm_topk_prob=False,
        score_correction_bias=True,
    )
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, ids = ref.select_experts(logits, cfg, torch.tensor([0.0, 0.0, 0.0, 5.0]))
    assert ids.item() == 3
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-1.0]])))


def test_non_gated_topk_hard_with_every_expert_is_the_dense_ffn():
    """What distilling a BERT FFN into experts relies on: split its I*E neurons into E experts of I, route
    every token to all of them with weight 1 (topk_hard, K = E, no renormalisation), give each expert its
    slice of b1 and b2 / E, and the MoE is the dense gelu(x W1^T + b1) W2^T + b2."""
    h, i, e = 48, 16, 6
    cfg = MoEConfig(
        hidden_size=h,
        intermediate_size=i,
        num_experts=e,
        top_k=e,
        router="topk_hard",
        norm_topk_prob=False,
        gated=False,
        activation="gelu",
        expert_bias=True,
    )
    w1, b1 = torch.randn(e * i, h) / h**0.5, torch.randn(e * i)  # (EI, H), (EI,)
    w2, b2 = torch.randn(h, e * i) / (e * i) ** 0.5, torch.randn(h)  # (H, EI), (H,)
    moe = MoE(cfg)
    moe.load_state_dict(
        {
            **moe.state_dict(),
            "experts.gate_up_proj": w1.view(e, i, h),  # expert e owns neurons e*I .. (e+1)*I - 1
            "experts.gate_up_bias": b1.view(e, i),
            "experts.down_proj": w2.view(h, e, i).transpose(0, 1),  # (E, H, I): the matching columns of W2
            "experts.down_bias": (b2 / e).expand(e, h),
        }
    )
    x = torch.randn(2, 7, h)
    dense = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    with torch.no_grad():
        assert rel_err(moe(x), dense) <= 1e-5
