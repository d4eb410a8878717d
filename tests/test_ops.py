"""Every lowered op (route, align, gemm1, gemm2) on every backend (torch, tvm) against kernels/reference.py.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K routed rows, BM rows per block,
NB blocks.

Shapes are small (H, I <= 64, E <= 16, T <= 64) and each names the edge it covers; odd H / I (37, 29) and prime
E (7, 13) keep every size off the tile multiples. Each test builds its op's problem directly (align, gemm) or
through ir.lower (route) and runs the backend's default config. The GEMM tests feed the reference's
`align` output to every backend, so a GEMM failure never hides behind an align failure.

Tolerances: fp32 rel_err <= 1e-5, norm-wise and max-wise (measured: <= 1e-6). bf16: the kernel's norm-wise
error against an fp32 reference (computed from the same bf16 inputs, upcast) may be at most 2x torch-bf16's
own error on the same inputs (`_torch_bf16_gemm1` / `_torch_bf16_gemm2`: the same math with every torch op
in bf16), with a floor of half a bf16 ulp; see `_assert_bf16_ok` (measured: at most 1.45x).

Poison: launchers allocate outputs with torch.empty, so `poison` makes torch.empty return NaN (float) or a
sentinel (int) while a kernel runs, and turns off the reuse of launcher scratch (kernels/scratch.py) so that it
is fresh and poisoned too; an element a kernel never writes then fails the finiteness check or the exact
comparison instead of passing on zero-filled fresh memory.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from moetune.ir.program import Problem, lower
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels import scratch
from moetune.kernels.packed import pack_panels
from moetune.kernels.registry import backend_info, default_config, get_impl
from moetune.model import MoE, MoEConfig, TunedMoE
from moetune.schedules import tvm_cpu

BACKENDS = ("torch", "tvm")
DTYPES = ("float32", "bfloat16")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
NON_GATED_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
ALIGNED_FIELDS = ("sorted_token", "sorted_weight", "sorted_slot", "block_expert", "inverse", "counts", "offsets")
FP32_TOL = 1e-5
# bf16 floor: storing the exact result in bf16 alone costs up to half an ulp, 2^-9 relative, per element (so
# also norm-wise and relative to the max). A kernel error below 2x that is as good as bf16 output can be, even
# if torch-bf16's own error happened to be smaller.
BF16_FLOOR = 2.0**-9
INT_POISON = -12345


@pytest.fixture(scope="module", autouse=True)
def _tvm_cache(tmp_path_factory):
    """Compiled TVM modules go to a fresh dir (tvm_build reads $MOETUNE_CACHE_DIR at build time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("moetune-cache")))
        yield


@pytest.fixture(scope="module")
def target():
    return resolve_target("cpu")


@pytest.fixture
def poison(monkeypatch):
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(scratch, "MAX_BYTES", -1)  # launcher scratch (kernels/scratch.py) fresh, poisoned, too


