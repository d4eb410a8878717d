"""Every Triton kernel (route, align, gemm1, gemm2) under Triton's interpreter against kernels/reference.py.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K routed rows, BM rows per block, NB blocks.

Why a worker process. Triton reads TRITON_INTERPRET=1 when `@triton.jit` decorates, its own library functions
included, so the flag must be set before triton is first imported, and a process with it set cannot compile
ahead of time (tests/test_prepare.py). So the interpreter checks run in one worker process per module, started
with the flag: this file is also the worker (`python tests/test_triton.py` serves check requests on stdin).
Each test sends one case (plain JSON data) and gets ok / the worker's traceback back. The checks themselves are
the `check_*` functions below and compare against kernels/reference.py, the one reference.

Inputs are fresh random draws (never zeros), launch outputs are poisoned (torch.empty returns NaN or a
sentinel while a launcher runs, so an element a kernel never writes fails). Shapes are small (the interpreter
runs every program instance in numpy) and each names the edge it covers. Tolerances: fp32 1e-5 norm-wise and
max-wise (route ids exactly); fp16 outputs 2 * 2^-11 norm-wise against the fp32 reference on the same fp16
inputs: the kernels accumulate in fp32 and round once, which alone costs up to half an fp16 ulp (2^-11
relative). bf16 has no tl.dot in the interpreter; tests/test_gpu.py checks it on a GPU.

In this process (no interpreter): the empty-block contract of kernels/ops.py for the reference, torch and tvm
GEMMs (an align output with empty trailing blocks, as the Triton align makes, gives the same results).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest
import torch

MARK = "@@moetune-check "
INT_POISON = -12345
FP16_TOL = 2 * 2.0**-11
FP32_TOL = 1e-5
WORKER_TIMEOUT = 300  # seconds for one check (the slowest here takes a few)


# ---- cases (plain data: they travel to the worker as JSON) ------------------------------------------------
# (id, MoEConfig overrides, T, boosted expert or None, dtypes)
ROUTE = [
    ("softmax-norm-T=1", {"num_experts": 7, "top_k": 2}, 1, None, ("float32", "float16")),
    (
        "softmax-no-norm-scaled-top_k=E",
        {"num_experts": 5, "top_k": 5, "norm_topk_prob": False, "routed_scaling_factor": 2.5},
        13,
        None,
        ("float32",),
    ),
    (
        "sigmoid-cbias-group-top2_sum-T>BLOCK_T",
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
        ("float32", "float16"),
    ),
    (
        "softmax-group-max",
        {"num_experts": 8, "top_k": 2, "n_group": 4, "topk_group": 2, "norm_topk_prob": False},
        17,
        None,
        ("float32",),
    ),
    (
        "topk_softmax-router_bias-prime-E",
        {"num_experts": 13, "top_k": 4, "router": "topk_softmax", "router_bias": True, "norm_topk_prob": False},
        40,
        None,
        ("float32", "float16"),
    ),
    (
        "topk_sigmoid-top_k=1",
        {"num_experts": 7, "top_k": 1, "router": "topk_sigmoid", "norm_topk_prob": False},
        29,
        None,
        ("float32",),
    ),
    (
        "E=1-shared-gate",
        {"num_experts": 1, "top_k": 1, "router": "topk_sigmoid", "norm_topk_prob": False},
        21,
        None,
        ("float32",),
    ),
    (
        "one-expert-wins-router_bias",
        {"num_experts": 13, "top_k": 1, "router": "topk_softmax", "router_bias": True, "norm_topk_prob": False},
        20,
        5,
        ("float32",),
    ),
    (
        "one-expert-wins-cbias",
        {"num_experts": 7, "top_k": 2, "router": "sigmoid", "score_correction_bias": True},
        20,
        2,
        ("float32",),
    ),
    (
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
        ("float32",),
    ),
    (
        "topk_hard-router_bias-T=1",
        {"num_experts": 8, "top_k": 2, "router": "topk_hard", "router_bias": True, "norm_topk_prob": False},
        1,
        None,
        ("float32",),
    ),
]
ROUTE_CASES = [
    pytest.param(overrides, t, boost, dtype, logits, id=f"{name}-{dtype}-{logits}")
    for name, overrides, t, boost, dtypes in ROUTE
    for dtype in dtypes
    for logits in ("fused", "torch")
]

# (T, K, E, BM, expert pool or "cyclic", BLOCK_S)
ALIGN_CASES = [
    pytest.param(1, 2, 7, 8, None, 64, id="T=1-TK<BM"),
    pytest.param(5, 2, 13, 4, (0, 4, 12), 16, id="zero-token-experts"),
    pytest.param(37, 1, 7, 4, (3,), 16, id="one-expert-all-tokens-many-chunks"),
    pytest.param(11, 5, 5, 2, None, 32, id="top_k=E"),
    pytest.param(9, 3, 13, 1, None, 16, id="BM=1-no-empty-blocks"),
    pytest.param(16, 2, 4, 8, "cyclic", 16, id="counts-multiple-of-BM"),
    pytest.param(64, 4, 16, 16, None, 64, id="T=64-BM=16"),
    pytest.param(3, 1, 1, 32, None, 16, id="E=1-shared-expert"),
]

# (T, K, E, H, I, BM, expert pool): odd H / I and prime E keep sizes off the tile multiples
GEMM_SHAPES = {
    "T=1": (1, 2, 13, 37, 29, 2, None),
    "TK<BM-mostly-padding": (3, 2, 7, 32, 16, 8, None),
    "zero-token-experts": (12, 2, 13, 40, 24, 4, (0, 5, 12)),
    "one-expert-all-tokens": (40, 1, 7, 37, 29, 8, (3,)),
    "top_k=E": (9, 5, 5, 24, 40, 4, None),
    "BM=32-two-row-tiles": (48, 2, 3, 37, 70, 32, None),
}
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}


# ---- checks (run in the worker, with TRITON_INTERPRET=1) ---------------------------------------------------
def _poisoned(fn, *args):
    """fn(*args) with torch.empty returning NaN / INT_POISON-filled memory."""
    real = torch.empty

    def poisoned(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)

    torch.empty = poisoned
    try:
        return fn(*args)
    finally:
        torch.empty = real


def _impl(op):
    from moetune.kernels.registry import get_impl

    return get_impl(op, "triton").fn


def _config(problem, overrides=None):
    from moetune.ir.target import resolve_target
    from moetune.kernels.registry import KernelConfig
    from moetune.schedules import triton as spaces

    target = resolve_target("cpu")
    point = {**spaces.default_point(problem, target), **(overrides or {})}
    violations = spaces.space(problem, target).violations(point)
    assert not violations, violations
    return KernelConfig.of("triton", point), target


def _assert_close(got, want, dtype):
    from conftest import rel_err

    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got.float()).all(), "non-finite output (an unwritten element?)"
    err = rel_err(got, want)
    if dtype == "float32":
        mx = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
        assert err <= FP32_TOL and mx <= FP32_TOL, f"rel err {err:.2e} (norm) {mx:.2e} (max)"
    else:
        assert err <= FP16_TOL, f"rel err {err:.2e} > {FP16_TOL:.2e}"


def check_route(overrides, t, boost, dtype, logits):
    from moetune.ir.program import lower
    from moetune.kernels import reference as ref
    from moetune.model import MoE, MoEConfig

    cfg = MoEConfig(hidden_size=37, intermediate_size=8, **overrides, dtype=dtype)
    router = MoE(cfg).router
    cbias = router.e_score_correction_bias
    with torch.no_grad():
        if cbias is not None:
            cbias.copy_(0.1 * torch.randn(cfg.num_experts))
        if boost is not None:
            (router.bias if router.bias is not None else cbias)[boost] += 50.0
    x = torch.randn(t, cfg.hidden_size).to(cfg.torch_dtype)
    problem = lower(cfg, t).op("route")
    config, target = _config(problem, {"logits": logits, "BLOCK_K": 32, "num_stages": 1} if logits == "torch" else {})
    with torch.no_grad():
        weights, ids = _poisoned(_impl("route"), problem, config, target, x, router.weight, router.bias, cbias)
        want_w, want_ids = ref.select_experts(ref.router_logits(x, router.weight, router.bias), cfg, cbias)
    if boost is not None:
        assert (want_ids[:, 0] == boost).all()
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), want_ids), (ids, want_ids)
    _assert_close(weights, want_w, "float32")  # routing is fp32 whatever x's dtype


def _ids(t, k, e, pool):
    if pool == "cyclic":
        return (torch.arange(t).unsqueeze(1) + torch.arange(k)).remainder(e).to(torch.int32)
    experts = torch.tensor(pool if pool is not None else range(e))
    return experts[torch.rand(t, len(experts)).argsort(-1)[:, :k]].to(torch.int32)


def _triton_align(weights, ids, e, bm, block_s=None):
    from moetune.ir.program import Problem

    problem = Problem.make("align", "int32", E=e, K=ids.shape[1], BM=bm)
    config, target = _config(problem, {"BLOCK_S": block_s} if block_s else None)
    return _poisoned(_impl("align"), problem, config, target, weights, ids)


def check_align(t, k, e, bm, pool, block_s):
    from moetune.kernels import reference as ref
    from moetune.kernels.ops import max_blocks

    ids, weights = _ids(t, k, e, pool), torch.randn(t, k)
    got, want = _triton_align(weights, ids, e, bm, block_s), ref.align(weights, ids, e, bm)
    nb = want.num_blocks
    assert got.num_blocks == max_blocks(t * k, e, bm) >= nb
    assert got.used_blocks() == nb
    trimmed = got.trimmed()
    for name in ("sorted_token", "sorted_weight", "sorted_slot", "block_expert", "inverse", "counts", "offsets"):
        g, w = getattr(trimmed, name), getattr(want, name)
        assert g.dtype == w.dtype and torch.equal(g, w), f"{name}: {g} != {w}"
    # empty trailing blocks: expert -1, every row a pad row
    assert (got.block_expert[nb:] == -1).all()
    assert (got.sorted_slot[nb:] == -1).all() and (got.sorted_token[nb:] == 0).all()
    assert (got.sorted_weight[nb:] == 0).all()


def _gemm_inputs(shape, dtype, align):
    from moetune.kernels import reference as ref

    t, k, e, _, _, bm, pool = shape
    ids, weights = _ids(t, k, e, None if pool is None else tuple(pool)), torch.randn(t, k).softmax(-1)
    al = _triton_align(weights, ids, e, bm) if align == "triton" else ref.align(weights, ids, e, bm)
    return al, getattr(torch, dtype)


def check_gemm1(shape, act, bias, w_in, gated, dtype, point, align):
    from moetune.ir.program import Problem
    from moetune.kernels import reference as ref

    t, _, e, h, i, bm, _ = shape
    al, dt = _gemm_inputs(shape, dtype, align)
    alpha, limit = (1.702, 7.0) if act == "swiglu_oai" else (0.0, 0.0)
    dims = {"H": h, "I": i, "E": e, "BM": bm, "gated": gated, "act": act, "alpha": alpha, "limit": limit}
    problem = Problem.make("gemm1", dtype, **dims, bias=bias, w_in=w_in)
    u = 2 if gated else 1
    # scale 3: pre-activations ~ N(0, 9), so swiglu_oai's clamp at 7 and relu's kink are exercised
    x = torch.randn(t, h).to(dt)
    w = (3 * torch.randn(e, u * i, h) / h**0.5).to(dt)
    b = torch.randn(e, u * i).to(dt) if bias else None
    config, target = _config(problem, point)
    got = _poisoned(_impl("gemm1"), problem, config, target, x, al, w, b)
    want = ref.gemm1(problem, x.float(), al, w.float(), None if b is None else b.float())  # pad rows included
    assert got.dtype == dt
    _assert_close(got, want, dtype)


def check_gemm2(shape, bias, w_out, dtype, point, align):
    from moetune.ir.program import Problem
    from moetune.kernels import reference as ref

    t, k, e, h, i, bm, _ = shape
    al, dt = _gemm_inputs(shape, dtype, align)
    problem = Problem.make("gemm2", dtype, H=h, I=i, E=e, K=k, BM=bm, bias=bias, w_out=w_out)
    act = torch.randn(al.num_blocks, bm, i).to(dt)  # pad rows and empty blocks too: never combined
    w = (torch.randn(e, h, i) / i**0.5).to(dt)
    b = torch.randn(e, h).to(dt) if bias else None
    config, target = _config(problem, point)
    got = _poisoned(_impl("gemm2"), problem, config, target, act, al, w, b)
    want = ref.gemm2(problem, act.float(), al, w.float(), None if b is None else b.float(), t)
    assert got.dtype == dt
    _assert_close(got, want, dtype)


def check_layer(overrides, tokens):
    """A whole TunedMoE with every op on the triton backend (interpreted) against the reference MoE."""
    from conftest import rel_err

    from moetune.ir.program import lower
    from moetune.ir.target import resolve_target
    from moetune.kernels.registry import default_config
    from moetune.model import MoE, MoEConfig, TunedMoE

    cfg = MoEConfig(hidden_size=40, intermediate_size=29, **overrides)
    ref = MoE(cfg).eval()
    if cfg.score_correction_bias:
        with torch.no_grad():
            ref.router.e_score_correction_bias.normal_(std=0.1)
    target = resolve_target("cpu")
    for t in tokens:
        configs = {op.name: default_config(op.problem, "triton", target) for op in lower(cfg, t)}
        tuned = TunedMoE.from_module(ref, configs=configs)
        assert {d["backend"] for d in tuned.describe(t)} == {"triton"}
        x = torch.randn(t, 40)
        with torch.no_grad():
            want = ref(x)
        got = tuned(x)
        err = rel_err(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want)
        assert err <= 1e-4, (t, err)


def check_probe() -> None:
    """The interpreter itself: a loop bounded by a runtime scalar (Triton <= 3.6's interpreter cannot run one under
    NumPy >= 2.4: it converts 1-element arrays with int())."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out, n):
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out, acc)

    out = torch.zeros(1, dtype=torch.int32)
    probe[(1,)](out, 3)
    assert int(out[0]) == 3, int(out[0])


