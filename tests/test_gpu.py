"""The Triton backend compiled on a real GPU (marked `gpu`: skipped without CUDA).

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per block.

Every kernel in bf16 against kernels/reference.py (run in fp32 on the same bf16 inputs): route ids exactly and
weights to 1e-5 (routing is fp32; bf16 products are exact in fp32), align exactly with no host synchronisation
(torch.cuda.set_sync_debug_mode("error") turns any sync into an error), the GEMMs within 2x the torch backend's
own bf16 error (floor: half a bf16 ulp, 2^-9); then the whole TunedMoE on the triton backend against the
reference MoE; that the resources prepare reads ahead of time equal what the driver reports for the same kernel;
and a short tune: a few feasible points of each GEMM measured with CUDA events, every one verified first.
Quantized experts (w8a16 / w4a16: qgemm1 / qgemm2) the same way, against the reference on the same codes, after a
QuantizedWeight moved to the GPU (it stays quantized).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.quant import QuantizedWeight
from moetune.kernels.registry import KernelConfig, default_config, get_impl
from moetune.model import MoE, MoEConfig, TunedMoE
from moetune.schedules import triton as spaces

pytestmark = pytest.mark.gpu
BF16_FLOOR = 2.0**-9
CONFIGS = {
    "qwen3-like": MoEConfig(hidden_size=512, intermediate_size=192, num_experts=32, top_k=8, dtype="bfloat16"),
    "deepseek-v3-like": MoEConfig(
        hidden_size=384,
        intermediate_size=160,
        num_experts=64,
        top_k=6,
        router="sigmoid",
        score_correction_bias=True,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        shared_intermediate_size=160,
        dtype="bfloat16",
    ),
    "gpt-oss-like": MoEConfig(
        hidden_size=256,
        intermediate_size=128,
        num_experts=16,
        top_k=4,
        router="topk_softmax",
        norm_topk_prob=False,
        router_bias=True,
        expert_bias=True,
        activation="swiglu_oai",
        dtype="bfloat16",
    ),
    "llama4-like": MoEConfig(
        hidden_size=256,
        intermediate_size=160,
        num_experts=16,
        top_k=1,
        router="topk_sigmoid",
        norm_topk_prob=False,
        apply_router_weight_on_input=True,
        dtype="bfloat16",
    ),
    "distilled-non-gated": MoEConfig(
        hidden_size=256,
        intermediate_size=128,
        num_experts=8,
        top_k=2,
        router="topk_hard",
        norm_topk_prob=False,
        gated=False,
        activation="gelu",
        expert_bias=True,
        dtype="bfloat16",
    ),
}
TOKENS = (1, 7, 256)  # decode, a few tokens, a prefill chunk (many blocks per expert)


@pytest.fixture(scope="module")
def target():
    return resolve_target("cuda")


def _layer(cfg: MoEConfig) -> MoE:
    torch.manual_seed(0)
    layer = MoE(cfg).eval()
    if cfg.score_correction_bias:
        with torch.no_grad():
            layer.router.e_score_correction_bias.normal_(std=0.1)
    return layer.cuda()


def _run(op, problem, target, *args, backend="triton", point=None):
    config = KernelConfig.of(backend, point) if point is not None else default_config(problem, backend, target)
    return get_impl(op, backend).fn(problem, config, target, *args)


def _route(layer, program, target, x):
    r = layer.router
    return _run("route", program.op("route"), target, x, r.weight, r.bias, r.e_score_correction_bias)


@pytest.mark.parametrize("logits", ["fused", "torch"])
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_route_bf16(name, t, logits, target):
    cfg = CONFIGS[name]
    layer, program = _layer(cfg), lower(cfg, t, "cuda")
    x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    problem = program.op("route")
    point = spaces.default_point(problem, target)
    if logits == "torch":
        point.update(logits="torch", BLOCK_K=32, num_stages=1)
    r = layer.router
    weights, ids = _run("route", problem, target, x, r.weight, r.bias, r.e_score_correction_bias, point=point)
    cb = None if r.e_score_correction_bias is None else r.e_score_correction_bias.cpu()
    want_w, want_ids = ref.select_experts(
        ref.router_logits(x.cpu(), r.weight.cpu(), None if r.bias is None else r.bias.cpu()), cfg, cb
    )
    assert torch.equal(ids.cpu().long(), want_ids)
    assert rel_err(weights.cpu(), want_w) <= 1e-5


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("name", ["qwen3-like", "deepseek-v3-like"])
def test_align_has_no_host_sync(name, t, target):
    cfg = CONFIGS[name]
    layer, program = _layer(cfg), lower(cfg, t, "cuda")
    x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    weights, ids = _route(layer, program, target, x)
    problem = program.op("align")
    torch.cuda.set_sync_debug_mode("error")
    try:
        al = _run("align", problem, target, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = ref.align(weights.cpu(), ids.cpu(), cfg.num_experts, problem["BM"])
    got = al.trimmed()
    for f in ("sorted_token", "sorted_weight", "sorted_slot", "block_expert", "inverse", "counts", "offsets"):
        assert torch.equal(getattr(got, f).cpu(), getattr(want, f)), f
    assert (al.block_expert[want.num_blocks :] == -1).all()


def _gemm_case(name, t):
    cfg = CONFIGS[name]
    layer, program = _layer(cfg), lower(cfg, t, "cuda")
    x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    target = resolve_target("cuda")
    weights, ids = _route(layer, program, target, x)
    al = _run("align", program.op("align"), target, weights, ids)
    return cfg, layer, program, x, al


def _cpu_aligned(al):
    from moetune.kernels.ops import Aligned

    return Aligned(*(getattr(al, f).cpu() for f in Aligned.__dataclass_fields__))


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gemms_bf16_within_twice_torch(name, t, target):
    _, layer, program, x, al = _gemm_case(name, t)
    ex = layer.experts
    g1, g2 = program.op("experts.gemm1"), program.op("experts.gemm2")
    act = _run("gemm1", g1, target, x, al, ex.gate_up_proj, ex.gate_up_bias)
    torch_act = _run("gemm1", g1, target, x, al.trimmed(), ex.gate_up_proj, ex.gate_up_bias, backend="torch")
    cal = _cpu_aligned(al)
    b1 = None if ex.gate_up_bias is None else ex.gate_up_bias.float().cpu()
    want_act = ref.gemm1(g1, x.float().cpu(), cal, ex.gate_up_proj.float().cpu(), b1)
    nb = al.used_blocks()
    kernel_err = rel_err(act[:nb].cpu(), want_act[:nb])
    torch_err = rel_err(torch_act.cpu(), want_act[:nb])
    assert kernel_err <= 2 * max(torch_err, BF16_FLOOR), (kernel_err, torch_err)
    assert (act[nb:] == 0).all()

    for combine in ("slots", "atomic"):
        point = {**spaces.default_point(g2, target), "combine": combine}
        out = _run("gemm2", g2, target, act, al, ex.down_proj, ex.down_bias, point=point)
        torch_out = _run("gemm2", g2, target, act[:nb], al.trimmed(), ex.down_proj, ex.down_bias, backend="torch")
        b2 = None if ex.down_bias is None else ex.down_bias.float().cpu()
        want = ref.gemm2(g2, act.float().cpu(), cal, ex.down_proj.float().cpu(), b2, t)
        kernel_err, torch_err = rel_err(out.cpu(), want), rel_err(torch_out.cpu(), want)
        assert kernel_err <= 2 * max(torch_err, BF16_FLOOR), (combine, kernel_err, torch_err)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tuned_moe_on_triton_bf16(name):
    cfg = CONFIGS[name]
    layer = _layer(cfg)
    exact = MoE(cfg.replace(dtype="float32")).eval()
    exact.load_state_dict({k: v.float().cpu() for k, v in layer.state_dict().items()})
    tuned = TunedMoE.from_module(layer, target="cuda", backends=("triton",))
    for t in TOKENS:
        x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = exact(x.float().cpu())
            torch_err = rel_err(layer(x).float().cpu(), want)
        got = tuned(x)
        assert got.shape == x.shape and got.dtype == torch.bfloat16 and got.is_cuda
        kernel_err = rel_err(got.float().cpu(), want)
        # a near-tie in the router can pick another expert in bf16: the floor absorbs one such row
        assert kernel_err <= 2 * torch_err + 1e-3, (t, kernel_err, torch_err)


def test_prepared_resources_match_the_driver(target, tmp_path, monkeypatch):
    """prepare's ahead-of-time numbers (shared memory, registers) are the ones of the kernel the launcher runs."""
    from moetune.autotune.tuning import prepare as prep
    from moetune.kernels.triton import gemm_kernels
    from moetune.kernels.triton.aot import aot_spec

    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    _, layer, program, x, al = _gemm_case("qwen3-like", 256)
    g1 = program.op("experts.gemm1")
    point = spaces.default_point(g1, target)
    aot = prep.compile_spec(aot_spec(g1, point), target.capability)
    out = torch.empty(al.num_blocks * g1["BM"], g1["I"], device="cuda", dtype=torch.bfloat16)
    ex = layer.experts
    compiled = gemm_kernels.launch_gemm1(
        gemm_kernels._gemm1_kernel,
        g1,
        point,
        x,
        ex.gate_up_proj,
        None,
        al.sorted_token.reshape(-1),
        al.sorted_weight.reshape(-1),
        al.block_expert,
        out,
    )
    torch.cuda.synchronize()
    # the JIT may specialise an argument differently from prepare's hints, so registers get a little slack
    assert compiled.metadata.shared == aot["shared"], (compiled.metadata.shared, aot)
    assert abs(compiled.n_regs - aot["regs"]) <= 8 and compiled.n_spills == 0, (compiled.n_regs, aot)


