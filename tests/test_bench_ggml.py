"""The bench's `ggml` provider (autotune/bench/ggml.py): llama.cpp's own MoE graph on moetune's weights, optional.

The tests that run ggml skip without ggml-python (`pip install 'moetune[anchors]'`); the one that checks the
skip note runs everywhere, with the import made to fail."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

from moetune.autotune.bench.layer import TOLERANCE, bench_layer, make_provider, reference_layer, verify
from moetune.autotune.cli import app
from moetune.model import MoEConfig

DTYPES = ("float32", "bfloat16")


@pytest.fixture
def ggml():
    return pytest.importorskip("ggml")


def qwen3(dtype: str) -> MoEConfig:
    return MoEConfig.preset("qwen3-30b-a3b", dtype=dtype).shrunk(32)  # H=64, I=24, E=128, K=8


def custom(dtype: str, **changes) -> MoEConfig:
    fields = dict(hidden_size=32, intermediate_size=16, num_experts=8, top_k=2, norm_topk_prob=False, dtype=dtype)
    return MoEConfig(**{**fields, **changes})


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def _check(cfg: MoEConfig) -> None:
    """The provider passes the bench's own verification, and matches the reference at several T."""
    ref = reference_layer(cfg)
    provider = make_provider("ggml", ref, "cpu", None, 0.0)
    assert verify(provider, ref, [1, 16]) is None
    if cfg.dtype == "float32":
        assert provider.max_rel_err <= TOLERANCE["float32"]
    for t in (1, 5, 16):  # each T builds its own graph; a second call reuses it
        x = torch.randn(t, cfg.hidden_size, generator=torch.Generator().manual_seed(t)).to(cfg.torch_dtype)
        with torch.no_grad():
            got, want = provider.fn(x), ref(x)
        assert got.shape == (t, cfg.hidden_size) and got.dtype == cfg.torch_dtype
        assert torch.equal(provider.fn(x), got)
        # bf16: ggml rounds the activations to bf16 inside mul_mat, the reference computes in fp32
        assert _rel(got, want) <= (TOLERANCE["float32"] if cfg.dtype == "float32" else TOLERANCE["bfloat16"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ggml_matches_the_reference_on_a_shrunk_qwen3(ggml, dtype):
    _check(qwen3(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "changes",
    [{}, {"norm_topk_prob": True, "routed_scaling_factor": 2.5}, {"top_k": 1}],
    ids=["plain", "renormalised-scaled", "top1"],
)
def test_ggml_matches_the_reference_on_a_tiny_layer(ggml, dtype, changes):
    _check(custom(dtype, **changes))


def test_ggml_describes_its_buffers_and_threads(ggml):
    ref = reference_layer(qwen3("bfloat16"))
    provider = make_provider("ggml", ref, "cpu", None, 0.0)
    info = provider.describe(1)
    assert info["library"] == "ggml" and info["weight_type"] == "BF16"
    assert info["threads"] == torch.get_num_threads()
    # ggml 0.15 repacks only quantized types: bf16 / fp32 experts stay in the plain CPU layout
    assert set(info["buffers"]) == {"router", "gate_up", "down"}
    assert all(not b.endswith("REPACK") for b in info["buffers"].values())


def test_ggml_in_the_bench_rows_and_an_uncovered_config_skipped(ggml):
    result = bench_layer(qwen3("float32"), [1, 4], ("reference", "ggml"), repeat=2)
    assert {(r.tokens, r.provider) for r in result.rows} == {(t, p) for t in (1, 4) for p in ("reference", "ggml")}
    assert all(r.max_rel_err <= TOLERANCE["float32"] for r in result.rows if r.provider == "ggml")
    gpt_oss = MoEConfig.preset("gpt-oss-20b", dtype="float32").shrunk(45).replace(num_experts=8)
    result = bench_layer(gpt_oss, [1], ("reference", "ggml"), repeat=2)
    assert [r.provider for r in result.rows] == ["reference"]
    (skip,) = result.skipped
    assert skip["provider"] == "ggml" and skip["reason"].startswith("ValueError: ") and "softmax" in skip["reason"]


@pytest.fixture
def no_ggml(monkeypatch):
    """ggml-python not installed: its import fails (even if this process imported it before)."""
    monkeypatch.setitem(sys.modules, "ggml", None)
    monkeypatch.setitem(sys.modules, "ggml.ggml", None)


def test_without_ggml_the_provider_is_a_one_line_skip(no_ggml):
    cfg = custom("float32")
    with pytest.raises(ImportError, match=r"moetune\[anchors\]"):
        make_provider("ggml", reference_layer(cfg), "cpu", None, 0.0)
    result = bench_layer(cfg, [1], ("reference", "ggml"), repeat=2)
    assert [r.provider for r in result.rows] == ["reference"]
    (skip,) = result.skipped
    assert skip["provider"] == "ggml" and skip["tokens"] is None
    assert skip["reason"].startswith("ImportError: ggml provider needs ggml-python") and "\n" not in skip["reason"]


def test_without_ggml_the_cli_notes_the_skip_and_succeeds(no_ggml):
    args = ["bench", "-p", "olmoe-1b-7b", "--shrink", "32", "--tokens", "1", "--providers", "reference,ggml"]
    out = CliRunner().invoke(app, [*args, "--repeat", "2", "--matmul-n", "64", "--stream-mib", "1"])
    assert out.exit_code == 0, out.output
    assert "skipped ggml on olmoe-1b-7b/32 float32 T=all: ImportError: ggml provider needs ggml-python" in out.output