def check_route_nan(router: str, n_group: int):
    """A router whose logits are NaN for some tokens (a broken checkpoint, an overflow): those tokens still get K
    distinct expert ids in [0, E) (an id past E once made align overwrite another token's row), and every
    other token is routed exactly as the reference routes it."""
    from moetune.ir.program import lower
    from moetune.kernels import reference as ref
    from moetune.model import MoE, MoEConfig

    extra = {"n_group": n_group, "topk_group": 2} if n_group > 1 else {}
    cfg = MoEConfig(hidden_size=32, intermediate_size=8, num_experts=12, top_k=3, router=router, **extra)
    router_module = MoE(cfg).router
    x = torch.randn(6, cfg.hidden_size)
    x[[1, 4]] = float("nan")
    problem = lower(cfg, 6).op("route")
    config, target = _config(problem, {})
    with torch.no_grad():
        weights, ids = _poisoned(_impl("route"), problem, config, target, x, router_module.weight, None, None)
        want_w, want_ids = ref.select_experts(ref.router_logits(x, router_module.weight, None), cfg, None)
    assert ((ids >= 0) & (ids < cfg.num_experts)).all(), ids
    assert all(len(set(row.tolist())) == cfg.top_k for row in ids), ids
    good = [0, 2, 3, 5]
    assert torch.equal(ids[good].long(), want_ids[good]), (ids, want_ids)
    _assert_close(weights[good], want_w[good], "float32")


