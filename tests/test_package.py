"""package -> load round trips (a moetune MoE layer, a Hugging Face causal LM with its tokenizer) and the
manifest's guarantees: a changed byte, a missing file, a newer schema, records for another or an unknown
target each give a clear error or a one-line warning."""

from __future__ import annotations

import hashlib
import json
import re
import warnings

import pytest
import torch

from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels.db import KernelKey, KernelRecord, MemoryKernelDB, current_versions
from moetune.kernels.registry import default_config
from moetune.model import MoE, MoEConfig, TunedMoE, load, package
from moetune.model.packaging import PackageError, read_manifest

CFG = MoEConfig(hidden_size=32, intermediate_size=24, num_experts=4, top_k=2, name="tiny")
HOST = resolve_target("cpu")


def _db(target: str = HOST.name) -> MemoryKernelDB:
    """One current record (the tvm default point of gemm1 at M=8) for `target`."""
    op = lower(CFG, 8).op("experts.gemm1")
    point = default_config(op, "tvm", HOST).as_dict()
    key = KernelKey(target, op.signature, "float32", 8)
    return MemoryKernelDB([KernelRecord(key, current_versions(), "tvm", point, 1.0, 1.0, 1.0, 2.0, 5)])


@pytest.fixture
def moe_pkg(tmp_path):
    torch.manual_seed(0)
    moe = MoE(CFG)
    return moe, package(moe, tmp_path / "pkg", db=_db())


def test_moe_round_trip_is_identical_and_uses_the_records(moe_pkg):
    moe, pkg = moe_pkg
    manifest = read_manifest(pkg)
    assert manifest["kind"] == "moe" and set(manifest["files"]) == {"model.safetensors", "moetune.json", "kernels.json"}
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in pkg.iterdir())
    loaded = load(pkg)
    assert isinstance(loaded, TunedMoE) and list(loaded.state_dict()) == list(moe.state_dict())
    x = torch.randn(8, 32)
    want = TunedMoE.from_module(moe, db=_db())(x)
    assert torch.equal(loaded(x), want)
    sources = {d["op"]: d["source"] for d in loaded.describe(8)}
    assert sources["experts.gemm1"] == "db:exact"


def test_tampered_missing_and_newer_packages_are_clear_errors(moe_pkg, tmp_path):
    _, pkg = moe_pkg
    weights = pkg / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"file model\.safetensors changed since it was packaged"):
        load(pkg)
    weights.unlink()
    with pytest.raises(PackageError, match=r"file model\.safetensors listed in the manifest is missing"):
        load(pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    (pkg / "manifest.json").write_text(json.dumps({**manifest, "schema": 99}))
    with pytest.raises(PackageError, match="schema 99 is newer"):
        load(pkg)
    with pytest.raises(PackageError, match="not a moetune package"):
        load(tmp_path)


def test_records_of_another_cpu_are_used_with_a_warning(tmp_path):
    other = next(t for t in ("llvm -mcpu=znver4", "llvm -mcpu=icelake-server") if t != HOST.name)  # not this host
    pkg = package(MoE(CFG), tmp_path / "p", targets=[other], db=_db(other))
    with pytest.warns(UserWarning, match=f"using those tuned for {other}"):
        loaded = load(pkg)
    assert {d["source"] for d in loaded.describe(8) if d["op"] == "experts.gemm1"} == {"db:exact"}


def test_unknown_targets(tmp_path):
    with pytest.raises(ValueError, match="unknown target 'tpu-v5'"):
        package(MoE(CFG), tmp_path / "p", targets=["tpu-v5"], db=_db())
    # A package written by a moetune that knows more targets: its records for them are ignored, with a warning.
    pkg = package(MoE(CFG), tmp_path / "q", db=_db())
    kernels = json.loads((pkg / "kernels.json").read_text())
    kernels["records"] += [r.to_dict() for r in _db("tpu-v5").records()]
    (pkg / "kernels.json").write_text(json.dumps(kernels))
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["kernels.json"]["sha256"] = hashlib.sha256((pkg / "kernels.json").read_bytes()).hexdigest()
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="kernel records for unknown target 'tpu-v5' are ignored"):
        loaded = load(pkg)
    assert {d["source"] for d in loaded.describe(8) if d["op"] == "experts.gemm1"} == {"db:exact"}


def test_package_without_records_warns_and_runs_defaults(tmp_path):
    moe = MoE(CFG)
    with pytest.warns(UserWarning, match="no tuned kernels for target"):
        pkg = package(moe, tmp_path / "p", db=MemoryKernelDB())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load(pkg)
    assert {d["source"] for d in loaded.describe(4)} == {"default"}


