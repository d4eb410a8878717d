"""Quantized experts (int8 / int4 weight-only, group scales): the format, QuantizedWeight, the qgemm ops on every
CPU backend against the reference, and the layer and model paths (TunedMoE.from_module, patch).

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, G weights per scale.
Tolerances: the kernels against the reference on the *same* codes (the reference dequantizes them to fp32):
fp32 1e-5 as for the dense GEMMs; bf16 2^-7 (the activations are bf16; tests/test_ops.py's analysis gives the
dense kernels 2x torch-bf16's error, which is below that here). The error against the unquantized layer is a
property of the format, checked loosely (int8 well under 2%, int4 under 20% on Gaussian weights).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from moetune.ir.program import Problem, lower
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.quant import QuantizedWeight, decode, dequantize, quantization_error, quantize
from moetune.kernels.registry import backend_info, default_config, get_impl
from moetune.model import MoE, MoEConfig, TunedMoE

FORMATS = ("int8", "int4")


def _cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_experts=6, top_k=2)
    return MoEConfig(**{**base, **kw})


# ---- the format ----------------------------------------------------------------------------------------------
def test_int4_codes_are_two_offset_binary_nibbles_per_byte():
    w = torch.tensor([[[-7.0, 7.0, 0.0, 1.0] * 8]])  # one group of 32, max |w| = 7: scale 1
    codes, scales = quantize(w, "int4", 32)
    assert codes.dtype == torch.uint8 and codes.shape == (1, 1, 16) and scales.tolist() == [[[1.0]]]
    assert codes[0, 0, 0].item() == (-7 + 8) | ((7 + 8) << 4)
    assert codes[0, 0, 1].item() == (0 + 8) | ((1 + 8) << 4)
    assert torch.equal(decode(codes, "int4").float(), w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_round_trip_keeps_codes_and_error_is_small(fmt):
    w = torch.randn(3, 40, 128)
    codes, scales = quantize(w, fmt, 32)
    assert scales.shape == (3, 40, 4) and scales.dtype == torch.float16
    again = quantize(dequantize(codes, scales, fmt), fmt, 32)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scales)
    limit = {"int8": 0.02, "int4": 0.2}[fmt]
    assert 0 < quantization_error(w, fmt, 32) < limit
    assert quantization_error(w, fmt, 32) < quantization_error(w, fmt, 128)  # smaller groups, smaller error


def test_a_zero_group_quantizes_to_zero():
    w = torch.zeros(1, 2, 64)
    w[0, 1, 32:] = 1.0
    for fmt in FORMATS:
        got = dequantize(*quantize(w, fmt, 32), fmt)
        assert torch.equal(got[..., :32], w[..., :32]) and torch.allclose(got, w, rtol=1e-3)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(quant="fp8"), "quant must be one of none, int8, int4"),
        (dict(quant="int8", quant_group=48), "quant_group must be one of 32, 64, 128"),
        (dict(quant="int4", hidden_size=80), "must divide hidden_size (80)"),
        (dict(quant="int8", intermediate_size=48), "must divide intermediate_size (48)"),
    ],
)
def test_bad_formats_are_one_line_errors_naming_the_allowed_values(kw, message):
    with pytest.raises(ValueError, match=None) as info:
        _cfg(**kw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_quantized_layer_cannot_be_quantized_another_way():
    cfg = _cfg(quant="int8")
    assert cfg.quantized(None) is cfg and cfg.quantized("int8") is cfg
    with pytest.raises(ValueError, match="already int8"):
        cfg.quantized("int4")
    assert _cfg(hidden_size=128, intermediate_size=256).quantized("int4", target_kind="cuda").quant_group == 128
    assert _cfg().quantized("int4").quant_group == 32
    assert _cfg(hidden_size=128, intermediate_size=96).quantized("int4", target_kind="cuda").quant_group == 32


def test_quantized_problem_signature_round_trips_and_names_the_format():
    program = lower(_cfg(quant="int4", quant_group=64, intermediate_size=128), 16)
    g1, g2 = program.op("experts.gemm1"), program.op("experts.gemm2")
    assert (g1.op, g2.op) == ("qgemm1", "qgemm2") and g1.signature.endswith(",wq=int4,G=64,aq=0]:float32")
    assert Problem.from_signature(g2.signature) == g2
    dense = lower(_cfg(intermediate_size=128), 16).op("experts.gemm1")
    assert g1.dense().op == "gemm1" and g1.dense().signature == dense.signature
    assert lower(_cfg(), 16).op("experts.gemm1").quant == "none"


# ---- QuantizedWeight -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("panel, interleave", [(None, None), (16, None), (32, 20)])
def test_quantized_weight_is_its_dequantized_values_in_any_layout(fmt, panel, interleave):
    w = torch.randn(2, 40, 64)
    q = QuantizedWeight.of(w, fmt, 32, panel, interleave)
    want = dequantize(*quantize(w, fmt, 32), fmt)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.equal(q.unpack(), want) and torch.equal(q * 1, want) and torch.equal(q[1], want[1])
    assert torch.equal(q.in_layout(None).codes, quantize(w, fmt, 32)[0])
    assert torch.equal(q.in_layout(16).unpack(), want)
    p = torch.nn.Parameter(q, requires_grad=False)
    p.copy_(w * 2)  # load_state_dict: quantized again into the same buffers
    assert p.codes is q.codes and torch.equal(q.unpack(), dequantize(*quantize(w * 2, fmt, 32), fmt))


def test_quantized_weight_keeps_codes_smaller_than_the_weight():
    w = torch.randn(4, 64, 256)
    for fmt, ratio in (("int8", 4 * 32 / 34), ("int4", 4 * 32 / 18)):
        q = QuantizedWeight.of(w, fmt, 32)
        assert w.nbytes / q.nbytes_stored() == pytest.approx(ratio)


# ---- the qgemm ops on every CPU backend --------------------------------------------------------------------
def _case(cfg: MoEConfig, t: int):
    program = lower(cfg, t)
    layer = MoE(cfg)
    x = torch.randn(t, cfg.hidden_size).to(cfg.torch_dtype)
    weights, ids = layer.route(x)
    aligned = ref.align(weights, ids, cfg.num_experts, program.block_m)
    return program, layer, x, aligned


def _tol(dtype: str) -> float:
    return 1e-5 if dtype == "float32" else 2.0**-7


@pytest.mark.parametrize("backend", ["torch", "tvm"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(dtype="bfloat16"),
        dict(gated=False, activation="gelu"),
        dict(expert_bias=True, quant_group=64, intermediate_size=128),
    ],
    ids=["fp32", "bf16", "non-gated", "bias-g64"],
)
def test_qgemms_match_the_reference_on_the_same_codes(backend, fmt, kw):
    cfg = _cfg(quant=fmt, **kw)
    target = resolve_target("cpu")
    program, layer, x, al = _case(cfg, 19)
    ex = layer.experts
    g1, g2 = program.op("experts.gemm1"), program.op("experts.gemm2")
    act = get_impl("qgemm1", backend).fn(
        g1, default_config(g1, backend, target), target, x, al, ex.gate_up_proj, ex.gate_up_bias
    )
    want_act = ref.qgemm1(
        g1, x.float(), al, ex.gate_up_proj, None if ex.gate_up_bias is None else ex.gate_up_bias.float()
    )
    assert rel_err(act.float(), want_act) <= _tol(cfg.dtype)
    out = get_impl("qgemm2", backend).fn(
        g2, default_config(g2, backend, target), target, act, al, ex.down_proj, ex.down_bias
    )
    bias = None if ex.down_bias is None else ex.down_bias.float()
    want = ref.qgemm2(g2, act.float(), al, ex.down_proj, bias, x.shape[0])
    assert rel_err(out.float(), want) <= _tol(cfg.dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_tile_shape_reads_the_codes_right(fmt):
    """Points across the tvm space (panel widths, rows per tile, unrolls, both orders) on one problem."""
    cfg = _cfg(quant=fmt, hidden_size=128, intermediate_size=64, num_experts=4)
    target = resolve_target("cpu")
    program, layer, x, al = _case(cfg, 64)
    g1 = program.op("experts.gemm1")
    space = backend_info("tvm").space(g1, target)
    want = ref.qgemm1(g1, x, al, layer.experts.gate_up_proj, None)
    base = default_config(g1, "tvm", target).as_dict()
    points = [{**base, "kt": kt, "order": order} for kt in (2, 8) for order in ("panels_outer", "blocks_outer")]
    points += [{**base, "nt": nt, "mt": 1} for nt in (16, 32, 64)]
    ran = 0
    for point in points:
        if not space.is_feasible(point):
            continue
        got = get_impl("qgemm1", "tvm").fn(g1, type(default_config(g1, "tvm", target)).of("tvm", point), target,
                                          x, al, layer.experts.gate_up_proj, None)  # fmt: skip
        assert rel_err(got, want) <= 1e-5, point
        ran += 1
    assert ran >= 4


def test_a_weight_of_another_format_is_refused():
    cfg = _cfg(quant="int8")
    target = resolve_target("cpu")
    program, _, x, al = _case(cfg, 4)
    g1 = program.op("experts.gemm1")
    other = QuantizedWeight.of(torch.randn(6, 192, 64), "int4", 32)
    with pytest.raises(ValueError, match="int8"):
        get_impl("qgemm1", "tvm").fn(g1, default_config(g1, "tvm", target), target, x, al, other, None)
    with pytest.raises(ValueError, match="int8"):
        ref.qgemm1(g1, x, al, other, None)


# ---- the layer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tuned_layer_from_a_dense_module_quantizes_in_place(fmt, dtype):
    cfg = _cfg(dtype=dtype, num_shared_experts=1, shared_intermediate_size=32)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 7, cfg.hidden_size).to(cfg.torch_dtype)
    dense_out = moe(x)
    tuned = TunedMoE.from_module(moe, quant=fmt, db=False)
    assert tuned.cfg.quant == fmt and isinstance(moe.experts.gate_up_proj, QuantizedWeight)
    assert tuned.describe(14)[2]["problem"].startswith("qgemm1[")
    out, want = tuned(x), moe(x)  # moe now runs the reference on the dequantized codes
    assert rel_err(out.float(), want.float()) <= _tol(dtype)
    assert rel_err(out.float(), dense_out.float()) < {"int8": 0.03, "int4": 0.3}[fmt]
    state = tuned.state_dict()
    assert not isinstance(state["experts.gate_up_proj"], QuantizedWeight)  # checkpoints stay plain
    fresh = TunedMoE(tuned.cfg, db=False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), out)


def test_a_quantized_config_builds_quantized_layers():
    cfg = _cfg(quant="int4")
    moe, tuned = MoE(cfg), TunedMoE(cfg, db=False)
    assert isinstance(moe.experts.down_proj, QuantizedWeight) and moe.experts.down_proj.panel is None
    assert isinstance(tuned.experts.down_proj, QuantizedWeight) and tuned.experts.down_proj.panel is not None
    assert not isinstance(moe.state_dict()["experts.down_proj"], QuantizedWeight)
    tuned.load_state_dict(moe.state_dict())
    x = torch.randn(9, cfg.hidden_size)
    assert rel_err(tuned(x), moe(x)) <= 1e-5


# ---- a whole Hugging Face model: patch, package, load ---------------------------------------------------------
def _qwen3(tmp_seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=128, num_hidden_layers=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(tmp_seed)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return model


def test_patch_quantizes_every_block_and_the_package_keeps_the_codes(tmp_path):
    import copy

    from safetensors import safe_open

    from moetune.kernels.db import MemoryKernelDB
    from moetune.model import load, package, patch

    model = _qwen3()
    dense = copy.deepcopy(model)
    with pytest.raises(ValueError, match="quant_group must be one of"):
        patch(model, quant="int8", quant_group=48, db=False)
    assert not any(isinstance(m, TunedMoE) for m in model.modules())  # checked before any block changed
    blocks = patch(model, quant="int8", db=False)
    experts = [p for n, p in model.named_parameters() if "experts" in n]
    assert len(blocks) == 2 and len(experts) == 4 and all(isinstance(p, QuantizedWeight) for p in experts)
    with torch.no_grad():  # the dense model on the values the codes stand for
        dense_experts = [p for n, p in dense.named_parameters() if "experts" in n]
        for p, q in zip(dense_experts, experts, strict=True):
            p.copy_(q.dequantized())
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    assert rel_err(got, want) <= 1e-4
    pkg = package(model, tmp_path / "lm", db=MemoryKernelDB())
    with safe_open(str(pkg / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert sum(k.endswith(".codes") for k in keys) == 4 and not any(k.endswith("experts.down_proj") for k in keys)
    loaded = load(pkg)
    assert all(isinstance(p, QuantizedWeight) for n, p in loaded.named_parameters() if "experts" in n)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)
