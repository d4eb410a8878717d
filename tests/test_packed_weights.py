"""Experts stored once (issue #15 part 4): PackedWeight, TunedMoE.pack_weights, one panel layout per weight, and a
patched model's resident memory next to the unpatched one's."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels.db import KernelKey, KernelRecord, MemoryKernelDB, current_versions, kernel_key
from moetune.kernels.packed import PackedWeight, pack, unpack
from moetune.kernels.tvm_cpu import launchers
from moetune.model import MoE, MoEConfig, TunedMoE
from moetune.schedules import tvm_cpu

CFG = MoEConfig(hidden_size=64, intermediate_size=40, num_experts=6, top_k=2, dtype="float32")


@pytest.mark.parametrize(("n", "panel", "interleave"), [(40, 8, None), (40, 16, None), (80, 16, 40), (80, 32, 40)])
def test_pack_unpack_round_trip_including_ragged_panels(n, panel, interleave):
    w = torch.randn(3, n, 24)
    packed = pack(w, panel, interleave)
    assert torch.equal(unpack(packed, n, panel, interleave), w)
    assert torch.equal(PackedWeight.of(w, panel, interleave).unpack(), w)


def test_packed_weight_behaves_as_its_values():
    w = torch.randn(2, 40, 24)
    p = nn.Parameter(PackedWeight.of(w, 16, 20), requires_grad=False)
    assert isinstance(p, nn.Parameter) and isinstance(p, PackedWeight) and p.shape == w.shape
    assert (
        torch.equal(p + 1, w + 1)
        and torch.equal(p[:, 3:7], w[:, 3:7])
        and torch.equal(p.transpose(1, 2).sum(1), w.sum(2))
    )
    assert isinstance(p.detach(), PackedWeight) and p.detach().packed is p.packed  # aliases share the buffer
    p.mul_(2)  # an in-place op is packed back
    assert torch.equal(p.unpack(), 2 * w)
    other = torch.randn_like(w)
    with torch.no_grad():
        p.copy_(other)  # what load_state_dict does
    assert torch.equal(p.unpack(), other) and "panel=16" in repr(p)
    with pytest.raises(RuntimeError, match="copy_ into PackedWeight"), torch.no_grad():
        p.copy_(torch.randn(2, 40, 23))


def _pair(seed: int = 0) -> tuple[MoE, TunedMoE]:
    torch.manual_seed(seed)
    ref = MoE(CFG).eval()
    tuned = TunedMoE(CFG, db=MemoryKernelDB())
    tuned.load_state_dict(ref.state_dict())
    return ref, tuned


def test_pack_weights_keeps_outputs_state_dict_and_load_state_dict():
    ref, tuned = _pair()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(9, CFG.hidden_size)
    done = tuned.pack_weights()
    assert set(done) == {"experts.gate_up_proj", "experts.down_proj"} and done["experts.gate_up_proj"][1] == 40
    assert isinstance(tuned.experts.gate_up_proj, PackedWeight) and isinstance(tuned.experts.down_proj, PackedWeight)
    assert (tuned(x) - ref(x)).abs().max() < 1e-5
    saved = tuned.state_dict()
    assert list(saved) == list(state) and all(type(v) is torch.Tensor for v in saved.values())  # plain tensors
    assert all(torch.equal(saved[k], state[k]) for k in state)
    torch.save(saved, io.BytesIO())
    # the kernels read the packed parameters themselves: no packed copy of an expert weight is memoised
    tuned(x[:1])
    memo_owners = [owner() for owner, _ in launchers._PACKED.entries.values()]
    assert not any(o is not None and o.shape == tuned.experts.gate_up_proj.shape for o in memo_owners)
    # load_state_dict repacks in place
    _, other = _pair(seed=1)
    tuned.load_state_dict(other.state_dict())
    ref.load_state_dict(other.state_dict())
    assert isinstance(tuned.experts.gate_up_proj, PackedWeight)
    assert (tuned(x) - ref(x)).abs().max() < 1e-5
    assert tuned.pack_weights() == done  # packing again changes nothing


def _record(target: str, problem, bucket: int, point: dict) -> KernelRecord:
    key = kernel_key(target, problem, bucket)
    assert isinstance(key, KernelKey)
    return KernelRecord(key, current_versions(), "tvm", point, 1.0, 1.0, 1.0, 2.0, 4)


def test_one_panel_width_per_weight_across_token_counts():
    """Winners that disagree on the panel width (the Zen4 demo's gemm1: nt=32 at M=1, 16 at M=256): the largest
    tuned bucket's width is the layout, the other bucket's winner is adapted to it, and the layer stays exact."""
    target = resolve_target("cpu")
    lanes, _ = tvm_cpu.simd(target)
    small, big = lanes, 2 * lanes  # two panel widths every host's space has (8/16 on AVX2, 16/32 on AVX-512)
    cfg = CFG.replace(intermediate_size=4 * big)
    db = MemoryKernelDB()
    for bucket, nt in ((1, big), (256, small)):
        for op in ("experts.gemm1", "experts.gemm2"):
            problem = lower(cfg, bucket).op(op)
            point = {"kt": 1, "mt": 1, "nt": nt, "order": "panels_outer", "par": "fused"}
            assert tvm_cpu.space(problem, target).is_feasible(point)
            db.put(_record(target.name, problem, bucket, point))
    torch.manual_seed(0)
    ref = MoE(cfg).eval()
    tuned = TunedMoE.from_module(ref, db=db)
    assert tuned.runner.layouts() == {"experts.gemm1": small, "experts.gemm2": small}
    before = {d["op"]: d for d in tuned.describe(1)}
    assert before["experts.gemm1"]["config"]["nt"] == big and before["experts.gemm1"]["source"] == "db:exact"
    x = torch.randn(5, cfg.hidden_size)
    want = ref(x).clone()  # ref shares the parameters: compute before they are packed
    tuned.pack_weights()
    after = {d["op"]: d for d in tuned.describe(1)}
    assert after["experts.gemm1"]["config"]["nt"] == small and after["experts.gemm1"]["source"] == "db:exact+layout"
    assert {d["op"]: d["source"] for d in tuned.describe(256)}["experts.gemm2"] == "db:exact"
    assert (tuned(x) - want).abs().max() < 1e-5
    assert tuned.experts.gate_up_proj.layout() == (small, cfg.intermediate_size)


RSS = """
import gc, json, sys
import torch, tvm
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from moetune.kernels.db import MemoryKernelDB
from moetune.model import patch

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))

torch.manual_seed(0)
cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=1024, moe_intermediate_size=768, intermediate_size=768,
    num_experts=48, num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, torch_dtype="float32")
base = rss()
model = Qwen3MoeForCausalLM(cfg).eval()
ids = torch.randint(0, 256, (1, 64))
with torch.no_grad():
    if sys.argv[1] == "patched":
        patch(model, db=MemoryKernelDB())
    for t in (1, 64):
        model(ids[:, :t])
gc.collect()
print(json.dumps({"rss": rss() - base, "weights": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.slow
def test_a_patched_model_needs_no_more_memory_than_the_original():
    """A Qwen3-MoE causal LM with ~0.9 GB of experts, after forwards at T=1 and T=64 in a fresh process each:
    patched (experts packed in place) within 1.1x of the unpatched model's resident memory (it was 2.7x)."""
    pytest.importorskip("transformers")
    out = {}
    for mode in ("unpatched", "patched"):
        done = subprocess.run([sys.executable, "-c", RSS, mode], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["patched"]["weights"] == out["unpatched"]["weights"] > 8e8
    assert out["patched"]["rss"] <= 1.1 * out["unpatched"]["rss"], out
