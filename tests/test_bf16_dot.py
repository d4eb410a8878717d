"""bf16 expert GEMMs on AVX-512 BF16 (`vdpbf16ps`, ir/tvm_bf16.py): chosen by the target, k-paired weights.

Legend: T tokens, H hidden, I intermediate, E experts. The kernels run only where the host has AVX-512 BF16;
elsewhere these tests compile them (not run) for a CPU that has it (LLVM builds them on any host), check the
choice and the layout, and the layer tests run the TE kernels instead.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import rel_err

from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.packed import PackedWeight, pack, unpack
from moetune.kernels.registry import KernelConfig, backend_info, default_config, get_impl
from moetune.kernels.tvm_cpu.build import compile_op
from moetune.kernels.tvm_cpu.launchers import weight_layout
from moetune.model import MoE, MoEConfig, TunedMoE
from moetune.schedules import tvm_cpu

HOST = resolve_target("cpu")
BF16_HOST = tvm_cpu.dot_kernel(lower(MoEConfig(64, 64, 4, 2, dtype="bfloat16"), 4).op("experts.gemm1"), HOST)
needs_bf16 = pytest.mark.skipif(BF16_HOST != "bf16", reason="the host has no AVX-512 BF16 (compiled below instead)")
TOL = 2.0**-7


def _cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_experts=6, top_k=2, dtype="bfloat16")
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("interleave", [None, 40])
def test_the_k_paired_layout_holds_the_same_weight(interleave):
    w = torch.randn(3, 80, 64).bfloat16()
    p = PackedWeight.of(w, 16, interleave, kpack=2)
    assert p.layout() == (16, interleave, 2) and p.packed.shape[2:] == (32, 32 if interleave else 16, 2)
    assert torch.equal(p.unpack(), w) and torch.equal(unpack(pack(w, 16, interleave, 2), 80, 16, interleave, 2), w)
    # one 32-bit word = one column's (k, k+1): column 0 of panel 0 at k = 2, 3
    assert torch.equal(p.packed[0, 0, 1, 0], w[0, 0, 2:4])
    with pytest.raises(ValueError, match="kpack"):
        pack(torch.randn(1, 16, 7), 16, None, 2)
    p.mul_(2.0)  # an in-place op is stored back in the same layout
    assert torch.equal(p.unpack(), w * 2) and p.layout() == (16, interleave, 2)


def _check_ops(cfg: MoEConfig, t: int = 19, point: dict | None = None) -> None:
    program = lower(cfg, t)
    layer = MoE(cfg)
    x = torch.randn(t, cfg.hidden_size).to(cfg.torch_dtype)
    al = ref.align(*layer.route(x), cfg.num_experts, program.block_m)
    ex = layer.experts
    g1, g2 = program.op("experts.gemm1"), program.op("experts.gemm2")
    c1 = KernelConfig.of("tvm", point) if point else default_config(g1, "tvm", HOST)
    c2 = KernelConfig.of("tvm", point) if point else default_config(g2, "tvm", HOST)
    act = get_impl("gemm1", "tvm").fn(g1, c1, HOST, x, al, ex.gate_up_proj, ex.gate_up_bias)
    want_act = ref.gemm1(g1, x, al, ex.gate_up_proj, ex.gate_up_bias)
    assert act.dtype == torch.bfloat16 and rel_err(act.float(), want_act.float()) <= TOL
    out = get_impl("gemm2", "tvm").fn(g2, c2, HOST, act, al, ex.down_proj, ex.down_bias)
    want = ref.gemm2(g2, act, al, ex.down_proj, ex.down_bias, t)
    assert rel_err(out.float(), want.float()) <= TOL


@needs_bf16
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(gated=False, activation="gelu", expert_bias=True), dict(hidden_size=96, intermediate_size=80)],
    ids=["gated", "non-gated-bias", "partial-panels"],
)
def test_bf16_dot_gemms_match_the_reference(kw):
    cfg = _cfg(**kw)
    assert "kt" not in backend_info("tvm").space(lower(cfg, 4).op("experts.gemm1"), HOST).names
    _check_ops(cfg)
    _check_ops(cfg, 1)


@needs_bf16
def test_every_bf16_tile_shape_order_and_prefetch_is_right():
    cfg = _cfg(hidden_size=128, intermediate_size=64, num_experts=4)
    program = lower(cfg, 64)
    space = backend_info("tvm").space(program.op("experts.gemm1"), HOST)
    ran = 0
    for nt in (16, 32, 64):
        for mt, order, pf in (
            (1, "panels_outer", 8),
            (2, "blocks_outer", 0),
            (4, "panels_outer", 16),
            (8, "blocks_outer", 4),
        ):
            point = {"nt": nt, "mt": mt, "order": order, "pf": pf}  # pf: prefetches past the last panel's end too
            if space.is_feasible(point) and program.block_m % mt == 0:
                _check_ops(cfg, 64, point)
                ran += 1
    assert ran >= 6


def test_without_avx512_bf16_the_te_kernels_run(monkeypatch):
    monkeypatch.setattr(tvm_cpu, "dot_kernel", lambda problem, target: None)
    cfg = _cfg()
    assert "kt" in backend_info("tvm").space(lower(cfg, 4).op("experts.gemm1"), HOST).names
    _check_ops(cfg)


@pytest.mark.parametrize(
    "spec,has", [("llvm -mcpu=sapphirerapids", True), ("llvm -mcpu=znver4", True), ("llvm -mcpu=icelake-server", False)]
)
def test_the_bf16_kernels_are_chosen_by_the_target_and_compile_for_it(spec, has):
    target = resolve_target(spec)
    for op in ("experts.gemm1", "experts.gemm2"):
        problem = lower(_cfg(expert_bias=True), 16).op(op)
        assert (tvm_cpu.dot_kernel(problem, target) == "bf16") is has
        assert weight_layout(problem, target, 16, None)[2:] == ((2,) if has else ())
        point = default_config(problem, "tvm", target).as_dict()
        space = backend_info("tvm").space(problem, target)
        assert space.is_feasible(point) and ("kt" not in point) is has
        if has:
            too_big = {**point, "mt": 8, "nt": 64}  # 8 x 4 (x2 gated) accumulators: more than 28 registers
            assert any(v.startswith("registers") for v in space.violations(too_big))
            asm = compile_op(problem, point, target).mod.inspect_source("asm")
            assert "vdpbf16ps" in asm  # the LLVM-IR helper was linked and inlined: no call left
            assert "moetune_dpbf16ps" not in asm
    # only dense bf16 GEMMs with an even reduction and outputs of at least one 16-column panel
    for kw in (dict(dtype="float32"), dict(quant="int8"), dict(hidden_size=63), dict(intermediate_size=8)):
        problem = lower(_cfg(**kw), 16).op("experts.gemm1")
        assert tvm_cpu.dot_kernel(problem, target) is None and weight_layout(problem, target, 16, None)[2:] == ()
        point = default_config(problem, "tvm", target).as_dict()
        assert "kt" in point and backend_info("tvm").space(problem, target).is_feasible(point)
    assert tvm_cpu.dot_kernel(lower(_cfg(hidden_size=63), 16).op("experts.gemm2"), target) == ("bf16" if has else None)


def test_tuned_bf16_layer_packs_its_weights_once_in_the_kernels_layout():
    cfg = _cfg(num_shared_experts=1, shared_intermediate_size=32)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 7, cfg.hidden_size).bfloat16()
    want = moe(x).clone()  # moe shares the parameters: computed before they are packed
    tuned = TunedMoE.from_module(moe, db=False)
    tuned.pack_weights()
    weight = tuned.experts.gate_up_proj
    assert isinstance(weight, PackedWeight) and weight.kpack == (2 if BF16_HOST == "bf16" else 1)
    out = tuned(x)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), want.float()) <= TOL
    fresh = TunedMoE(tuned.cfg, db=False)
    fresh.load_state_dict(tuned.state_dict())
    assert rel_err(fresh(x).float(), out.float()) <= 1e-6
    # load_state_dict into the packed layer stores the new values in its own layout, in place
    other = MoE(cfg).eval()
    tuned.load_state_dict({k: v for k, v in other.state_dict().items()}, strict=False)
    assert tuned.experts.gate_up_proj is weight and weight.layout()[2:] == ((2,) if BF16_HOST == "bf16" else ())
    assert rel_err(tuned(x).float(), other(x).float()) <= TOL


def test_the_te_kernels_read_a_k_paired_weight_too(monkeypatch):
    """A weight packed in place for the bf16 kernels (kpack 2) and a launch that runs the TE kernels (another
    target, or a tuned point of the other space): the launcher repacks from its values, the answer is the same."""
    cfg = _cfg()
    program = lower(cfg, 5)
    layer = MoE(cfg)
    x = torch.randn(5, cfg.hidden_size).bfloat16()
    al = ref.align(*layer.route(x), cfg.num_experts, program.block_m)
    g1 = program.op("experts.gemm1")
    paired = PackedWeight.of(layer.experts.gate_up_proj, 16, cfg.intermediate_size, kpack=2)
    monkeypatch.setattr(tvm_cpu, "dot_kernel", lambda problem, target: None)
    c1 = default_config(g1, "tvm", HOST)
    act = get_impl("gemm1", "tvm").fn(g1, c1, HOST, x, al, paired, None)
    want = ref.gemm1(g1, x, al, layer.experts.gate_up_proj, None)
    assert rel_err(act.float(), want.float()) <= TOL


@pytest.mark.parametrize(
    "spec,decode_pf", [("llvm -mcpu=sapphirerapids", 8), ("llvm -mcpu=cascadelake", 8), ("llvm -mcpu=znver4", 0)]
)
def test_decode_points_prefetch_the_weight_stream_and_prefill_points_do_not(spec, decode_pf):
    """pf (KiB ahead along the panel) defaults to 8 where BM <= 2 (each weight read once, from memory) on Intel
    cores and to 0 on AMD Zen cores (one stream per thread reads at the limit there: measured), and to 0 for
    prefill everywhere; the kernels carry a `prefetcht0` per line exactly when pf > 0. Decode streams whole
    experts per thread (blocks outer), prefill keeps a panel in cache across an expert's blocks. Compiled."""
    target = resolve_target(spec)
    cfg = _cfg() if not spec.endswith("cascadelake") else _cfg(quant="w4a8", dtype="float32")  # bf16 / VNNI kernels
    for tokens, want in ((1, decode_pf), (256, 0)):
        problem = lower(cfg, tokens).op("experts.gemm2")
        point = default_config(problem, "tvm", target).as_dict()
        assert point["pf"] == want, (tokens, problem["BM"])
        assert point["order"] == ("blocks_outer" if tokens == 1 else "panels_outer")  # decode: whole experts
        for pf in (0, 8):  # (prefill's tile is too big to prefetch for: prefetch_with_stack_accumulators)
            if tokens > 1 and not backend_info("tvm").space(problem, target).is_feasible({**point, "pf": pf}):
                continue
            asm = compile_op(problem, {**point, "pf": pf}, target).mod.inspect_source("asm")
            assert ("prefetcht0" in asm) is (pf > 0)