def test_package_bad_input(tmp_path):
    with pytest.raises(PackageError, match="cannot package a Sequential"):
        package(torch.nn.Sequential(MoE(CFG).router), tmp_path / "a", db=False)
    transformers = pytest.importorskip("transformers")
    dense = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=32,
    )
    with pytest.raises(PackageError, match="LlamaForCausalLM has no MoE block"):
        package(transformers.LlamaForCausalLM(dense), tmp_path / "a", db=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("user data")
    with pytest.raises(PackageError, match="exists and is not empty"):
        package(MoE(CFG), tmp_path / "b", db=False)
    assert (tmp_path / "b" / "keep.txt").read_text() == "user data"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", *[f"w{i}" for i in range(100)], "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_hf_causal_lm_round_trip_with_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from test_dropin import _model

    model = _model("qwen2_moe", experts_implementation="eager")
    tok = _tokenizer()
    pkg = package(model, tmp_path / "lm", tokenizer=tok, db=MemoryKernelDB())
    names = set(read_manifest(pkg)["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "kernels.json"} <= names
    loaded = load(pkg)
    assert sum(isinstance(m, TunedMoE) for m in loaded.modules()) == 2  # both layers patched
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=4, do_sample=False)
        b = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_a_gpu_uses_its_architecture_records_without_a_warning(tmp_path):
    """Records tuned for `cuda -arch=sm_90` serve an H200 (`... -device=nvidia-h200`) before any other arch's."""
    from moetune.model.packaging import KERNELS, kernel_db_for

    records = [r.to_dict() for t in ("cuda -arch=sm_80", "cuda -arch=sm_90") for r in _db(t).records()]
    (tmp_path / KERNELS).write_text(json.dumps({"records": records}))
    h200 = resolve_target("cuda -arch=sm_90 -device=nvidia-h200")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db = kernel_db_for(tmp_path, h200)
    assert {r.key.target for r in db.records()} == {h200.name}
    assert len(db.records()) == 1


def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rehash(pkg, name: str) -> None:
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256((pkg / name).read_bytes()).hexdigest()
    (pkg / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("dotdot", "which is outside the package"),
        ("absolute", "which is outside the package"),
        ("listed-symlink", "evil is a symbolic link"),
        ("weights-symlink", "model.safetensors is a symbolic link"),
        ("files-null", "'files' must map each file name"),
        ("not-safetensors", "does not load into the packaged model"),
        ("config-sizes", "does not load into the packaged model"),
    ],
)
def test_tampered_packages_are_refused(moe_pkg, tmp_path, how, needle):
    """Names that leave the package and links are refused before any file is opened; weights that do not fit
    the packaged config (or are not safetensors at all) are one-line PackageErrors, not tracebacks."""
    _, pkg = moe_pkg
    manifest = json.loads((pkg / "manifest.json").read_text())
    secret = tmp_path / "secret"
    secret.write_text("not for packages")
    if how in ("dotdot", "absolute"):
        name = "../secret" if how == "dotdot" else str(secret)
        manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    elif how == "listed-symlink":
        (pkg / "evil").symlink_to(secret)
        manifest["files"]["evil"] = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(), "bytes": 16}
    elif how == "weights-symlink":
        real = tmp_path / "w.safetensors"
        (pkg / "model.safetensors").rename(real)
        (pkg / "model.safetensors").symlink_to(real)
    elif how == "files-null":
        manifest["files"] = None
    if how in ("dotdot", "absolute", "listed-symlink", "files-null"):
        (pkg / "manifest.json").write_text(json.dumps(manifest))
    if how == "not-safetensors":
        (pkg / "model.safetensors").write_bytes(b"#!/bin/sh\necho not weights\n")
        _rehash(pkg, "model.safetensors")
    if how == "config-sizes":
        meta = json.loads((pkg / "moetune.json").read_text())
        (cfg,) = meta["moe_configs"].values()
        cfg["hidden_size"] += 8
        (pkg / "moetune.json").write_text(json.dumps(meta))
        _rehash(pkg, "moetune.json")
    before = _snapshot(pkg)
    with pytest.raises(PackageError, match=re.escape(needle)) as info:
        load(pkg)
    assert "\n" not in str(info.value)
    assert _snapshot(pkg) == before


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"targets": ["llvm -mcpu=bogus"]}, PackageError, "LLVM does not know the CPU 'bogus'"),
        ({"db": "NOT_A_DB"}, ValueError, "is not an SQLite file"),
    ],
    ids=["target", "db"],
)
def test_a_failed_package_writes_nothing(moe_pkg, tmp_path, kwargs, error, needle):
    """Everything is checked before anything is written: no directory, no partial files, and an existing
    package that `overwrite=True` would replace stays byte-identical."""
    moe, pkg = moe_pkg
    if kwargs.get("db") == "NOT_A_DB":
        junk = tmp_path / "junk.db"
        junk.write_text("this is not a database\n")
        kwargs = {**kwargs, "db": str(junk)}
    fresh = tmp_path / "fresh"
    with pytest.raises(error, match=re.escape(needle)):
        package(moe, fresh, **kwargs)
    assert not fresh.exists()
    before = _snapshot(pkg)
    with pytest.raises(error, match=re.escape(needle)):
        package(moe, pkg, overwrite=True, **kwargs)
    assert _snapshot(pkg) == before
    assert sorted(p.name for p in pkg.parent.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers


def test_overwrite_replaces_the_package_whole(moe_pkg):
    moe, pkg = moe_pkg
    (pkg / "stray.txt").write_text("left from an older package")
    package(moe, pkg, overwrite=True, db=_db())
    assert not (pkg / "stray.txt").exists() and set(read_manifest(pkg)["files"]) >= {"model.safetensors"}