@pytest.mark.parametrize("op", ["experts.gemm1", "experts.gemm2"])
def test_short_tune_of_a_gemm(op, target):
    """A handful of feasible points, each verified against the default point's output, then timed."""
    import triton.testing

    _, layer, program, x, al = _gemm_case("qwen3-like", 256)
    problem, ex = program.op(op), layer.experts
    space = spaces.space(problem, target)
    points = [spaces.default_point(problem, target)]
    points += [p for p in space.points() if p["GROUP_M"] == 8][:: max(1, len(list(space.points())) // 40)][:5]
    if op == "experts.gemm1":
        args = (x, al, ex.gate_up_proj, ex.gate_up_bias)
    else:
        act = _run("gemm1", program.op("experts.gemm1"), target, x, al, ex.gate_up_proj, ex.gate_up_bias)
        args = (act, al, ex.down_proj, ex.down_bias)
    kind = problem.op
    want = _run(kind, problem, target, *args, point=points[0])
    timings = []
    for point in points:
        got = _run(kind, problem, target, *args, point=point)
        assert rel_err(got.float(), want.float()) <= 1e-2, point
        timings.append(triton.testing.do_bench(lambda p=point: _run(kind, problem, target, *args, point=p)))
    assert all(t > 0 for t in timings)


# ---- quantized experts on the Triton backend (kernels/triton/quant_tiles.py) -----------------------------------
QCFG = MoEConfig(hidden_size=512, intermediate_size=256, num_experts=32, top_k=8, dtype="bfloat16")
QUANTS = [("int8", 128), ("int4", 128), ("int4", 32)]


def test_quantized_weights_move_to_the_gpu_quantized():
    q = QuantizedWeight.of(torch.randn(4, 64, 128), "int4", 32)
    for moved in (q.cuda(), q.to("cuda"), q.to(torch.device("cuda"), non_blocking=True)):
        assert isinstance(moved, QuantizedWeight) and moved.is_cuda and moved.codes.is_cuda and moved.scales.is_cuda
    back = q.cuda().cpu()
    assert isinstance(back, QuantizedWeight) and torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert type(q.to("cuda", torch.bfloat16)) is torch.Tensor  # a dtype change: the dense values
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(q, requires_grad=False)
    module.cuda()  # nn.Module._apply: `param.data = moved` (CPU -> CUDA are compatible tensor types)
    assert isinstance(module.w, QuantizedWeight) and module.w.is_cuda and module.w.codes.is_cuda
    assert torch.equal(module.w.cpu().unpack(), q.unpack())


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize(("fmt", "group"), QUANTS, ids=[f"{f}-G{g}" for f, g in QUANTS])
def test_qgemms_bf16_within_twice_torch(fmt, group, t, target):
    cfg = QCFG.quantized(fmt, group, "cuda")
    layer, program = _layer(cfg), lower(cfg, t, "cuda")
    ex = layer.experts
    assert isinstance(ex.gate_up_proj, QuantizedWeight) and ex.gate_up_proj.codes.is_cuda  # moved, still codes
    x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    al = _run("align", program.op("align"), target, *_route(layer, program, target, x))
    g1, g2 = program.op("experts.gemm1"), program.op("experts.gemm2")
    act = _run("qgemm1", g1, target, x, al, ex.gate_up_proj, None)
    torch_act = _run("qgemm1", g1, target, x, al.trimmed(), ex.gate_up_proj, None, backend="torch")
    cal, nb = _cpu_aligned(al), al.used_blocks()
    want_act = ref.qgemm1(g1, x.float().cpu(), cal, ex.gate_up_proj.cpu(), None)
    kernel_err, torch_err = rel_err(act[:nb].cpu(), want_act[:nb]), rel_err(torch_act.cpu(), want_act[:nb])
    assert kernel_err <= 2 * max(torch_err, BF16_FLOOR), (kernel_err, torch_err)
    assert (act[nb:] == 0).all()
    want = ref.qgemm2(g2, act.float().cpu(), cal, ex.down_proj.cpu(), None, t)
    torch_err = rel_err(
        _run("qgemm2", g2, target, act[:nb], al.trimmed(), ex.down_proj, None, backend="torch").cpu(), want
    )
    for combine in ("slots", "atomic"):
        point = {**spaces.default_point(g2, target), "combine": combine}
        kernel_err = rel_err(_run("qgemm2", g2, target, act, al, ex.down_proj, None, point=point).cpu(), want)
        assert kernel_err <= 2 * max(torch_err, BF16_FLOOR), (combine, kernel_err, torch_err)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_tuned_moe_on_triton_bf16(fmt):
    cfg = QCFG.quantized(fmt, 128, "cuda")
    layer = _layer(cfg)
    exact = MoE(cfg.replace(dtype="float32", quant="none")).eval()  # fp32 on the values the codes stand for
    state = {k: v.float().cpu() for k, v in layer.state_dict().items()}
    state.update({f"experts.{n}": getattr(layer.experts, n).dequantized().cpu() for n in ("gate_up_proj", "down_proj")})
    exact.load_state_dict(state)
    tuned = TunedMoE.from_module(layer, target="cuda", backends=("triton",))
    assert {d["backend"] for d in tuned.describe(7)} == {"triton"} and tuned.describe(7)[2]["problem"].startswith("q")
    for t in TOKENS:
        x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = exact(x.float().cpu())
            torch_err = rel_err(layer(x).float().cpu(), want)
        got = tuned(x)
        assert got.shape == x.shape and got.dtype == torch.bfloat16 and got.is_cuda
        assert rel_err(got.float().cpu(), want) <= 2 * torch_err + 1e-3, t


# ---- the TVM CUDA backend (kernels/tvm_cuda/): cubins built here with nvcc, launched through CuPy ----------------
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tvm_cuda_gemms_bf16_within_twice_torch(name, t, target):
    """Both TVM CUDA GEMMs on the Triton align's output (empty trailing blocks included) against the reference."""
    pytest.importorskip("cupy")
    _, layer, program, x, al = _gemm_case(name, t)
    ex = layer.experts
    g1, g2 = program.op("experts.gemm1"), program.op("experts.gemm2")
    act = _run("gemm1", g1, target, x, al, ex.gate_up_proj, ex.gate_up_bias, backend="tvm_cuda")
    torch_act = _run("gemm1", g1, target, x, al.trimmed(), ex.gate_up_proj, ex.gate_up_bias, backend="torch")
    cal = _cpu_aligned(al)
    b1 = None if ex.gate_up_bias is None else ex.gate_up_bias.float().cpu()
    want_act = ref.gemm1(g1, x.float().cpu(), cal, ex.gate_up_proj.float().cpu(), b1)
    nb = al.used_blocks()
    kernel_err, torch_err = rel_err(act[:nb].cpu(), want_act[:nb]), rel_err(torch_act.cpu(), want_act[:nb])
    assert kernel_err <= 2 * max(torch_err, BF16_FLOOR), (kernel_err, torch_err)
    assert (act[nb:] == 0).all()  # empty blocks: zeros
    out = _run("gemm2", g2, target, act, al, ex.down_proj, ex.down_bias, backend="tvm_cuda")
    torch_out = _run("gemm2", g2, target, act[:nb], al.trimmed(), ex.down_proj, ex.down_bias, backend="torch")
    b2 = None if ex.down_bias is None else ex.down_bias.float().cpu()
    want = ref.gemm2(g2, act.float().cpu(), cal, ex.down_proj.float().cpu(), b2, t)
    kernel_err, torch_err = rel_err(out.cpu(), want), rel_err(torch_out.cpu(), want)
    assert kernel_err <= 2 * max(torch_err, BF16_FLOOR), (kernel_err, torch_err)
    again = _run("gemm2", g2, target, act, al, ex.down_proj, ex.down_bias, backend="tvm_cuda")
    assert torch.equal(out, again)  # fixed-order combine: deterministic


@pytest.mark.parametrize("name", ["qwen3-like", "distilled-non-gated", "gpt-oss-like"])
def test_tuned_moe_on_tvm_cuda_bf16(name):
    pytest.importorskip("cupy")
    cfg = CONFIGS[name]
    layer = _layer(cfg)
    exact = MoE(cfg.replace(dtype="float32")).eval()
    exact.load_state_dict({k: v.float().cpu() for k, v in layer.state_dict().items()})
    tuned = TunedMoE.from_module(layer, target="cuda", backends=("tvm_cuda", "torch"))
    for t in TOKENS:
        x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = exact(x.float().cpu())
            torch_err = rel_err(layer(x).float().cpu(), want)
        got = tuned(x)
        assert got.shape == x.shape and got.dtype == torch.bfloat16 and got.is_cuda
        assert rel_err(got.float().cpu(), want) <= 2 * torch_err + 1e-3


# ---- device-side timing, the GPU's roofline and the GPU bench --------------------------------------------------
def test_short_calls_are_graph_replays_and_syncing_calls_keep_their_events():
    from moetune.autotune.measure import GRAPH_BELOW_MS, measure

    xs = [torch.randn(64, 64, device="cuda") for _ in range(3)]
    fast = measure(lambda x: x * 2, xs, repeat=5, device="cuda")
    assert fast.clock == "graph" and 0 < fast.p50_ms < GRAPH_BELOW_MS
    synced = measure(lambda x: (x * 2).sum().item(), xs, repeat=5, device="cuda")  # cannot be captured
    assert synced.clock == "events" and synced.p50_ms > 0
    big = [torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    slow = measure(lambda x: x @ x, big, repeat=3, device="cuda")  # 1.1 TFLOP: over a millisecond anywhere
    assert slow.clock == "events" and slow.p50_ms > GRAPH_BELOW_MS


def test_gpu_roofline_and_bench_rows():
    import math

    from moetune.autotune.bench.layer import bench_layer, speedup_over
    from moetune.autotune.bench.roofline import measure_machine
    from moetune.autotune.measure import machine_name

    machine = measure_machine(("bfloat16",), n=4096, nbytes=256 << 20, device="cuda")
    assert machine.roof_stream == "copy" and machine.peak_gflops["bfloat16"] > machine.peak_gflops["float32"]
    cfg = CONFIGS["qwen3-like"]
    providers = ("reference", "hf-grouped_mm", "torch", "triton", "tuned")
    result = bench_layer(cfg, [1, 64], providers, machine=machine, target="cuda", repeat=3, db=False)
    assert {(r.tokens, r.provider) for r in result.rows} == {(t, p) for t in (1, 64) for p in providers}, result.skipped
    assert {r.machine for r in result.rows} == {machine_name("cuda")}
    assert all(r.pct_roofline > 0 and r.read_gbs == machine.copy_gbs for r in result.rows)
    assert math.isfinite(speedup_over(result.rows, "triton", "hf-grouped_mm")["geomean"])
