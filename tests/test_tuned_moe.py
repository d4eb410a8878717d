"""TunedMoE equals the reference MoE for every preset family (small shapes), on each backend and dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from moetune.ir.target import resolve_target
from moetune.kernels.registry import KernelConfig
from moetune.model import MoE, MoEConfig, TunedMoE
from moetune.schedules import tvm_cpu

LANES = tvm_cpu.simd(resolve_target("cpu"))[0]  # the narrowest panel in this host's space (8 on AVX2, 16 on AVX-512)


def small(name: str, dtype: str) -> MoEConfig:
    """A preset's routing, activation and shared expert on a shape small enough for CI (odd sizes on purpose)."""
    base = MoEConfig.preset(name)
    e = min(base.num_experts, 12)
    fields = {"hidden_size": 40, "intermediate_size": 29, "num_experts": e, "top_k": min(base.top_k, e), "dtype": dtype}
    if base.num_shared_experts:
        fields["shared_intermediate_size"] = 24
    if base.n_group > 1:
        fields.update(n_group=4, topk_group=2, top_k=min(base.top_k, 6))
    return base.replace(**fields)


def reference_for(cfg: MoEConfig) -> MoE:
    ref = MoE(cfg).eval()
    if cfg.score_correction_bias:
        with torch.no_grad():
            ref.router.e_score_correction_bias.normal_(std=0.1)
    return ref


@pytest.mark.parametrize("backend", ["tvm", "torch"])
@pytest.mark.parametrize("name", MoEConfig.presets())
def test_tuned_equals_reference_fp32(name, backend):
    ref = reference_for(small(name, "float32"))
    tuned = TunedMoE.from_module(ref, backends=(backend,))
    for shape in [(1, 40), (2, 5, 40), (70, 40)]:  # T=1 (decode); batch x seq; T*K spanning many blocks
        x = torch.randn(*shape)
        with torch.no_grad():
            want = ref(x)
        got = tuned(x)
        assert got.shape == x.shape and got.dtype == x.dtype
        assert rel_err(got, want) <= 1e-4, (name, backend, shape)


DISTILLED = MoEConfig(  # a BERT FFN distilled into experts: plain MLPs, unweighted top-k selection
    hidden_size=64,
    intermediate_size=32,
    num_experts=8,
    top_k=2,
    router="topk_hard",
    norm_topk_prob=False,
    gated=False,
    activation="gelu",
    expert_bias=True,
)


@pytest.mark.parametrize("backend", ["tvm", "torch"])
@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(DISTILLED, id="non-gated-topk_hard"),
        pytest.param(  # the shared expert is non-gated too; router bias in the choice; weights renormalised
            DISTILLED.replace(router_bias=True, norm_topk_prob=True, num_shared_experts=1, shared_intermediate_size=24),
            id="non-gated-shared-router_bias-norm",
        ),
    ],
)
def test_tuned_non_gated_topk_hard_equals_reference(cfg, backend):
    ref = reference_for(cfg)
    tuned = TunedMoE.from_module(ref, backends=(backend,))
    for t in (1, 5, 64):  # decode; a few tokens (blocks mostly padding); many blocks per expert
        x = torch.randn(t, 64)
        with torch.no_grad():
            want = ref(x)
        got = tuned(x)
        assert got.shape == x.shape and got.dtype == x.dtype
        assert rel_err(got, want) <= 1e-5, (backend, t)


