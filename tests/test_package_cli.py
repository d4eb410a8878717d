"""`moetune package` and `moetune run` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moetune.autotune.cli import app
from moetune.kernels.db import MemoryKernelDB, open_db
from moetune.model import MoE, MoEConfig, package

pytest.importorskip("transformers")
runner = CliRunner()


def _fails(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not result.stdout.strip(), result.stdout  # nothing before the error: no empty table header


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Mixtral causal LM saved the Hugging Face way, with a tokenizer."""
    from test_dropin import _model
    from test_package import _tokenizer

    path = tmp_path_factory.mktemp("hf") / "tiny-mixtral"
    model = _model("mixtral", experts_implementation="eager")
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def test_package_then_run_generates(hf_dir, tmp_path):
    out = tmp_path / "pkg"
    open_db(tmp_path / "none.db").close()  # a database without records
    result = runner.invoke(app, ["package", str(hf_dir), str(out), "--db", str(tmp_path / "none.db"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "hf-causal-lm" and "model.safetensors" in data["files"] and data["records"] == 0

    result = runner.invoke(app, ["run", str(out), "the cat sat", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["new_tokens"] == 3 and run["completion"].strip()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, eager = AutoTokenizer.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = tok("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        want = eager.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1] :]
    assert run["completion"] == tok.decode(want, skip_special_tokens=True)

    result = runner.invoke(app, ["run", str(out), "the cat sat", "--max-new-tokens", "2"])
    assert result.exit_code == 0 and "tok/s" in result.output


def test_cli_bad_input(hf_dir, tmp_path):
    _fails(runner.invoke(app, ["package", str(tmp_path / "nope"), str(tmp_path / "o")]), "does not exist")
    _fails(runner.invoke(app, ["package", str(tmp_path), str(tmp_path / "o")]), "neither a moetune package")
    _fails(runner.invoke(app, ["run", str(tmp_path), "hi"]), "not a moetune package")
    moe_pkg = package(
        MoE(MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)), tmp_path / "m", db=MemoryKernelDB()
    )
    _fails(runner.invoke(app, ["run", str(moe_pkg), "hi"]), "no text interface")
    (moe_pkg / "moetune.json").write_text("{}")
    _fails(runner.invoke(app, ["run", str(moe_pkg), "hi"]), "moetune.json changed since it was packaged")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _fails(runner.invoke(app, ["package", str(hf_dir), str(tmp_path / "full")]), "exists and is not empty")
    out = tmp_path / "q"
    _fails(runner.invoke(app, ["package", str(hf_dir), str(out), "--quant", "int8"]), "must divide hidden_size (48)")
    _fails(runner.invoke(app, ["package", str(hf_dir), str(out), "--quant-group", "64"]), "--quant-group needs --quant")
    _fails(runner.invoke(app, ["package", str(moe_pkg), str(out), "--quant", "int4"]), "Hugging Face model directory")
    assert not out.exists()


def test_a_quantized_package_runs_from_the_cli(tmp_path):
    from test_quant import _qwen3

    model = _qwen3()
    model.save_pretrained(tmp_path / "src")
    out, db = tmp_path / "pkg", tmp_path / "none.db"
    open_db(db).close()
    result = runner.invoke(
        app, ["package", str(tmp_path / "src"), str(out), "--quant", "int4", "--db", str(db), "--json"]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "moetune.json").read_text())
    assert {c["quant"] for c in meta["moe_configs"].values()} == {"int4"}
    dense_bytes = sum(p.nbytes for p in model.parameters())
    assert json.loads(result.stdout)["files"]["model.safetensors"]["bytes"] < 0.7 * dense_bytes
    result = runner.invoke(app, ["run", str(out), "--ids", "1,2,3", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["completion"]) == 3


def test_a_model_without_tokenizer_runs_from_token_ids(tmp_path):
    """Packaging warns that there is no tokenizer; `run --ids` then generates the same tokens as HF eager."""
    from test_dropin import _model

    model = _model("mixtral", experts_implementation="eager")
    src = tmp_path / "no-tok"
    model.save_pretrained(src)
    with pytest.warns(UserWarning, match="without a tokenizer"):
        pkg = package(model, tmp_path / "pkg", db=MemoryKernelDB())
    _fails(runner.invoke(app, ["run", str(pkg), "the cat"]), "--ids")
    _fails(runner.invoke(app, ["run", str(pkg)]), "not both and not neither")
    _fails(runner.invoke(app, ["run", str(pkg), "--ids", "1,x"]), "--ids must be comma-separated token ids")
    _fails(runner.invoke(app, ["run", str(pkg), "--ids", "99999999"]), "below the vocabulary size")
    result = runner.invoke(app, ["run", str(pkg), "--ids", "1,2,3", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    with torch.no_grad():
        want = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)[0, 3:]
    assert run["prompt"] == [1, 2, 3] and run["completion"] == want.tolist()
