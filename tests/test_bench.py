"""moetune bench: HF providers on moetune's weights (every family), the roofline math, rows, CSV and CLI output.

Tiny layers of each preset's structure (H and I divided, fewer experts); nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from moetune.autotune.bench.hf import family, hf_block  # noqa: E402
from moetune.autotune.bench.layer import (  # noqa: E402
    BenchRow,
    append_csv,
    bench_layer,
    make_provider,
    reference_layer,
    speedup_over,
    tuned_vs_hf,
    verify,
)
from moetune.autotune.bench.roofline import Machine, expert_bytes, experts_touched, layer_bytes  # noqa: E402
from moetune.autotune.cli import app  # noqa: E402
from moetune.model import MoEConfig  # noqa: E402
from moetune.model.hf.blocks import hf_block_config, hf_block_weights  # noqa: E402

FAMILIES = {
    "mixtral-8x7b": "mixtral",
    "qwen1.5-moe-a2.7b": "qwen2_moe",  # shared expert with a sigmoid gate
    "qwen3-30b-a3b": "qwen3_moe",
    "olmoe-1b-7b": "olmoe",  # no renormalisation of the top-k weights
    "deepseek-v2-lite": "deepseek_v2",  # two shared experts
    "deepseek-v3": "deepseek_v3",  # sigmoid router, group-limited, score-correction bias
    "gpt-oss-20b": "gpt_oss",  # interleaved, transposed gate/up with biases, router bias
    "llama4-scout": "llama4_text",  # transposed experts, router weight on the input, eager only
}
MACHINE = Machine({"float32": 100.0, "bfloat16": 5.0}, read_gbs=10.0, copy_gbs=8.0, matmul_n={}, stream_bytes=0)


def tiny(preset: str, dtype: str = "float32") -> MoEConfig:
    """H = 64: every width stays a multiple of 16 bytes (grouped_mm's requirement)."""
    c = MoEConfig.preset(preset, dtype=dtype)
    c = c.shrunk(c.hidden_size // 64)
    c = c.replace(intermediate_size=32, shared_intermediate_size=32 if c.num_shared_experts else 0)
    return c.replace(
        num_experts=min(c.num_experts, 16),
        n_group=min(c.n_group, 4),
        topk_group=min(c.topk_group, 2),
        top_k=min(c.top_k, 4),
    )


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_hf_block_holds_moetune_weights_and_matches(preset):
    cfg = tiny(preset)
    assert family(cfg) == FAMILIES[preset]
    ref = reference_layer(cfg)
    block = hf_block(cfg, dict(ref.state_dict()), "eager")
    # model/hf/blocks.py's conversion of our block gives back exactly the weights we put in
    assert hf_block_config(block).replace(name="", dtype=cfg.dtype) == cfg.replace(name="")
    back = hf_block_weights(block, cfg)
    assert set(back) == set(ref.state_dict())
    for name, tensor in ref.state_dict().items():
        assert torch.equal(back[name], tensor), name
    impls = ("hf-eager",) if FAMILIES[preset] == "llama4_text" else ("hf-eager", "hf-grouped_mm", "hf-batched_mm")
    for name in impls:
        provider = make_provider(name, ref, "cpu", None, 2**30)
        assert verify(provider, ref, [1, 16]) is None, name
        assert provider.max_rel_err < 1e-5, (name, provider.max_rel_err)


def test_llama4_has_only_eager():
    ref = reference_layer(tiny("llama4-scout"))
    with pytest.raises(ValueError, match="eager only"):
        make_provider("hf-grouped_mm", ref, "cpu", None, 2**30)


def test_verify_rejects_a_wrong_provider():
    ref = reference_layer(tiny("qwen3-30b-a3b"))
    provider = make_provider("hf-eager", ref, "cpu", None, 2**30)
    provider.fn = lambda x, fn=provider.fn: fn(x) * 1.01  # 1% off: far above the fp32 tolerance
    assert "does not match" in verify(provider, ref, [1])


def test_roofline_math():
    assert MACHINE.roof_gflops(flops=1e9, nbytes=1e9, dtype="float32") == pytest.approx(10.0)  # intensity 1
    assert MACHINE.roof_gflops(flops=1e12, nbytes=1e9, dtype="float32") == pytest.approx(100.0)  # peak-bound
    assert MACHINE.peak_for("bfloat16") == 100.0  # a bf16 kernel may always compute in fp32
    cfg = MoEConfig(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, dtype="bfloat16")
    assert expert_bytes(cfg) == (2 * 4 * 8 + 8 * 4) * 2
    # 3 touched experts + router (E x H) + activations in and out (T x H each), 2 bytes each
    assert layer_bytes(cfg, tokens=5, experts_touched=3) == 3 * 192 + (4 * 8 + 2 * 5 * 8) * 2
    assert experts_touched(torch.tensor([[0, 3], [3, 1]])) == 3


def test_the_gpu_roof_uses_the_copy_bandwidth():
    """The GPU targets are stated against its copy bandwidth; the CPU's roof streams at its read rate."""
    gpu = Machine({"bfloat16": 800e3}, read_gbs=3200.0, copy_gbs=3000.0, matmul_n={}, stream_bytes=1, device="cuda")
    assert (MACHINE.roof_stream, gpu.roof_stream) == ("read", "copy")
    assert gpu.roof_gflops(flops=1e9, nbytes=1e9, dtype="bfloat16") == pytest.approx(3000.0)


def test_speedup_over_a_baseline_per_cell():
    def row(preset: str, tokens: int, provider: str, p50: float) -> BenchRow:
        fields = dict.fromkeys(BenchRow.__dataclass_fields__, 0)
        return BenchRow(**{**fields, "preset": preset, "tokens": tokens, "provider": provider, "p50_ms": p50})

    rows = [row("a", 1, "tuned", 1.0), row("a", 1, "hf-grouped_mm", 2.0), row("a", 16, "tuned", 4.0)]
    rows += [row("a", 16, "hf-grouped_mm", 2.0), row("b", 1, "tuned", 1.0)]  # b: no baseline, not a cell
    got = speedup_over(rows, "tuned", "hf-grouped_mm")
    assert got["cells"] == {"a 0 T=1": 2.0, "a 0 T=16": 0.5} and got["geomean"] == pytest.approx(1.0)


def test_bench_layer_rows_speedups_and_skips():
    cfg = tiny("qwen3-30b-a3b")
    providers = ("reference", "hf-eager", "hf-grouped_mm", "hf-batched_mm", "tvm", "tuned")
    # batched_mm gathers T*K expert copies: allow T=1 (4 copies), not T=5 (20 copies)
    limit = 10 * expert_bytes(cfg)
    result = bench_layer(cfg, [1, 5], providers, machine=MACHINE, repeat=2, db=False, hf_mem_limit=limit)
    got = {(r.tokens, r.provider) for r in result.rows}
    assert got == {(t, p) for t in (1, 5) for p in providers} - {(5, "hf-batched_mm")}
    assert [s["provider"] for s in result.skipped] == ["hf-batched_mm"] and result.skipped[0]["tokens"] == 5
    for t in (1, 5):
        cell = {r.provider: r for r in result.rows if r.tokens == t}
        hf = {p: r.p50_ms for p, r in cell.items() if p.startswith("hf-")}
        best = min(hf, key=hf.get)
        assert cell["tvm"].best_hf == best and cell[best].speedup_vs_best_hf == pytest.approx(1.0, abs=1e-3)
        assert cell["tuned"].speedup_vs_best_hf == pytest.approx(hf[best] / cell["tuned"].p50_ms, rel=1e-2)
        for r in cell.values():
            assert r.p20_ms <= r.p50_ms <= r.p80_ms and r.gflops > 0 and r.gbps > 0
            roof = MACHINE.roof_gflops(r.flops, r.bytes, "float32")
            assert r.roofline_gflops == pytest.approx(roof, rel=1e-3)
            assert r.pct_roofline == pytest.approx(100 * r.gflops / roof, rel=1e-2)
            assert r.max_rel_err < 1e-4
    summary = tuned_vs_hf(result.rows)
    assert summary["cells"] == 2 and math.isfinite(summary["geomean"])


def test_bench_layer_bf16_matches_within_tolerance():
    cfg = tiny("gpt-oss-20b", "bfloat16")
    result = bench_layer(cfg, [3], ("reference", "hf-eager", "tvm"), machine=MACHINE, repeat=2)
    assert {r.provider for r in result.rows} == {"reference", "hf-eager", "tvm"}, result.skipped
    assert all(r.max_rel_err < 3e-2 for r in result.rows if r.provider != "reference")


def test_bf16_verification_tolerates_a_router_flip_not_a_wrong_layout():
    ref = reference_layer(tiny("olmoe-1b-7b", "bfloat16"))
    provider = make_provider("hf-eager", ref, "cpu", None, 2**30)
    right = provider.fn

    def one_token_off(x):  # one token of 16 routed elsewhere, as a bf16 near-tie in the router does
        out = right(x).clone()
        out[0] = -out[0]
        return out

    provider.fn = one_token_off
    assert verify(provider, ref, [16]) is None and provider.max_rel_err > 3e-2
    provider.fn = lambda x: right(x).flip(0)  # every token wrong
    assert "tokens within" in verify(provider, ref, [16])


def _row(**changes) -> BenchRow:
    fields = {name: 1 for name in BenchRow.__dataclass_fields__}
    return BenchRow(**{**fields, **changes})


def test_csv_appends_one_header_and_refuses_another_schema(tmp_path):
    path = tmp_path / "b.csv"
    append_csv([_row(provider="a")], path)
    append_csv([_row(provider="b")], path)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["a", "b"]
    old = tmp_path / "old.csv"
    old.write_text("machine,preset,dtype,tokens,provider,p20_ms\n")
    with pytest.raises(ValueError, match="another header"):
        append_csv([_row()], old)
    assert old.read_text() == "machine,preset,dtype,tokens,provider,p20_ms\n"


def test_bench_cli_report_csv_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out, report, plots = tmp_path / "bench.csv", tmp_path / "report.json", tmp_path / "plots"
    args = ["bench", "-p", "olmoe-1b-7b", "--shrink", "32", "--tokens", "1,4", "--repeat", "2"]
    args += ["--providers", "reference,hf-eager,hf-grouped_mm,tvm,tuned", "--matmul-n", "128", "--stream-mib", "8"]
    args += ["--out", str(out), "--report", str(report), "--plot", str(plots), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {(r["tokens"], r["provider"]) for r in rows} == {
        (t, p) for t in (1, 4) for p in ("reference", "hf-eager", "hf-grouped_mm", "tvm", "tuned")
    }
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    full = json.loads(report.read_text())
    assert full["machine"]["peak_gflops"]["float32"] > 0 and full["machine"]["read_gbs"] > 0
    assert full["tuned_vs_best_hf"]["cells"] == 2
    assert (plots / "speedup.png").stat().st_size > 0 and (plots / "roofline.png").stat().st_size > 0


def test_bench_cli_bad_provider_and_dtype_exit_2():
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--providers", "hf-magic"])
    assert bad.exit_code == 2 and "unknown provider(s) hf-magic" in bad.output
    bad = runner.invoke(app, ["bench", "-p", "olmoe-1b-7b", "--dtype", "float32,int8"])
    assert bad.exit_code == 2 and "dtype must be one of" in bad.output


def test_verdict_tells_speed_noise_and_where_the_kernels_came_from():
    from moetune.autotune.bench.report import verdict

    quiet = dict(preset="qwen3-30b-a3b", dtype="float32", p20_ms=0.95, p50_ms=1.0, p80_ms=1.05, pct_roofline=42.0)
    rows = [
        _row(**quiet, tokens=1, provider="tuned", speedup_vs_reference=3.0, speedup_vs_best_hf=1.5, best_hf="hf-eager"),
        _row(**quiet, tokens=1, provider="hf-eager", speedup_vs_reference=2.0, speedup_vs_best_hf=1.0, best_hf="x"),
    ]
    lines = verdict(rows, "/tmp/k.db")
    assert lines[0].startswith("qwen3-30b-a3b float32 T=1: tuned 1.00 ms = 3.00x the reference, 1.50x the best HF")
    assert not any("busy" in line for line in lines) and "/tmp/k.db" in lines[-1]
    noisy = [*rows, _row(**{**quiet, "p80_ms": 1.9}, tokens=16, provider="tuned", speedup_vs_best_hf=math.nan)]
    assert any(
        line.startswith("warning: the machine was busy: p20-p80 spread up to 95%") for line in verdict(noisy, "x")
    )
    no_hf = [_row(**quiet, tokens=1, provider="tuned", speedup_vs_reference=3.0, speedup_vs_best_hf=math.nan)]
    assert any("no Hugging Face provider was timed" in line for line in verdict(no_hf, "x"))


def test_each_cell_re_measures_the_read_roof():
    """A CPU cell's % of roof uses the bandwidth measured around it, not the one taken at the start of the run."""
    cfg = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2)
    stale = Machine({"float32": 100.0}, read_gbs=1e6, copy_gbs=1e6, matmul_n={}, stream_bytes=64 << 20)
    result = bench_layer(cfg, [1, 4], ("reference",), machine=stale, repeat=2)
    assert result.rows and all(0 < r.read_gbs < 1e5 for r in result.rows)


def test_bench_e2e_runs_a_whole_causal_lm_and_checks_its_input(tmp_path):
    """--e2e: a 1-layer Qwen3-MoE causal LM (qwen3-30b-a3b / 32), HF's experts implementations vs the patched
    model, interleaved; every provider gives the same greedy tokens; the CSV gets one row per provider."""
    pytest.importorskip("transformers")
    runner, out = CliRunner(), tmp_path / "e2e.csv"
    args = ["bench", "--e2e", "-p", "qwen3-30b-a3b", "--shrink", "32", "--layers", "1", "--tokens", "32"]
    result = runner.invoke(app, [*args, "--repeat", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["provider"]: r for r in data["rows"]}
    assert set(rows) == {"hf-eager", "hf-grouped_mm", "tuned"} and data["same_tokens"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["rss_gb"] > 0 for r in rows.values())
    assert max(rows[p]["prefill_tok_s_vs_best_hf"] for p in ("hf-eager", "hf-grouped_mm")) == 1.0
    assert out.read_text().count("\n") == 4  # header + 3 rows
    for bad, message in [
        (["--target", "sm_90"], "--e2e times one preset in one dtype on the CPU"),
        (["--tokens", "16,32"], "one --tokens value"),
        (["--providers", "tvm"], "unknown --e2e provider(s) tvm"),
        (["-p", "qwen9"], "unknown preset 'qwen9'"),
        (["--layers", "100000"], "GiB is available"),
    ]:
        res = runner.invoke(app, ["bench", "--e2e", *bad])
        assert res.exit_code == 2 and message in res.output, (bad, res.output)


def test_a8_verification_allows_a_requantized_code_step_not_a_wrong_layout():
    """w8a8 / w4a8 quantize gemm2's input again: a code one step off here and there is the format, not a bug
    (ACT_QUANT_TOLERANCE); a weight-only format keeps the fp32 tolerance; a wrong layout fails either way."""
    for quant, allowed in (("w8a8", True), ("int8", False)):
        ref = reference_layer(tiny("qwen3-30b-a3b", "float32").replace(quant=quant))
        provider = make_provider("torch", ref, "cpu", None, 2**30)
        right = provider.fn

        def step_off(x, right=right):
            out = right(x)
            return out + 5e-4 * out.norm() / out.numel() ** 0.5 * torch.randn_like(out)

        provider.fn = step_off
        assert (verify(provider, ref, [16]) is None) is allowed and 1e-4 < provider.max_rel_err < 1e-3
        provider.fn = lambda x, right=right: right(x).flip(0)
        assert "does not match" in verify(provider, ref, [16])