@pytest.mark.parametrize("name", ["qwen1.5-moe-a2.7b", "deepseek-v3", "gpt-oss-20b", "llama4-scout", "mixtral-8x7b"])
def test_tuned_bf16_within_twice_torch_bf16_error(name):
    """bf16 kernels vs an fp32 reference: at most ~2x the error of the reference run in bf16 by torch."""
    cfg = small(name, "bfloat16")
    ref_bf16 = reference_for(cfg)
    ref_fp32 = MoE(cfg.replace(dtype="float32"))
    ref_fp32.load_state_dict({k: v.float() for k, v in ref_bf16.state_dict().items()})
    tuned = TunedMoE.from_module(ref_bf16, backends=("tvm",))
    x = torch.randn(33, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = ref_fp32(x.float())
        torch_err = rel_err(ref_bf16(x), exact)
    kernel_err = rel_err(tuned(x), exact)
    # a near-tie in the router can legitimately pick another expert in bf16: the floor absorbs one such row
    assert kernel_err <= 2 * torch_err + 1e-3, (kernel_err, torch_err)


def test_state_dict_keys_and_sharing():
    ref = reference_for(small("qwen1.5-moe-a2.7b", "float32"))
    tuned = TunedMoE.from_module(ref)
    assert list(tuned.state_dict()) == list(ref.state_dict())
    assert tuned.experts.gate_up_proj is ref.experts.gate_up_proj  # shared, not copied
    fresh = TunedMoE(ref.cfg)
    fresh.load_state_dict(ref.state_dict())
    x = torch.randn(9, 40)
    assert rel_err(fresh(x), tuned(x)) < 1e-6


def test_in_place_weight_update_is_seen_by_the_kernels():
    """Packed weights are memoised per tensor version: an in-place update must not serve stale panels."""
    ref = reference_for(small("qwen3-30b-a3b", "float32"))
    tuned = TunedMoE.from_module(ref, backends=("tvm",))
    x = torch.randn(8, 40)
    before = tuned(x)
    with torch.no_grad():
        ref.experts.down_proj.mul_(2.0)
        want = ref(x)
    after = tuned(x)
    assert rel_err(after, want) <= 1e-5 and rel_err(after, 2 * before) <= 1e-5


def test_explicit_configs_and_backend_restriction():
    cfg = small("olmoe-1b-7b", "float32")
    ref = reference_for(cfg)
    gemm1 = KernelConfig.of("tvm", {"nt": LANES, "mt": 1, "kt": 1, "order": "blocks_outer", "par": "outer"})
    tuned = TunedMoE.from_module(ref, configs={"experts.gemm1": gemm1, "route": {"backend": "torch"}})
    chosen = {d["op"]: (d["backend"], d["config"]) for d in tuned.describe(40)}
    assert chosen["experts.gemm1"] == ("tvm", gemm1.as_dict())
    assert chosen["route"] == ("torch", {})
    assert chosen["experts.gemm2"][0] == "tvm"  # the default for ops without an entry
    x = torch.randn(40, 40)
    assert rel_err(tuned(x), ref(x).detach()) <= 1e-5
    only_torch = TunedMoE.from_module(ref, backends=("torch",))
    assert {d["backend"] for d in only_torch.describe(4)} == {"torch"}


def test_bad_configs_are_clear_errors():
    ref = reference_for(small("olmoe-1b-7b", "float32"))
    with pytest.raises(ValueError, match="backends must be a non-empty subset of tvm, torch"):
        TunedMoE.from_module(ref, backends=("cuda",))
    bad = TunedMoE.from_module(
        ref,
        configs={
            "experts.gemm1": KernelConfig.of(
                "tvm", {"nt": LANES, "mt": 3, "kt": 1, "order": "blocks_outer", "par": "outer"}
            )
        },
    )
    with pytest.raises(ValueError, match="mt_divides_bm"):
        bad(torch.randn(300, 40))
    restricted = TunedMoE.from_module(ref, backends=("torch",), configs={"route": KernelConfig.of("tvm", {})})
    with pytest.raises(ValueError, match="not in the allowed backends"):
        restricted(torch.randn(3, 40))
    with pytest.raises(ValueError, match=r"TunedMoE expects x\[\.\.\., 40\]"):
        TunedMoE.from_module(ref)(torch.randn(3, 41))


def test_gpu_plan_needs_no_tvm():
    """A model planned for a GPU chooses among triton / tvm_cuda / torch without importing TVM (a deployment
    image has none; the CPU tvm backend cannot even be imported there)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['tvm'] = None\n"
        "from moetune.model import MoE, MoEConfig, TunedMoE\n"
        "from moetune.kernels.registry import BACKEND_TARGETS, backends_for, get_impl\n"
        "cfg = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2, num_shared_experts=1,"
        " shared_intermediate_size=32)\n"
        "plan = TunedMoE.from_module(MoE(cfg), target='sm_90', db=False).describe(4)\n"
        "assert {c['backend'] for c in plan} == {'triton'}, plan\n"
        "assert backends_for('gemm1', 'cuda') == ['triton', 'tvm_cuda', 'torch']\n"
        "for backend, kinds in BACKEND_TARGETS.items():\n"
        "    if backend != 'tvm':\n"
        "        for op in ('route', 'align', 'gemm1', 'gemm2'):\n"
        "            try: info = get_impl(op, backend)\n"
        "            except ValueError: continue\n"
        "            assert set(info.targets) <= set(kinds), (backend, op, info.targets)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize(
    ("make_x", "needle"),
    [
        (lambda: torch.randn(()), r"TunedMoE expects x\[\.\.\., 40\], got \(\)"),
        (lambda: torch.randn(3, 41), r"TunedMoE expects x\[\.\.\., 40\], got \(3, 41\)"),
        (lambda: [[0.0] * 40], r"TunedMoE expects x\[\.\.\., 40\], got list"),
        (lambda: torch.empty(3, 40, device="meta"), "input x is a meta tensor"),
        (lambda: torch.randn(3, 40, dtype=torch.float16), r"input x is torch.float16 but the layer's weights"),
    ],
    ids=["0-d", "width", "list", "meta", "dtype"],
)
def test_bad_inputs_name_the_input(make_x, needle):
    tuned = TunedMoE.from_module(reference_for(small("olmoe-1b-7b", "float32")), db=False)
    with pytest.raises(ValueError, match=needle):
        tuned(make_x())


def test_zero_tokens_give_the_empty_output_of_the_reference():
    ref = reference_for(small("qwen1.5-moe-a2.7b", "float32"))  # with a shared expert
    for shape in ((0, 40), (2, 0, 40)):
        x = torch.randn(shape)
        got, want = TunedMoE.from_module(ref, db=False)(x), ref(x)
        assert got.shape == want.shape == shape and got.dtype == want.dtype