CHECKS = {
    "probe": check_probe,
    "route_nan": check_route_nan,
    "route": check_route,
    "align": check_align,
    "gemm1": check_gemm1,
    "gemm2": check_gemm2,
    "layer": check_layer,
}


def _serve() -> None:
    """Worker loop: one JSON request per stdin line -> one MARK-prefixed JSON reply on stdout."""
    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        torch.manual_seed(request.get("seed", 0))
        try:
            CHECKS[request["check"]](**request["args"])
            reply = {"ok": True}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        print(MARK + json.dumps(reply), flush=True)


if __name__ == "__main__":
    _serve()


# ---- pytest side -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter():
    """Send a check to the interpreter worker; returns when it has run, raising with its traceback if it failed."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    here = Path(__file__).resolve()
    proc = subprocess.Popen(
        [sys.executable, str(here)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=here.parent
    )
    replies: queue.Queue = queue.Queue()

    def pump():
        for out in proc.stdout:
            if out.startswith(MARK):
                replies.put(json.loads(out[len(MARK) :]))
        replies.put(None)  # the worker exited

    threading.Thread(target=pump, daemon=True).start()

    def run(check: str, seed: int = 0, **args) -> None:
        proc.stdin.write(json.dumps({"check": check, "args": args, "seed": seed}) + "\n")
        proc.stdin.flush()
        reply = replies.get(timeout=WORKER_TIMEOUT)
        if reply is None:
            raise RuntimeError("the interpreter worker died (see captured stderr)")
        if not reply["ok"]:
            pytest.fail(f"{check} failed in the interpreter worker:\n{reply['error']}", pytrace=False)

    try:
        run("probe")
    except pytest.fail.Exception as exc:
        if "only 0-dimensional arrays can be converted" not in str(exc):
            raise
        import numpy
        import triton

        proc.kill()
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__} (it calls int() on "
            "1-element arrays): use NumPy < 2.4 or Triton >= 3.9"
        )
    yield run
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.parametrize(("overrides", "t", "boost", "dtype", "logits"), ROUTE_CASES)
def test_route_matches_reference(interpreter, overrides, t, boost, dtype, logits):
    interpreter("route", overrides=overrides, t=t, boost=boost, dtype=dtype, logits=logits)


@pytest.mark.parametrize(("router", "n_group"), [("softmax", 1), ("sigmoid", 4)])
def test_route_with_nan_logits_keeps_ids_in_range(interpreter, router, n_group):
    interpreter("route_nan", router=router, n_group=n_group)


@pytest.mark.parametrize(("t", "k", "e", "bm", "pool", "block_s"), ALIGN_CASES)
def test_align_matches_reference_with_empty_tail(interpreter, t, k, e, bm, pool, block_s):
    interpreter("align", t=t, k=k, e=e, bm=bm, pool=pool, block_s=block_s)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("align", ["reference", "triton"])
@pytest.mark.parametrize("shape", list(GEMM_SHAPES), ids=list(GEMM_SHAPES))
def test_gemm1_shapes(interpreter, shape, align, dtype):
    # the triton align leaves empty trailing blocks (zeros out of gemm1); the reference align has none
    interpreter(
        "gemm1",
        shape=GEMM_SHAPES[shape],
        act="silu",
        bias=False,
        w_in=False,
        gated=True,
        dtype=dtype,
        point={},
        align=align,
    )


VARIANT = GEMM_SHAPES["zero-token-experts"]
GEMM1_VARIANTS = [
    *((act, True, True, True, "float32") for act in ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")),
    ("swiglu_oai", True, False, True, "float16"),
    ("silu", False, True, True, "float16"),
    *((act, bias, False, False, "float32") for act in ("gelu", "relu") for bias in (False, True)),
    ("gelu_tanh", True, True, False, "float16"),
]


@pytest.mark.parametrize(
    ("act", "bias", "w_in", "gated", "dtype"),
    [
        pytest.param(
            *v,
            id=f"{v[0]}-{'bias' if v[1] else 'no-bias'}-{'w_in' if v[2] else 'w_out'}-"
            f"{'gated' if v[3] else 'non-gated'}-{v[4]}",
        )
        for v in GEMM1_VARIANTS
    ],
)
def test_gemm1_variants(interpreter, act, bias, w_in, gated, dtype):
    interpreter(
        "gemm1", shape=VARIANT, act=act, bias=bias, w_in=w_in, gated=gated, dtype=dtype, point={}, align="triton"
    )


@pytest.mark.parametrize(
    "point",
    [
        pytest.param(SMALL_TILES, id="small-tiles-GROUP_M=1"),
        pytest.param({**SMALL_TILES, "GROUP_M": 32, "BLOCK_N": 64}, id="GROUP_M>row-tiles"),
        pytest.param({**SMALL_TILES, "BLOCK_M": 32, "BLOCK_K": 64}, id="BLOCK_M=BM"),
    ],
)
def test_gemm1_configs(interpreter, point):
    interpreter(
        "gemm1",
        shape=GEMM_SHAPES["BM=32-two-row-tiles"],
        act="silu",
        bias=True,
        w_in=False,
        gated=True,
        dtype="float32",
        point=point,
        align="triton",
    )


GEMM2_CASES = [
    pytest.param(shape, align, dtype, combine, id=f"{shape}-{align}-{dtype}-{combine}")
    for shape in GEMM_SHAPES
    for align in ("reference", "triton")
    for dtype in ("float32", "float16")
    for combine in ("slots", "atomic")
    if not (combine == "atomic" and dtype == "float16" and align == "reference")  # kept short: covered otherwise
]


@pytest.mark.parametrize(("shape", "align", "dtype", "combine"), GEMM2_CASES)
def test_gemm2_shapes(interpreter, shape, align, dtype, combine):
    point = {"combine": combine}
    interpreter("gemm2", shape=GEMM_SHAPES[shape], bias=False, w_out=True, dtype=dtype, point=point, align=align)


@pytest.mark.parametrize("combine", ["slots", "atomic"])
@pytest.mark.parametrize(("bias", "w_out"), [(True, True), (True, False), (False, False)])
def test_gemm2_variants(interpreter, bias, w_out, combine):
    point = {**SMALL_TILES, "combine": combine}
    interpreter("gemm2", shape=VARIANT, bias=bias, w_out=w_out, dtype="float32", point=point, align="triton")


LAYERS = {
    "qwen3-like-softmax-norm": {"num_experts": 12, "top_k": 4},
    "deepseek-v3-like-sigmoid-group-shared": {
        "num_experts": 12,
        "top_k": 3,
        "router": "sigmoid",
        "score_correction_bias": True,
        "n_group": 4,
        "topk_group": 2,
        "group_score": "top2_sum",
        "routed_scaling_factor": 2.5,
        "num_shared_experts": 1,
        "shared_intermediate_size": 24,
    },
    "gpt-oss-like-swiglu_oai-biases": {
        "num_experts": 8,
        "top_k": 2,
        "router": "topk_softmax",
        "norm_topk_prob": False,
        "router_bias": True,
        "expert_bias": True,
        "activation": "swiglu_oai",
    },
    "llama4-like-w_in-gated-shared": {
        "num_experts": 5,
        "top_k": 1,
        "router": "topk_sigmoid",
        "norm_topk_prob": False,
        "apply_router_weight_on_input": True,
        "num_shared_experts": 1,
        "shared_intermediate_size": 24,
    },
    "qwen2-like-shared-gate": {
        "num_experts": 6,
        "top_k": 2,
        "num_shared_experts": 1,
        "shared_intermediate_size": 24,
        "shared_expert_gate": True,
    },
    "distilled-non-gated-topk_hard": {
        "num_experts": 8,
        "top_k": 2,
        "router": "topk_hard",
        "norm_topk_prob": False,
        "gated": False,
        "activation": "gelu",
        "expert_bias": True,
    },
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_tuned_moe_on_triton_matches_reference(interpreter, name):
    interpreter("layer", overrides=LAYERS[name], tokens=[1, 19])


# ---- the empty-block contract for the other backends (this process, no interpreter) -----------------------
def _with_empty_blocks(al, extra: int):
    """An align output with `extra` empty trailing blocks appended, as the Triton align makes them."""
    from moetune.kernels.ops import Aligned

    bm = al.block_m
    i32 = torch.int32
    return Aligned(
        torch.cat([al.sorted_token, torch.zeros(extra, bm, dtype=i32)]),
        torch.cat([al.sorted_weight, torch.zeros(extra, bm)]),
        torch.cat([al.sorted_slot, torch.full((extra, bm), -1, dtype=i32)]),
        torch.cat([al.block_expert, torch.full((extra,), -1, dtype=i32)]),
        al.inverse,
        al.counts,
        al.offsets,
    )


@pytest.mark.parametrize("backend", ["reference", "torch", "tvm"])
def test_gemms_accept_empty_trailing_blocks(backend):
    from moetune.ir.program import Problem
    from moetune.ir.target import resolve_target
    from moetune.kernels import reference as ref
    from moetune.kernels.registry import default_config, get_impl

    t, k, e, h, i, bm = 9, 2, 7, 24, 16, 4
    ids = _ids(t, k, e, (1, 2, 5))
    weights = torch.randn(t, k).softmax(-1)
    al = ref.align(weights, ids, e, bm)
    padded = _with_empty_blocks(al, 3)
    assert padded.used_blocks() == al.num_blocks and padded.trimmed().num_blocks == al.num_blocks
    g1 = Problem.make(
        "gemm1", "float32", H=h, I=i, E=e, BM=bm, gated=True, act="silu", alpha=0.0, limit=0.0, bias=True, w_in=False
    )
    g2 = Problem.make("gemm2", "float32", H=h, I=i, E=e, K=k, BM=bm, bias=True, w_out=True)
    x, w1, b1 = torch.randn(t, h), torch.randn(e, 2 * i, h) / 5, torch.randn(e, 2 * i)
    w2, b2 = torch.randn(e, h, i) / 4, torch.randn(e, h)
    if backend == "reference":
        act = ref.gemm1(g1, x, padded, w1, b1)
        out = ref.gemm2(g2, act, padded, w2, b2, t)
    else:
        target = resolve_target("cpu")
        act = get_impl("gemm1", backend).fn(g1, default_config(g1, backend, target), target, x, padded, w1, b1)
        out = get_impl("gemm2", backend).fn(g2, default_config(g2, backend, target), target, act, padded, w2, b2)
    want_act = ref.gemm1(g1, x, al, w1, b1)
    assert act.shape == (al.num_blocks + 3, bm, i)
    assert torch.equal(act[al.num_blocks :], torch.zeros(3, bm, i))  # empty blocks: zeros
    assert (act[: al.num_blocks] - want_act).abs().max() <= 1e-5
    assert (out - ref.gemm2(g2, want_act, al, w2, b2, t)).abs().max() <= 1e-5


def test_max_blocks_bounds_every_align():
    from moetune.kernels import reference as ref
    from moetune.kernels.ops import max_blocks

    for t, k, e, bm in [(1, 1, 1, 1), (1, 8, 128, 16), (37, 2, 7, 4), (64, 4, 16, 8), (5, 3, 3, 32)]:
        for _ in range(5):
            ids = _ids(t, k, e, None)
            nb = ref.align(torch.rand(t, k), ids, e, bm).num_blocks
            assert nb <= max_blocks(t * k, e, bm)
    assert max_blocks(24, 128, 1) == 24  # BM = 1: no padding, the bound is exact
    assert max_blocks(8, 128, 16) == 8  # decode: each of 8 experts gets one block


def test_cpu_tensors_need_the_interpreter():
    from moetune.ir.program import Problem
    from moetune.ir.target import resolve_target
    from moetune.kernels.registry import default_config, get_impl

    target = resolve_target("cpu")
    problem = Problem.make("align", "int32", E=4, K=2, BM=4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        get_impl("align", "triton").fn(
            problem,
            default_config(problem, "triton", target),
            target,
            torch.rand(3, 2),
            torch.zeros(3, 2, dtype=torch.int32),
        )