def _dot_loop(asm: str) -> list[str]:
    """The instructions of the innermost loop that holds the first dot-product instruction: from its label to
    the first jump after that instruction (the back edge)."""
    lines = asm.splitlines()
    first = next(i for i, line in enumerate(lines) if re.search(r"\b(vdpbf16ps|vpdpbusd)\b", line))
    start = max(i for i in range(first) if lines[i].startswith(".LBB"))
    end = next(i for i in range(first, len(lines)) if re.match(r"\s+j\w+\s", lines[i]))
    return [line for line in lines[start:end] if not line.strip().startswith("#")]


@pytest.mark.parametrize("fmt", ["bf16", "w8a8", "w4a8"])
def test_the_dot_loops_keep_their_accumulators_in_registers(fmt):
    """The reduction loop of each dot kernel loads weights and inputs and stores nothing: accumulators that TVM
    placed in a per-task workspace were stored back after every instruction (and a prefetch, which LLVM treats
    as touching memory, kept them there), which cost the decode kernels up to 1.25x. Register spills (stack
    stores) are the register constraint's business, not this test's. Compiled, not run."""
    target = resolve_target("llvm -mcpu=sapphirerapids")
    kw = dict(hidden_size=1024, intermediate_size=256, num_experts=4)  # 32 groups of 32: a real group loop
    cfg = _cfg(**kw) if fmt == "bf16" else _cfg(quant=fmt, dtype="float32", **kw)
    space = backend_info("tvm").space(lower(cfg, 64).op("experts.gemm1"), target)
    big = {"nt": 32, "mt": 4, "order": "panels_outer", "pf": 8}  # gated: 2 x 4 x 32 fp32 = 1 KiB
    assert fmt != "bf16" or any(v.startswith("prefetch_with_stack") for v in space.violations(big))
    for tokens in (1, 64):
        problem = lower(cfg, tokens).op("experts.gemm1")
        point = default_config(problem, "tvm", target).as_dict()
        for pf in (0, 8):
            if not backend_info("tvm").space(problem, target).is_feasible({**point, "pf": pf}):
                continue
            loop = _dot_loop(compile_op(problem, {**point, "pf": pf}, target).mod.inspect_source("asm"))
            stores = [line for line in loop if re.match(r"\s+vmov\w*\s+%[xyz]mm\d+, .*\(%r(?!sp)", line)]
            dots = sum("vdpbf16ps" in line or "vpdpbusd" in line for line in loop)
            assert dots >= 2 and not stores, (tokens, pf, stores)