def _launch(op: str, backend: str, problem: Problem, target, *args):
    """Run the backend's launcher of `op` with its default config."""
    impl = get_impl(op, backend)
    assert target.kind in impl.targets
    return impl.fn(problem, default_config(problem, backend, target), target, *args)


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(norm-wise, max-wise) relative error: rel_err, and max|got - want| / max|want|."""
    diff = (got.double() - want.double()).abs().max()
    return rel_err(got, want), (diff / want.double().abs().max().clamp_min(1e-30)).item()


def _assert_fp32_ok(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all(), "non-finite output (an unwritten element?)"
    fro, mx = _errors(got, want)
    assert fro <= FP32_TOL and mx <= FP32_TOL, f"rel err {fro:.2e} (norm), {mx:.2e} (max)"


def _assert_bf16_ok(got: torch.Tensor, want32: torch.Tensor, torch_bf16: torch.Tensor) -> None:
    """got: the kernel's bf16 output; want32: the fp32 reference; torch_bf16: the same op computed in bf16.

    Norm-wise the kernel may err 2x torch-bf16. The max-wise check is there to catch one wrong element (off by
    about max|want|, far above either bound); a max over ~100 elements is a noisy statistic (the torch backend's
    max error reaches 2.0x torch-bf16's on T=1 while its norm-wise error stays at 1.5x), so it gets 4x.
    """
    assert got.shape == want32.shape and got.dtype == torch.bfloat16
    assert torch.isfinite(got.float()).all(), "non-finite output (an unwritten element?)"
    errors = zip(_errors(got, want32), _errors(torch_bf16, want32), (2, 4), ("norm", "max"), strict=True)
    for kernel_err, torch_err, factor, kind in errors:
        bound = factor * max(torch_err, BF16_FLOOR)
        assert kernel_err <= bound, f"{kind}-wise rel err {kernel_err:.2e} > {bound:.2e} (torch bf16: {torch_err:.2e})"


def _ids(t: int, k: int, e: int, pool: tuple[int, ...] | None = None) -> torch.Tensor:
    """(T, K) int32 ids with K distinct experts per row (like a top-k), drawn from `pool` (default: all E)."""
    experts = torch.tensor(pool if pool is not None else range(e))
    return experts[torch.rand(t, len(experts)).argsort(-1)[:, :k]].to(torch.int32)


def _routing_weights(t: int, k: int) -> torch.Tensor:
    return torch.randn(t, k).softmax(-1)  # (T, K) fp32, positive like a router's


# ---- route ------------------------------------------------------------------------------------------------
# (id, MoEConfig overrides, T, boosted expert, also in bf16). The boost is added to router.bias (router_bias) or
# to the correction bias so that this expert wins for every token: every token lands on one expert. bf16 only
# changes what the logits GEMM loads (selection reads fp32 logits), so it runs on the cases that load every
# kind of bf16 input (x, weight, router bias) and on T=1; each (case, dtype) is one TVM compile.
_ROUTE = [
    ("softmax-norm-T=1", {"num_experts": 7, "top_k": 2}, 1, None, True),
    (
        "softmax-no-norm-scaled-top_k=E",
        {"num_experts": 5, "top_k": 5, "norm_topk_prob": False, "routed_scaling_factor": 2.5},
        13,
        None,
        False,
    ),
    (
        "sigmoid-cbias-group-top2_sum",
        {
            "num_experts": 12,
            "top_k": 3,
            "router": "sigmoid",
            "score_correction_bias": True,
            "n_group": 4,
            "topk_group": 2,
            "group_score": "top2_sum",
            "routed_scaling_factor": 2.5,
        },
        33,
        None,
        True,
    ),
    (
        "softmax-group-max",
        {"num_experts": 8, "top_k": 2, "n_group": 4, "topk_group": 2, "group_score": "max", "norm_topk_prob": False},
        17,
        None,
        False,
    ),
    (
        "topk_softmax-router_bias-prime-E",
        {"num_experts": 13, "top_k": 4, "router": "topk_softmax", "router_bias": True, "norm_topk_prob": False},
        64,
        None,
        True,
    ),
    (
        "topk_sigmoid-top_k=1",
        {"num_experts": 7, "top_k": 1, "router": "topk_sigmoid", "norm_topk_prob": False},
        29,
        None,
        False,
    ),
    (  # the shared expert's sigmoid gate is this route (ir.lower: shared.route)
        "E=1-shared-gate",
        {"num_experts": 1, "top_k": 1, "router": "topk_sigmoid", "norm_topk_prob": False},
        21,
        None,
        True,
    ),
    (
        "one-expert-wins-router_bias",
        {"num_experts": 13, "top_k": 1, "router": "topk_softmax", "router_bias": True, "norm_topk_prob": False},
        40,
        5,
        False,
    ),
    (
        "one-expert-wins-cbias",
        {"num_experts": 7, "top_k": 2, "router": "sigmoid", "score_correction_bias": True},
        40,
        2,
        True,
    ),
    (  # unweighted selection (a distilled dense FFN): every chosen expert weighs 1.0; router bias in the choice
        "topk_hard-router_bias-T=1",
        {"num_experts": 8, "top_k": 2, "router": "topk_hard", "router_bias": True, "norm_topk_prob": False},
        1,
        None,
        True,
    ),
    (  # norm makes every weight 1/K, then scaled; group-limited choice on the raw logits
        "topk_hard-norm-scaled-group",
        {
            "num_experts": 12,
            "top_k": 3,
            "router": "topk_hard",
            "routed_scaling_factor": 2.5,
            "n_group": 4,
            "topk_group": 2,
        },
        33,
        None,
        False,
    ),
    (
        "topk_hard-top_k=E",
        {"num_experts": 5, "top_k": 5, "router": "topk_hard", "norm_topk_prob": False},
        13,
        None,
        False,
    ),
    (
        "topk_hard-one-expert-wins-router_bias",
        {"num_experts": 13, "top_k": 2, "router": "topk_hard", "router_bias": True, "norm_topk_prob": False},
        40,
        11,
        False,
    ),
]
ROUTE_CASES = [
    pytest.param(overrides, t, boost, dtype, id=f"{name}-{dtype}")
    for name, overrides, t, boost, bf16 in _ROUTE
    for dtype in (DTYPES if bf16 else ("float32",))
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("overrides", "t", "boost", "dtype"), ROUTE_CASES)
def test_route_matches_reference(overrides, t, boost, dtype, backend, target, poison):
    cfg = MoEConfig(hidden_size=37, intermediate_size=8, **overrides, dtype=dtype)
    router = MoE(cfg).router
    cbias = router.e_score_correction_bias
    if cbias is not None:
        cbias.copy_(0.1 * torch.randn(cfg.num_experts))  # the module initialises it to zeros
    if boost is not None:
        with torch.no_grad():
            (router.bias if router.bias is not None else cbias)[boost] += 50.0
    x = torch.randn(t, cfg.hidden_size, dtype=cfg.torch_dtype)

    weights, ids = _launch("route", backend, lower(cfg, t).op("route"), target, x, router.weight, router.bias, cbias)
    want_w, want_ids = ref.select_experts(ref.router_logits(x, router.weight, router.bias), cfg, cbias)

    if boost is not None:
        assert (want_ids[:, 0] == boost).all()  # the edge really is exercised
    assert ids.dtype == torch.int32 and ids.shape == (t, cfg.top_k)
    assert torch.equal(ids.long(), want_ids)  # same experts in the reference's (descending) order
    # Routing is fp32 whatever the activations' dtype, and bf16 x bf16 products are exact in fp32: only the
    # summation order differs, so bf16 inputs get the fp32 tolerance too.
    _assert_fp32_ok(weights, want_w)


def test_tvm_route_keeps_expert_ids_in_range_on_nan_logits(target):
    """A NaN token (a diverged model) still gets expert ids in [0, E) from the tvm top-k (an id >= E would index
    past the expert weights); the other tokens route exactly as the reference."""
    cfg = MoEConfig(hidden_size=37, intermediate_size=8, num_experts=13, top_k=3)
    router = MoE(cfg).router
    x = torch.randn(6, cfg.hidden_size)
    x[2] = float("nan")
    _, ids = _launch("route", "tvm", lower(cfg, 6).op("route"), target, x, router.weight, None, None)
    assert ((ids >= 0) & (ids < cfg.num_experts)).all()
    keep = [0, 1, 3, 4, 5]
    _, want_ids = ref.select_experts(ref.router_logits(x[keep], router.weight, router.bias), cfg, None)
    assert torch.equal(ids[keep].long(), want_ids)


# ---- align ------------------------------------------------------------------------------------------------
# (T, K, E, BM, ids): ids as (T, K) int32, built from a fresh random draw inside the test.
ALIGN_CASES = [
    pytest.param(1, 2, 7, 8, None, id="T=1-TK<BM"),
    pytest.param(5, 2, 13, 4, (0, 4, 12), id="zero-token-experts"),
    pytest.param(37, 1, 7, 4, (3,), id="one-expert-all-tokens"),
    pytest.param(11, 5, 5, 2, None, id="top_k=E"),
    pytest.param(9, 3, 13, 1, None, id="BM=1"),
    pytest.param(16, 2, 4, 8, "cyclic", id="counts-multiple-of-BM-no-pads"),
    pytest.param(64, 4, 16, 16, None, id="T=64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("t", "k", "e", "bm", "pool"), ALIGN_CASES)
def test_align_matches_reference(t, k, e, bm, pool, backend, target, poison):
    # align has no dtype axis: it reads route's output, fp32 weights and int32 ids, whatever the model dtype.
    if pool == "cyclic":  # row t holds experts t, t+1 (mod E): every expert gets exactly T*K/E = 8 = BM rows
        ids = (torch.arange(t).unsqueeze(1) + torch.arange(k)).remainder(e).to(torch.int32)
    else:
        ids = _ids(t, k, e, pool)
    weights = torch.randn(t, k)
    want = ref.align(weights, ids, e, bm)

    got = _launch("align", backend, Problem.make("align", "int32", E=e, K=k, BM=bm), target, weights, ids)

    for name in ALIGNED_FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and torch.equal(g, w), f"{name}: {g} != {w}"


# ---- gemm1 / gemm2 ----------------------------------------------------------------------------------------
# (T, K, E, H, I, BM, expert pool of the ids)
GEMM_SHAPES = [
    pytest.param((1, 2, 13, 37, 29, 2, None), id="T=1"),
    pytest.param((3, 2, 7, 32, 16, 8, None), id="TK<BM-blocks-mostly-padding"),
    pytest.param((12, 2, 13, 40, 24, 4, (0, 5, 12)), id="zero-token-experts"),
    pytest.param((40, 1, 7, 37, 29, 8, (3,)), id="one-expert-all-tokens"),
    pytest.param((9, 5, 5, 24, 40, 4, None), id="top_k=E"),
    pytest.param((64, 4, 16, 64, 64, 16, None), id="T=64-full-tiles"),
]
VARIANT_SHAPE = (13, 3, 7, 37, 29, 4, None)  # odd H, I and a prime E: no size is a tile multiple


def _gemm1_problem(dtype, h, i, e, bm, act, bias, w_in, gated=True):
    alpha, limit = (1.702, 7.0) if act == "swiglu_oai" else (0.0, 0.0)  # as ir.lower sets them
    dims = {"H": h, "I": i, "E": e, "BM": bm, "gated": gated, "act": act, "alpha": alpha, "limit": limit}
    return Problem.make("gemm1", dtype, **dims, bias=bias, w_in=w_in)


def _torch_bf16_gemm1(problem, x, al, gate_up_proj, gate_up_bias):
    """torch-bf16's own gemm1: reference.gemm1's math with every op in bf16 (the error yardstick, no reference)."""
    rows = x[al.sorted_token.long()]  # (NB, BM, H) bf16
    pre = torch.stack([F.linear(rows[b], gate_up_proj[e]) for b, e in enumerate(al.block_expert.tolist())])
    if problem["w_in"]:
        pre = pre * al.sorted_weight.unsqueeze(-1).to(pre.dtype)
    if gate_up_bias is not None:
        pre = pre + gate_up_bias[al.block_expert.long()].unsqueeze(1)
    return ref.gemm1_act(pre, problem)


def _check_gemm1(backend, dtype, shape, act, bias, w_in, target, gated=True):
    t, k, e, h, i, bm, pool = shape
    problem = _gemm1_problem(dtype, h, i, e, bm, act, bias, w_in, gated)
    dt = getattr(torch, dtype)
    al = ref.align(_routing_weights(t, k), _ids(t, k, e, pool), e, bm)
    # Scale 3: pre-activations ~ N(0, 9), so swiglu_oai's clamp at 7 is hit (and relu's kink is crossed).
    # gate_up rows: [gate | up] (2I) when gated, the up projection alone (I) when not.
    x = torch.randn(t, h).to(dt)
    u = 2 if gated else 1
    w = (3 * torch.randn(e, u * i, h) / h**0.5).to(dt)
    b = torch.randn(e, u * i).to(dt) if bias else None

    got = _launch("gemm1", backend, problem, target, x, al, w, b)

    assert got.shape == (al.num_blocks, bm, i)
    up = None if b is None else b.float()
    want32 = ref.gemm1(problem, x.float(), al, w.float(), up)  # every element, pad rows included
    if dtype == "float32":
        _assert_fp32_ok(got, want32)
    else:
        _assert_bf16_ok(got, want32, _torch_bf16_gemm1(problem, x, al, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "non-gated"])
def test_gemm1_shapes(gated, shape, backend, dtype, target, poison):
    # non-gated experts (plain P-wide panels, one accumulator) run a BERT FFN's gelu; gated ones silu
    _check_gemm1(backend, dtype, shape, "silu" if gated else "gelu", False, False, target, gated)


# (act, bias, w_in, dtype, gated), pairwise covering: gated, in fp32 every activation runs with bias and w_in
# both off and both on, and silu also with each alone; in bf16 every activation with both on (both off in bf16
# is test_gemm1_shapes). Non-gated (a distilled BERT FFN: gelu, with its b1 as bias): gelu with and without
# bias in both dtypes, with w_in once, and every other non-gated activation with bias. Activation and bias /
# w_in are independent stages of the kernel; each case is a compile.
GEMM1_VARIANTS = [
    *((act, on, on, "float32", True) for act in ACTIVATIONS for on in (False, True)),
    ("silu", True, False, "float32", True),
    ("silu", False, True, "float32", True),
    *((act, True, True, "bfloat16", True) for act in ACTIVATIONS),
    *(("gelu", bias, False, dtype, False) for dtype in DTYPES for bias in (False, True)),
    ("gelu", True, True, "float32", False),
    *((act, True, False, "float32", False) for act in NON_GATED_ACTIVATIONS if act != "gelu"),
]


def _variant_id(act, bias, w_in, dtype, gated):
    return "-".join(
        (act, "bias" if bias else "no-bias", "w_in" if w_in else "w_out", dtype, "gated" if gated else "non-gated")
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("act", "bias", "w_in", "dtype", "gated"), [pytest.param(*v, id=_variant_id(*v)) for v in GEMM1_VARIANTS]
)
def test_gemm1_variants(act, bias, w_in, dtype, gated, backend, target, poison):
    _check_gemm1(backend, dtype, VARIANT_SHAPE, act, bias, w_in, target, gated)


def _torch_bf16_gemm2(problem, act, al, down_proj, down_bias):
    """torch-bf16's own gemm2: reference.gemm2's math with every op in bf16 (the error yardstick, no reference)."""
    z = torch.stack(
        [
            F.linear(act[b], down_proj[e], None if down_bias is None else down_bias[e])
            for b, e in enumerate(al.block_expert.tolist())
        ]
    )  # (NB, BM, H) bf16
    if problem["w_out"]:
        z = z * al.sorted_weight.unsqueeze(-1).to(z.dtype)
    t, k = al.inverse.shape
    return z.reshape(-1, problem["H"])[al.inverse.reshape(-1).long()].view(t, k, -1).sum(1)


def _check_gemm2(backend, dtype, shape, bias, w_out, target):
    t, k, e, h, i, bm, pool = shape
    problem = Problem.make("gemm2", dtype, H=h, I=i, E=e, K=k, BM=bm, bias=bias, w_out=w_out)
    dt = getattr(torch, dtype)
    al = ref.align(_routing_weights(t, k), _ids(t, k, e, pool), e, bm)
    act = torch.randn(al.num_blocks, bm, i).to(dt)  # pad rows too: the kernel must not combine them
    w = (torch.randn(e, h, i) / i**0.5).to(dt)
    b = torch.randn(e, h).to(dt) if bias else None

    got = _launch("gemm2", backend, problem, target, act, al, w, b)

    want32 = ref.gemm2(problem, act.float(), al, w.float(), None if b is None else b.float(), t)
    if dtype == "float32":
        _assert_fp32_ok(got, want32)
    else:
        _assert_bf16_ok(got, want32, _torch_bf16_gemm2(problem, act, al, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_gemm2_shapes(shape, backend, dtype, target, poison):
    _check_gemm2(backend, dtype, shape, False, True, target)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_out", [True, False], ids=["w_out", "w_in"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_gemm2_variants(bias, w_out, backend, dtype, target, poison):
    _check_gemm2(backend, dtype, VARIANT_SHAPE, bias, w_out, target)


# ---- schedule spaces --------------------------------------------------------------------------------------
GEMM1 = {"H": 37, "I": 29, "E": 7, "BM": 4}


@pytest.mark.parametrize(
    ("change", "constraint"),
    [
        ({"mt": 3}, "mt_divides_bm"),  # 3 does not divide BM=4
        ({"kt": 2}, "kt_divides_k"),  # 2 does not divide H=37
        ({"mt": 4, "nt": 64}, "registers"),  # 2 tiles x 4 rows x 64 columns: far more than the register file
        ({"bogus": 1}, "unknown parameter"),
    ],
)
def test_infeasible_tvm_point_names_the_constraint(change, constraint, target):
    problem = _gemm1_problem("float32", *GEMM1.values(), "silu", False, False)
    point = {**tvm_cpu.default_point(problem, target), **change}
    with pytest.raises(ValueError, match=constraint):
        tvm_cpu.scheduled_module(problem, point, target)


def test_infeasible_config_is_refused_by_tuned_moe(target):
    cfg = MoEConfig(hidden_size=37, intermediate_size=29, num_experts=7, top_k=2)
    problem = lower(cfg, 13).op("experts.gemm1")
    point = {**tvm_cpu.default_point(problem, target), "mt": 3}  # BM is a power of two: 3 never divides it
    moe = TunedMoE(cfg, configs={"experts.gemm1": {"backend": "tvm", "params": point}})
    with pytest.raises(ValueError, match="mt_divides_bm"):
        moe(torch.randn(13, 37))


DEFAULT_POINT_CONFIGS = [
    *(MoEConfig.preset(name) for name in MoEConfig.presets()),
    MoEConfig(hidden_size=37, intermediate_size=29, num_experts=13, top_k=13, activation="swiglu_oai"),
    MoEConfig(hidden_size=5, intermediate_size=3, num_experts=1, top_k=1, expert_bias=True),
    MoEConfig(  # BERT-base FFN (3072 neurons) distilled into 8 non-gated experts, plus a non-gated shared one
        hidden_size=768,
        intermediate_size=384,
        num_experts=8,
        top_k=2,
        router="topk_hard",
        gated=False,
        activation="gelu",
        expert_bias=True,
        num_shared_experts=1,
        shared_intermediate_size=384,
    ),
    MoEConfig(
        hidden_size=24,
        intermediate_size=8,
        num_experts=12,
        top_k=3,
        router="sigmoid",
        n_group=4,
        topk_group=2,
        group_score="top2_sum",
        num_shared_experts=2,
        shared_intermediate_size=7,
        shared_expert_gate=True,
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_point_of_every_op_is_feasible(backend, target):
    info = backend_info(backend)
    for cfg in DEFAULT_POINT_CONFIGS:
        for t in (1, 7, 64, 4096):
            for op in lower(cfg, t):
                point = info.default(op.problem, target)
                assert info.space(op.problem, target).is_feasible(point), (cfg.name, t, op.name, point)


def test_packed_weights_are_memoised_with_at_most_max_layouts_per_weight():
    """A packed copy is reused while its weight is unchanged; an in-place update repacks; at most MAX_LAYOUTS
    panel widths are kept per weight (least recently used dropped), so trying every width cannot pile up copies."""
    from moetune.kernels.tvm_cpu import launchers as tvm_cpu_launchers

    w = torch.randn(2, 16, 8)
    full = slice(None)

    def mine() -> list:
        return [key for key, (owner, _) in tvm_cpu_launchers._PACKED.entries.items() if owner() is w]

    p8 = tvm_cpu_launchers._packed(w, full, 8)
    assert tvm_cpu_launchers._packed(w, full, 8) is p8  # memoised
    assert torch.equal(p8, pack_panels(w, 8))
    p16 = tvm_cpu_launchers._packed(w, full, 16)
    assert tvm_cpu_launchers._packed(w, full, 8) is p8 and len(mine()) == 2  # 8 is now the most recent
    tvm_cpu_launchers._packed(w, full, 4)  # a third width drops the least recently used one (16)
    assert len(mine()) == tvm_cpu_launchers.MAX_LAYOUTS == 2
    assert tvm_cpu_launchers._packed(w, full, 8) is p8 and tvm_cpu_launchers._packed(w, full, 16) is not p16
    with torch.no_grad():
        w.mul_(2)  # in-place update: the version changes, the layout is packed again from the new values
    assert torch.equal(tvm_cpu_launchers._packed(w, full, 8), pack_panels(w, 8))
    assert len(mine()) <= 2
