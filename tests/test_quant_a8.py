"""w8a8 / w4a8 experts: the int8 / int4 codes with the GEMM inputs quantized to int8 per row and group.

Legend: T tokens, H hidden, I intermediate, E experts, G weights (and inputs) per scale.
The reference multiplies the fp32 values of both codes (kernels/quant.py: fake_quant_rows, dequantize), so a
kernel is checked on the same codes at the dense tolerances (tests/test_quant.py). The integer dot-product
kernels (ir/tvm_vnni.py) run only where the host has AVX-512 VNNI; elsewhere the same tests run the fallback
(the weight-only kernels on the quantized input's values), and the VNNI kernels are compiled, not run, for a
VNNI CPU (LLVM builds them on any host).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.quant import QuantizedWeight, fake_quant_rows, quantize_rows
from moetune.kernels.registry import KernelConfig, backend_info, default_config, get_impl
from moetune.kernels.tvm_cpu.build import compile_op
from moetune.model import MoE, MoEConfig, TunedMoE
from moetune.schedules import tvm_cpu

FORMATS = ("w8a8", "w4a8")
HOST = resolve_target("cpu")
HOST_VNNI = tvm_cpu.dot_kernel(lower(MoEConfig(64, 64, 4, 2, quant="w8a8"), 4).op("experts.gemm1"), HOST) == "vnni"


def _cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_experts=6, top_k=2)
    return MoEConfig(**{**base, **kw})


def _tol(dtype: str) -> float:
    return 1e-5 if dtype == "float32" else 2.0**-7


# ---- the format ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,codes", [("w8a8", "int8"), ("w4a8", "int4")])
def test_a8_formats_keep_the_weight_codes_and_lower_with_aq(fmt, codes):
    cfg = _cfg(quant=fmt)
    assert (cfg.weight_quant, cfg.act_quant, cfg.quant_bits) == (codes, True, 8 if codes == "int8" else 4)
    g1 = lower(cfg, 4).op("experts.gemm1")
    assert (g1.op, g1["wq"], g1["aq"], g1.act_quant) == ("qgemm1", codes, 8, True)
    weight_only = lower(_cfg(quant=codes), 4).op("experts.gemm1")
    assert weight_only["aq"] == 0 and not weight_only.act_quant and weight_only.signature != g1.signature
    assert MoE(cfg).experts.down_proj.fmt == codes


def test_rows_quantize_to_int8_per_group_within_half_a_step():
    x = torch.randn(5, 128) * torch.logspace(-3, 2, 128)
    x[2, 32:64] = 0.0  # an all-zero group: codes 0, scale 0
    codes, scales = quantize_rows(x, 32)
    assert codes.dtype == torch.int8 and codes.shape == (5, 128) and scales.shape == (5, 4)
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    assert torch.equal(codes[2, 32:64], torch.zeros(32, dtype=torch.int8)) and scales[2, 1] == 0
    step = scales.repeat_interleave(32, dim=1)
    assert bool(((fake_quant_rows(x, 32) - x).abs() <= step / 2 + 1e-6 * x.abs()).all())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("interleave", [None, 40])
def test_the_vnni_layout_holds_the_same_codes(fmt, interleave):
    w = torch.randn(3, 80, 64)
    q = QuantizedWeight.of(w, fmt, 32)
    v = q.in_layout(16, interleave, 4)
    per_word = 4 if fmt == "int8" else 8
    assert v.layout() == (16, interleave, 4) and v.codes.shape[2:] == (64 // per_word, 32 if interleave else 16, 4)
    assert torch.equal(v.dequantized(), q.dequantized())
    assert torch.equal(v.in_layout(None).codes, q.codes) and torch.equal(
        v.in_layout(16, interleave).dequantized(), q.dequantized()
    )
    with pytest.raises(ValueError, match="kpack"):
        q.in_layout(None, None, 4)


# ---- the ops -------------------------------------------------------------------------------------------------
def _case(cfg: MoEConfig, t: int):
    program = lower(cfg, t)
    layer = MoE(cfg)
    x = torch.randn(t, cfg.hidden_size).to(cfg.torch_dtype)
    weights, ids = layer.route(x)
    return program, layer, x, ref.align(weights, ids, cfg.num_experts, program.block_m)


def _check_ops(cfg: MoEConfig, backend: str, t: int = 19, point: dict | None = None, target=HOST) -> None:
    program, layer, x, al = _case(cfg, t)
    ex = layer.experts
    g1, g2 = program.op("experts.gemm1"), program.op("experts.gemm2")
    c1 = KernelConfig.of(backend, point) if point else default_config(g1, backend, target)
    c2 = KernelConfig.of(backend, point) if point else default_config(g2, backend, target)
    act = get_impl("qgemm1", backend).fn(g1, c1, target, x, al, ex.gate_up_proj, ex.gate_up_bias)
    bias1 = None if ex.gate_up_bias is None else ex.gate_up_bias.float()
    want_act = ref.qgemm1(g1, x, al, ex.gate_up_proj, bias1)
    assert rel_err(act.float(), want_act.float()) <= _tol(cfg.dtype)
    out = get_impl("qgemm2", backend).fn(g2, c2, target, act, al, ex.down_proj, ex.down_bias)
    bias2 = None if ex.down_bias is None else ex.down_bias.float()
    want = ref.qgemm2(g2, act, al, ex.down_proj, bias2, x.shape[0])
    assert rel_err(out.float(), want.float()) <= _tol(cfg.dtype)


CASES = [dict(), dict(dtype="bfloat16"), dict(gated=False, activation="gelu", expert_bias=True)]


@pytest.mark.parametrize("backend", ["torch", "tvm"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", CASES, ids=["fp32", "bf16", "non-gated-bias"])
def test_a8_qgemms_match_the_reference(backend, fmt, kw):
    _check_ops(_cfg(quant=fmt, **kw), backend)


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_vnni_the_weight_only_kernels_run_on_the_quantized_inputs(fmt, monkeypatch):
    monkeypatch.setattr(tvm_cpu, "dot_kernel", lambda problem, target: None)
    g1 = lower(_cfg(quant=fmt), 4).op("experts.gemm1")
    assert "kt" in backend_info("tvm").space(g1, HOST).names
    _check_ops(_cfg(quant=fmt), "tvm")


@pytest.mark.skipif(not HOST_VNNI, reason="the host has no AVX-512 VNNI (the kernels are compiled below)")
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_vnni_tile_shape_order_and_prefetch_is_right(fmt):
    cfg = _cfg(quant=fmt, hidden_size=128, intermediate_size=64, num_experts=4)
    program = lower(cfg, 64)
    space = backend_info("tvm").space(program.op("experts.gemm1"), HOST)
    ran = 0
    for nt in (16, 32, 64):
        for mt, order, pf in ((1, "panels_outer", 8), (2, "blocks_outer", 0), (4, "panels_outer", 16)):
            point = {"nt": nt, "mt": mt, "order": order, "pf": pf}  # pf: prefetches past the last panel's end too
            if space.is_feasible(point) and program.block_m % mt == 0:
                _check_ops(cfg, "tvm", 64, point)
                ran += 1
    assert ran >= 5


@pytest.mark.skipif(not HOST_VNNI, reason="the host has no AVX-512 VNNI (the kernels are compiled below)")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(hidden_size=96, intermediate_size=96),
        dict(quant_group=64, gated=False, activation="gelu", expert_bias=True),
    ],
    ids=["partial-panels", "group-64"],
)
def test_vnni_kernels_on_partial_panels_and_wider_groups(fmt, kw):
    """A last panel only partly filled (96 columns in panels of 64) and a group of 64 (two scales per panel row
    of 128): both read the right words and scales."""
    cfg = _cfg(quant=fmt, **{"hidden_size": 128, "intermediate_size": 128, **kw})
    _check_ops(cfg, "tvm", 13, {"nt": 64, "mt": 1, "order": "panels_outer", "pf": 4})
    _check_ops(cfg, "tvm", 13)


@pytest.mark.parametrize("spec,has", [("llvm -mcpu=cascadelake", True), ("llvm -mcpu=znver3", False)])
def test_the_vnni_kernels_are_chosen_by_the_target_and_compile_for_it(spec, has):
    target = resolve_target(spec)
    for op in ("experts.gemm1", "experts.gemm2"):
        for fmt in FORMATS:
            problem = lower(_cfg(quant=fmt, expert_bias=True), 16).op(op)
            assert (tvm_cpu.dot_kernel(problem, target) == "vnni") is has
            space = backend_info("tvm").space(problem, target)
            point = default_config(problem, "tvm", target).as_dict()
            assert space.is_feasible(point) and ("kt" not in point) is has
            if has:
                too_big = {**point, "mt": 4, "nt": 64}  # 2 x 4 x 4 (x2 gated) vectors: more than 28 registers
                assert any(v.startswith("registers") for v in space.violations(too_big))
                compile_op(problem, point, target)  # builds anywhere: LLVM knows the CPU
    weight_only = lower(_cfg(quant="int4"), 16).op("experts.gemm1")
    assert tvm_cpu.dot_kernel(weight_only, target) is None


AVX_VNNI = resolve_target("llvm -mcpu=alderlake")  # AVX2 + AVX-VNNI, no AVX-512


def test_avx_vnni_cpus_run_the_same_kernels_on_ymm_vectors():
    """An AVX2 CPU with AVX-VNNI (Alder Lake and later clients): the VNNI kernels on 8 lanes, 16 registers."""
    assert tvm_cpu.simd(AVX_VNNI) == (8, 16)
    for fmt in FORMATS:
        for op in ("experts.gemm1", "experts.gemm2"):
            problem = lower(_cfg(quant=fmt, expert_bias=True), 16).op(op)
            assert tvm_cpu.dot_kernel(problem, AVX_VNNI) == "vnni"
            space = backend_info("tvm").space(problem, AVX_VNNI)
            assert space.params[0].choices == (8, 16, 32)
            point = default_config(problem, "tvm", AVX_VNNI).as_dict()
            assert space.is_feasible(point) and not space.is_feasible({**point, "mt": 2, "nt": 32})
            asm = compile_op(problem, point, AVX_VNNI).mod.inspect_source("asm")
            vdp = [line for line in asm.splitlines() if "vpdpbusd" in line]
            assert vdp and all("ymm" in line for line in vdp) and "zmm" not in asm


@pytest.mark.skipif("avxvnni" not in tvm_cpu._features(HOST), reason="the host has no AVX-VNNI (compiled above)")
@pytest.mark.parametrize("fmt", FORMATS)
def test_avx_vnni_kernels_match_the_reference(fmt):
    cfg = _cfg(quant=fmt, hidden_size=128, intermediate_size=96)
    _check_ops(cfg, "tvm", 19, target=AVX_VNNI)
    _check_ops(cfg, "tvm", 64, {"nt": 8, "mt": 1, "order": "blocks_outer", "pf": 8}, target=AVX_VNNI)


# ---- the layer -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_tuned_layer_runs_a8_experts_against_the_reference_layer(fmt):
    cfg = _cfg(num_shared_experts=1, shared_intermediate_size=32)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 7, cfg.hidden_size)
    dense_out = moe(x)
    tuned = TunedMoE.from_module(moe, quant=fmt, db=False)
    assert moe.experts.gate_up_proj.fmt == {"w8a8": "int8", "w4a8": "int4"}[fmt]
    if HOST_VNNI:  # quantized in place in the integer kernels' layout
        assert moe.experts.gate_up_proj.kpack == 4
    out, want = tuned(x), tuned.as_moe()(x)  # the reference layer of its config: both codes' values
    assert rel_err(out, want) <= 1e-5
    assert rel_err(out, dense_out) < {"w8a8": 0.03, "w4a8": 0.3}[fmt]
    fresh = TunedMoE(tuned.cfg, db=False)
    fresh.load_state_dict(tuned.state_dict())
    assert rel_err(fresh(x), out) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_quantize_rows_exactly_as_the_reference(dtype):
    """ir/tvm_vnni.py's "quant" (plain scalar TIR: it runs on any host) gives quantize_rows' codes, scales and
    code sums bit for bit, ties (x / s = k + 0.5) rounded half to even like torch.round."""
    import tvm

    from moetune.ir.tvm_vnni import quant_func

    problem = lower(_cfg(quant="w4a8", dtype=str(dtype).split(".")[1]), 4).op("experts.gemm1")
    lib = tvm.compile(tvm.IRModule({"quant": quant_func(problem)}), target=tvm.target.Target(HOST.tvm))
    x = torch.randn(5, 64)
    x[0, :32] = torch.arange(32) - 15.5  # scale 15.5 / 127: no ties; row 1: scale exactly 1.0, ties at k + 0.5
    x[1, :32] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5] + [0.25] * 25)
    x[2, 32:] = 0.0
    x = x.to(dtype)
    codes, scales, sums = torch.empty(5, 64, dtype=torch.int8), torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int32)
    lib["quant"](x, codes, scales, sums)
    want_codes, want_scales = quantize_rows(x, 32)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    assert torch.equal(sums, want_codes.view(5, 2, 32).sum(-1, dtype=torch.int32))
    assert codes[1, :7].tolist() == [127, 2, 4, -2, 0, 0, 2]


# ---- through the pipeline: tune -> DB -> TunedMoE, patch -> package -> load -----------------------------------
def test_tune_stores_a8_winners_that_the_layer_reads(tmp_path):
    from moetune.autotune import tune

    cfg = MoEConfig(hidden_size=64, intermediate_size=64, num_experts=8, top_k=2, quant="w4a8", name="tiny")
    db = str(tmp_path / "k.db")
    report = tune(cfg, m=[8], trials=3, db=db, storage=str(tmp_path / "s.journal"), repeat=3)
    gemms = {o.name: o for o in report.outcomes if o.name.startswith("experts.")}
    assert {o.status for o in gemms.values()} == {"tuned"}
    assert all(o.problem.startswith("qgemm") and "aq=8" in o.problem for o in gemms.values())
    tuned = TunedMoE(cfg, db=db)
    # the winners, their panel width pinned to the layout the weights were packed in once ("+layout")
    assert all(d["source"].startswith("db:exact") for d in tuned.describe(8))
    x = torch.randn(8, 64)
    assert rel_err(tuned(x), tuned.as_moe()(x)) <= 1e-5


def test_patch_w4a8_then_package_then_load_keeps_the_codes_and_the_outputs(tmp_path):
    from test_quant import _qwen3

    from moetune.kernels.db import MemoryKernelDB
    from moetune.model import load, package, patch

    model = _qwen3()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
    patch(model, quant="w4a8", db=False)
    experts = [p for n, p in model.named_parameters() if "experts" in n]
    assert all(isinstance(p, QuantizedWeight) and p.fmt == "int4" for p in experts)
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, dense) < 0.3  # int4 weights and int8 inputs against the dense model: reported, loosely
    loaded = load(package(model, tmp_path / "lm", db=MemoryKernelDB()))
    assert {b.cfg.quant for b in loaded.modules() if isinstance(b, TunedMoE)} == {"w4a8"}
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, got) <= 1e-5
