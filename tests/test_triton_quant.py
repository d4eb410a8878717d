"""The Triton quantized GEMMs (qgemm1 / qgemm2: w8a16, w4a16) against kernels/reference.py, their search space, their
ahead-of-time compiles, and QuantizedWeight's device moves.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per block, G weights per scale.

Under the interpreter (a worker process started with TRITON_INTERPRET=1, as tests/test_triton.py explains: this file
is also the worker, serving tests/test_triton.py's checks plus its own): int8 and int4 codes with G = 32 and 64, at
the default point and at a few tile points, against the reference on the *same* codes (kernels/reference.py's
qgemm1 / qgemm2 dequantize them to fp32). Tolerances as for the dense kernels: fp32 1e-5 norm- and max-wise (the
kernel dequantizes to the exact fp32 values c * s and runs an ieee fp32 dot); fp16 2 * 2^-11 norm-wise (the
dequantized weight is rounded once to fp16 for tl.dot, half an ulp like the output's own rounding). bf16 has no
tl.dot in the interpreter: tests/test_gpu.py checks it on a GPU.

In this process: the space's constraints between BLOCK_K and G (refused points name the constraint), prepare on a
quantized layer (with a fake compiler: no point with BLOCK_K not dividing G is ever compiled), real ahead-of-time
compiles for sm_80 / sm_89 / sm_90, and device moves that keep a QuantizedWeight quantized.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from moetune.ir.program import Problem, lower
from moetune.ir.target import resolve_target
from moetune.kernels.quant import QuantizedWeight
from moetune.model import MoEConfig
from moetune.schedules import triton as spaces

# (T, K, E, H, I, BM, expert pool): gemm1 reduces over H, gemm2 over I, each a multiple of 64 (G); the output
# widths stay off the tile multiples
QSHAPES = {
    "T=1": (1, 2, 13, 64, 29, 2, None),
    "zero-token-experts": (12, 2, 13, 128, 37, 4, (0, 5, 12)),
    "BM=32-two-row-tiles": (48, 2, 3, 64, 70, 32, None),
}
QSHAPES2 = {  # gemm2: I is the reduction
    "T=1": (1, 2, 13, 37, 64, 2, None),
    "zero-token-experts": (12, 2, 13, 40, 128, 4, (0, 5, 12)),
    "BM=32-two-row-tiles": (48, 2, 3, 37, 64, 32, None),
}
FORMATS = [(fmt, g) for fmt in ("int8", "int4") for g in (32, 64)]
FMT_IDS = [f"{fmt}-G{g}" for fmt, g in FORMATS]
TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}


# ---- checks (run in the worker, with TRITON_INTERPRET=1) ---------------------------------------------------
def _weight(w: torch.Tensor, fmt: str, group: int, kind: str, interleave: int | None = None) -> torch.Tensor:
    """The weight as a launcher may get it: quantized (natural layout), quantized in CPU panels, or dense."""
    if kind == "dense":
        return w
    return QuantizedWeight.of(w, fmt, group, 16 if kind == "panel" else None, interleave if kind == "panel" else None)


def check_qgemm1(
    shape, fmt, group, dtype, point, kind="quantized", gated=True, act="silu", bias=False, w_in=False, aq=0
):
    from test_triton import _assert_close, _config, _gemm_inputs, _impl, _poisoned

    from moetune.kernels import reference as ref
    from moetune.kernels.quant import as_quantized

    t, _, e, h, i, bm, _ = shape
    al, dt = _gemm_inputs(shape, dtype, "triton")
    alpha, limit = (1.702, 7.0) if act == "swiglu_oai" else (0.0, 0.0)
    dims = {"H": h, "I": i, "E": e, "BM": bm, "gated": gated, "act": act, "alpha": alpha, "limit": limit}
    problem = Problem.make("qgemm1", dtype, **dims, bias=bias, w_in=w_in, wq=fmt, G=group, aq=aq)
    u = 2 if gated else 1
    x = torch.randn(t, h).to(dt)
    w = _weight((3 * torch.randn(e, u * i, h) / h**0.5).to(dt), fmt, group, kind, i if gated else None)
    b = torch.randn(e, u * i).to(dt) if bias else None
    config, target = _config(problem, point)
    got = _poisoned(_impl("qgemm1"), problem, config, target, x, al, w, b)
    codes = as_quantized(w, fmt, group)  # the same codes (quantizing is deterministic)
    want = ref.qgemm1(problem, x.float(), al, codes, None if b is None else b.float())
    assert got.dtype == dt
    _assert_close(got, want, dtype)


def check_qgemm2(shape, fmt, group, dtype, point, kind="quantized", bias=False, w_out=True, aq=0):
    from test_triton import _assert_close, _config, _gemm_inputs, _impl, _poisoned

    from moetune.kernels import reference as ref
    from moetune.kernels.quant import as_quantized

    t, k, e, h, i, bm, _ = shape
    al, dt = _gemm_inputs(shape, dtype, "triton")
    dims = {"H": h, "I": i, "E": e, "K": k, "BM": bm}
    problem = Problem.make("qgemm2", dtype, **dims, bias=bias, w_out=w_out, wq=fmt, G=group, aq=aq)
    act = torch.randn(al.num_blocks, bm, i).to(dt)
    w = _weight((torch.randn(e, h, i) / i**0.5).to(dt), fmt, group, kind)
    b = torch.randn(e, h).to(dt) if bias else None
    config, target = _config(problem, point)
    got = _poisoned(_impl("qgemm2"), problem, config, target, act, al, w, b)
    want = ref.qgemm2(problem, act.float(), al, as_quantized(w, fmt, group), None if b is None else b.float(), t)
    assert got.dtype == dt
    _assert_close(got, want, dtype)


def check_qgemm_refusals():
    """A weight of another format, and a point whose K step crosses a scale group, are errors before any launch."""
    from test_triton import _gemm_inputs, _impl

    from moetune.kernels.registry import KernelConfig

    shape = QSHAPES2["T=1"]
    al, _ = _gemm_inputs(shape, "float32", "triton")
    problem = Problem.make(
        "qgemm2", "float32", H=37, I=64, E=13, K=2, BM=2, bias=False, w_out=True, wq="int8", G=32, aq=0
    )
    act, target = torch.randn(al.num_blocks, 2, 64), resolve_target("cpu")
    int4 = QuantizedWeight.of(torch.randn(13, 37, 64), "int4", 32)
    config = KernelConfig.of("triton", {**spaces.default_point(problem, target), "BLOCK_K": 32})
    with pytest.raises(ValueError, match="int8"):
        _impl("qgemm2")(problem, config, target, act, al, int4, None)
    int8 = QuantizedWeight.of(torch.randn(13, 37, 64), "int8", 32)
    crossing = KernelConfig.of("triton", {**config.as_dict(), "BLOCK_K": 64})
    with pytest.raises(ValueError, match="block_k_divides_group"):
        _impl("qgemm2")(problem, crossing, target, act, al, int8, None)


def check_quant_layer(overrides, tokens):
    """A quantized TunedMoE with every op on the triton backend against the reference MoE on the same codes."""
    from conftest import rel_err

    from moetune.kernels.registry import default_config
    from moetune.model import MoE, TunedMoE

    cfg = MoEConfig(hidden_size=64, intermediate_size=64, **overrides)
    ref = MoE(cfg).eval()
    assert isinstance(ref.experts.gate_up_proj, QuantizedWeight)
    target = resolve_target("cpu")
    for t in tokens:
        configs = {op.name: default_config(op.problem, "triton", target) for op in lower(cfg, t)}
        tuned = TunedMoE.from_module(ref, configs=configs)
        assert {d["backend"] for d in tuned.describe(t)} == {"triton"}
        assert tuned.describe(t)[2]["problem"].startswith("qgemm1[")
        x = torch.randn(t, 64)
        with torch.no_grad():
            want = ref(x)
        assert rel_err(tuned(x), want) <= 1e-4, t


def _serve_all() -> None:
    import test_triton

    test_triton.CHECKS.update(
        qgemm1=check_qgemm1, qgemm2=check_qgemm2, qgemm_refusals=check_qgemm_refusals, quant_layer=check_quant_layer
    )
    test_triton._serve()


if __name__ == "__main__":
    _serve_all()


# ---- pytest side: the interpreter worker -------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter():
    """Send a check to the interpreter worker (this file run as a script); fail with its traceback."""
    from test_triton import MARK, WORKER_TIMEOUT

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
        replies.put(None)

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
        proc.kill()
        if "only 0-dimensional arrays" not in str(exc):
            raise
        pytest.skip("this Triton's interpreter cannot run under this NumPy (as in tests/test_triton.py)")
    yield run
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("fmt", "group"), FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("op", ["qgemm1", "qgemm2"])
def test_qgemms_match_reference(interpreter, op, fmt, group, dtype):
    shape = (QSHAPES if op == "qgemm1" else QSHAPES2)["zero-token-experts"]
    interpreter(op, shape=shape, fmt=fmt, group=group, dtype=dtype, point={})


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("op", ["qgemm1", "qgemm2"])
def test_a8_qgemms_run_the_weight_only_kernels_on_the_quantized_inputs(interpreter, op, fmt):
    """w8a8 / w4a8 (aq=8) on the GPU: the launcher quantizes the input rows, the w*a16 kernel multiplies their
    values; the reference quantizes them the same way."""
    shape = (QSHAPES if op == "qgemm1" else QSHAPES2)["zero-token-experts"]
    interpreter(op, shape=shape, fmt=fmt, group=32, dtype="float32", point={}, aq=8)


TILE_POINTS = [
    pytest.param("T=1", TILES, id="T=1-small-tiles"),
    pytest.param("BM=32-two-row-tiles", {**TILES, "BLOCK_M": 32, "BLOCK_K": 64, "GROUP_M": 8}, id="BLOCK_M=BM-K64"),
    pytest.param("BM=32-two-row-tiles", {**TILES, "BLOCK_N": 64, "GROUP_M": 32, "num_stages": 3}, id="GROUP_M>tiles"),
]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize(("shape", "point"), TILE_POINTS)
def test_qgemms_at_tile_points(interpreter, shape, point, fmt):
    interpreter("qgemm1", shape=QSHAPES[shape], fmt=fmt, group=64, dtype="float32", point=point, bias=True)
    interpreter(
        "qgemm2", shape=QSHAPES2[shape], fmt=fmt, group=64, dtype="float32", point={**point, "combine": "atomic"}
    )


@pytest.mark.parametrize("kind", ["panel", "dense"])
def test_qgemms_take_panel_layouts_and_dense_weights(interpreter, kind):
    """A QuantizedWeight in CPU panels is read in its natural layout; a dense weight is quantized (as_quantized)."""
    interpreter("qgemm1", shape=QSHAPES["T=1"], fmt="int4", group=32, dtype="float32", point={}, kind=kind)
    interpreter("qgemm2", shape=QSHAPES2["T=1"], fmt="int8", group=32, dtype="float32", point={}, kind=kind)


@pytest.mark.parametrize(
    ("act", "gated", "bias", "w_in", "dtype"),
    [
        ("swiglu_oai", True, True, False, "float32"),
        ("gelu", False, True, True, "float32"),
        ("relu", False, False, False, "float16"),
    ],
)
def test_qgemm1_epilogues(interpreter, act, gated, bias, w_in, dtype):
    point, shape = {}, QSHAPES["zero-token-experts"]
    interpreter("qgemm1", shape=shape, fmt="int4", group=32, dtype=dtype, point=point, gated=gated, act=act, bias=bias,
                w_in=w_in)  # fmt: skip


@pytest.mark.parametrize(("bias", "w_out"), [(True, True), (True, False)])
def test_qgemm2_bias_and_routing_weight(interpreter, bias, w_out):
    shape = QSHAPES2["zero-token-experts"]
    interpreter("qgemm2", shape=shape, fmt="int8", group=64, dtype="float32", point={}, bias=bias, w_out=w_out)


def test_qgemms_refuse_another_format_and_a_crossing_k_step(interpreter):
    interpreter("qgemm_refusals")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_tuned_moe_on_triton_matches_reference(interpreter, fmt):
    overrides = {"num_experts": 6, "top_k": 2, "quant": fmt, "quant_group": 32, "num_shared_experts": 1}
    interpreter("quant_layer", overrides={**overrides, "shared_intermediate_size": 24}, tokens=[1, 19])


# ---- the space (this process) ----------------------------------------------------------------------------------
def _qproblem(op: str, fmt: str, group: int, bm: int = 16) -> Problem:
    cfg = MoEConfig(hidden_size=256, intermediate_size=128, num_experts=8, top_k=2, dtype="bfloat16")
    cfg = cfg.quantized(fmt, group)
    problem = next(o.problem for o in lower(cfg, 64, "cuda") if o.name == f"experts.{op}")
    return Problem.make(problem.op, problem.dtype, **{**dict(problem.dims), "BM": bm})


@pytest.mark.parametrize("op", ["gemm1", "gemm2"])
@pytest.mark.parametrize(("fmt", "group"), [*FORMATS, ("int4", 128)], ids=[*FMT_IDS, "int4-G128"])
def test_block_k_must_divide_the_group(op, fmt, group):
    problem = _qproblem(op, fmt, group)
    assert problem.op == f"q{op}" and problem.gemm == op
    sp = spaces.space(problem, resolve_target("sm_90"))
    base = spaces.default_point(problem, resolve_target("sm_90"))
    assert sp.is_feasible(base) and group % base["BLOCK_K"] == 0
    for block_k in spaces.BLOCK_K:
        point = {**base, "BLOCK_K": block_k, "num_stages": 2}
        why = sp.violations(point)
        if group % block_k:
            assert any(v.startswith("block_k_divides_group:") for v in why), (block_k, why)
            assert f"G={group}" in next(v for v in why if v.startswith("block_k_divides_group"))
        else:
            assert not any(v.startswith("block_k_divides_group") for v in why), (block_k, why)
    assert set(sp.narrowed().params[2].choices) == {k for k in spaces.BLOCK_K if group % k == 0}
    names = {c.name for c in sp.constraints}
    assert ("int4_even_block_k" in names) == (fmt == "int4")
    assert "block_k_divides_group" not in {
        c.name for c in spaces.space(problem.dense(), resolve_target("sm_90")).constraints
    }


def test_the_shared_memory_floor_counts_codes_not_weights():
    """Codes take a byte (int4: half) of shared memory per weight, not bf16's two: a tile the dense floor refuses
    fits when quantized."""
    dense, quant = _qproblem("gemm1", "int8", 128).dense(), _qproblem("gemm1", "int8", 128)
    point = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    assert any(v.startswith("shared_memory_floor") for v in spaces.static_space(dense).violations(point))
    assert not any(v.startswith("shared_memory_floor") for v in spaces.static_space(quant).violations(point))


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_default_points_of_quantized_layers_are_feasible(kind):
    target = resolve_target("sm_90")
    for name in ("qwen3-30b-a3b", "mixtral-8x7b"):
        for fmt in ("int8", "int4", "w4a8"):
            for group in (32, 64, 128):
                cfg = MoEConfig.preset(name, dtype="bfloat16").quantized(fmt, group)
                for t in (1, 64, 4096):
                    for op in lower(cfg, t, kind):
                        point = spaces.default_point(op.problem, target)
                        assert spaces.space(op.problem, target).is_feasible(point), (name, fmt, group, op.name, point)


# ---- ahead of time (this process) --------------------------------------------------------------------------------
@pytest.fixture
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


def test_the_triton_backend_serves_qgemms_on_cuda():
    from moetune.kernels.registry import backends_for

    assert backends_for("qgemm1", "cuda") == backends_for("qgemm2", "cuda") == ["triton", "torch"]


def test_aot_specs_read_codes_and_scales():
    from moetune.kernels.triton.aot import aot_spec

    for fmt, ptr in (("int8", "*i8"), ("int4", "*u8")):
        for op in ("gemm1", "gemm2"):
            problem = _qproblem(op, fmt, 64)
            spec = aot_spec(problem, spaces.default_point(problem, resolve_target("sm_90")))
            assert spec.name == f"_{op}_kernel" and spec.signature["w_ptr"] == ptr
            assert spec.signature["s_ptr"] == "*fp16" and spec.constexprs["QGROUP"] == 64
            assert spec.constexprs["QUANT"] == {"int8": 1, "int4": 2}[fmt]
            dense = aot_spec(problem.dense(), spaces.default_point(problem.dense(), resolve_target("sm_90")))
            assert dense.constexprs["QUANT"] == 0 and dense.key() != spec.key()


def test_prepare_never_compiles_a_k_step_across_groups(monkeypatch, _fresh_cache):
    from moetune.autotune.tuning import prepare as prep

    seen: list = []

    def fake(spec, capability):
        seen.append(spec.constexprs)
        return {"shared": 1024, "regs": 64, "spill_bytes": 0, "mma": "mma", "seconds": 0.0}

    monkeypatch.setattr(prep, "compile_spec", fake)
    cfg = MoEConfig.preset("qwen3-30b-a3b").shrunk(8).quantized("int4", 32, "cuda")
    report = prep.prepare(cfg, resolve_target("sm_90"), m=[1, 4096], jobs=1)
    rows = {r.op: r for r in report.ops}
    for op in ("experts.gemm1", "experts.gemm2"):
        assert rows[op].static_pruned["block_k_divides_group"] > 0 and rows[op].feasible == rows[op].candidates > 0
    gemms = [c for c in seen if "QUANT" in c]
    assert gemms and all(c["QUANT"] == 2 and c["QGROUP"] % c["BLOCK_K"] == 0 for c in gemms)


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_aot_compile_of_qgemms(arch, _fresh_cache):
    """One real compile per op and format: feasible, on the tensor cores (mma / wgmma, never fma)."""
    from moetune.autotune.tuning import prepare as prep
    from moetune.kernels.triton.aot import aot_spec

    target = resolve_target(arch)
    for fmt, op in (("int8", "gemm1"), ("int4", "gemm2"), ("int4", "gemm1")):
        problem = _qproblem(op, fmt, 128, bm=64)
        point = {**spaces.default_point(problem, target), "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
        assert spaces.space(problem, target).is_feasible(point), point
        got = prep.assess(prep.compile_spec(aot_spec(problem, point), target.capability), target.limits, 4)
        assert got["feasible"] and got["shared"] > 0, (fmt, op, got)
        assert got["mma"] == ("wgmma" if arch == "sm_90" else "mma"), got


def test_the_kernel_refuses_a_k_step_across_groups_at_compile_time(_fresh_cache):
    from moetune.autotune.tuning import prepare as prep
    from moetune.kernels.triton.aot import aot_spec

    problem = _qproblem("gemm2", "int8", 32)
    point = {**spaces.default_point(problem, resolve_target("sm_90")), "BLOCK_K": 64}
    assert "block_k_divides_group" in " ".join(spaces.static_space(problem).violations(point))
    got = prep.compile_spec(aot_spec(problem, point), 90)
    assert "error" in got, got


# ---- device moves (this process; tests/test_gpu.py moves to a GPU) -----------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_device_moves_keep_a_weight_quantized(fmt):
    q = QuantizedWeight.of(torch.randn(3, 40, 64), fmt, 32)
    moved = q.to("meta")
    assert isinstance(moved, QuantizedWeight) and moved.device.type == "meta"
    assert moved.codes.device.type == moved.scales.device.type == "meta"
    assert (moved.fmt, moved.group, moved.shape, moved.dtype) == (fmt, 32, q.shape, q.dtype)
    copied = q.to("cpu", copy=True)
    assert isinstance(copied, QuantizedWeight) and copied.codes.data_ptr() != q.codes.data_ptr()
    assert torch.equal(copied.codes, q.codes) and torch.equal(copied.unpack(), q.unpack())
    panel = QuantizedWeight.of(torch.randn(3, 40, 64), fmt, 32, 16).to("meta")
    assert isinstance(panel, QuantizedWeight) and panel.panel == 16
    half = q.to(torch.float16)  # a dtype change gives the dense values
    assert type(half) is torch.Tensor and torch.equal(half, q.unpack().half())
    assert type(q.to("meta", torch.float16)) is torch.Tensor


def test_module_moves_keep_quantized_parameters():
    q = QuantizedWeight.of(torch.randn(2, 16, 64), "int4", 32)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(q, requires_grad=False)
    # same device type: nn.Module._apply sets `param.data`, which must carry the new codes along
    before = module.w
    module._apply(lambda t: t.to("cpu", copy=True))
    assert module.w is before and isinstance(module.w, QuantizedWeight)
    assert module.w.codes.data_ptr() != q.codes.data_ptr() and torch.equal(module.w.unpack(), q.unpack())
    module.to("meta")  # another device type: a new Parameter around the moved weight
    assert isinstance(module.w, QuantizedWeight) and isinstance(module.w, torch.nn.Parameter)
    assert module.w.codes.device.type == "meta" and not module.w.requires_grad
