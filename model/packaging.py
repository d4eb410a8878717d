"""Packages: a model, its MoE configs and its tuned kernel records in one directory; safetensors + JSON only.

Layout of a package directory (every file is listed in the manifest with its SHA-256 and size):
  manifest.json        {"format": "moetune-package", "schema": 1, "kind", "versions", "targets", "files"}
  moetune.json         {"kind", "moe_configs": {module path: MoEConfig dict}, and the kind's own config}
  model.safetensors    the weights, under the model's own state_dict keys
  kernels.json         the tuned kernel records (kernels/db/'s export format) for the packaged targets
  config.json, generation_config.json, tokenizer files     for Hugging Face models (written by HF)

Kinds:
  "moe"            a moetune MoE / TunedMoE layer; load() returns a TunedMoE
  "hf-causal-lm"   a transformers causal LM with MoE blocks (patched or not); load() returns it patched
  other            a module that declares `package_kind`, `package_config() -> dict` and the classmethod
                   `from_package_config(config, tokenizer) -> module` (e.g. the distilled encoder student),
                   registered with `register_kind`; load() swaps its MoE layers to TunedMoE

load() verifies the manifest first (a missing or changed file is an error naming the file), then picks the
kernel records of the local target; without any, it falls back with a one-line warning to the records of
the nearest target of the same kind (a CPU's tuned points compile for this CPU too), else to defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from moetune.model.config import MoEConfig
from moetune.model.moe import MoE
from moetune.model.safetensors_io import load_weights, save_weights

FORMAT, SCHEMA = "moetune-package", 1
MANIFEST, META, WEIGHTS, KERNELS = "manifest.json", "moetune.json", "model.safetensors", "kernels.json"
_KINDS: dict[str, type] = {}
_BUILTIN_KINDS = {"moetune-encoder": ("moetune.model.distill.student", "MoEStudent")}  # imported when first loaded


class PackageError(ValueError):
    """A package that cannot be written or loaded; the message is one line and names the file."""


def register_kind(kind: str, cls: type) -> None:
    """Make `load` rebuild packages of `kind` with `cls.from_package_config(config, tokenizer)`."""
    _KINDS[kind] = cls


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _moe_blocks(model: nn.Module) -> dict[str, MoEConfig]:
    from moetune.model.hf.blocks import SUPPORTED_BLOCKS, hf_block_config
    from moetune.model.runtime.tuned import TunedMoE

    found: dict[str, MoEConfig] = {}
    for name, m in model.named_modules():
        if isinstance(m, (MoE, TunedMoE)):
            found[name] = m.cfg
        elif type(m).__name__ in SUPPORTED_BLOCKS:
            found[name] = hf_block_config(m)
    return found


def _kind(model: nn.Module) -> str:
    from moetune.model.runtime.tuned import TunedMoE

    if isinstance(model, (MoE, TunedMoE)):
        if isinstance(model, TunedMoE) and model.hf_block_kind is not None:
            raise PackageError(
                f"a TunedMoE over an HF {model.hf_block_kind} block is packaged with its model, not alone"
            )
        return "moe"
    if getattr(model, "package_kind", None):
        return model.package_kind
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string") and hasattr(model, "generate"):
        return "hf-causal-lm"
    raise PackageError(
        f"cannot package a {type(model).__name__}: package takes a moetune MoE/TunedMoE, a transformers causal LM, "
        "or a module with package_kind/package_config"
    )


def _records(cfgs: list[MoEConfig], targets: list[str], db: Any) -> list[dict[str, Any]]:
    """The DB's records, at the current versions, of every op these configs lower to, for these targets."""
    from moetune.ir.program import lower
    from moetune.ir.target import resolve_target
    from moetune.kernels.db import is_current
    from moetune.model.runtime.plan import runtime_db

    handle = runtime_db(db)
    resolved = [resolve_target(t) for t in targets]
    names = [t.name for t in resolved]
    if handle is None:
        warnings.warn("moetune: no kernel database; the package carries no tuned kernels", stacklevel=3)
        return []
    kinds = {t.kind for t in resolved}
    ops = {op.problem.signature for cfg in set(cfgs) for k in kinds for b in range(17) for op in lower(cfg, 1 << b, k)}
    rows = [r.to_dict() for t in names for r in handle.records(target=t) if r.key.op in ops and is_current(r)]
    for t in names:
        if not any(r["target"] == t for r in rows):
            warnings.warn(
                f"moetune: no tuned kernels for target {t!r} in {handle.location}; the package uses defaults there",
                stacklevel=3,
            )
    return rows


def package(
    model: nn.Module,
    out_dir: str | Path,
    targets: list[str] | tuple[str, ...] = ("cpu",),
    db: Any = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (weights, configs, tuned kernel records for `targets`, manifest) to `out_dir`.

    Everything is checked before anything is written (the model's kind and MoE blocks, the targets, the kernel
    DB); the package is written into a temporary directory beside `out_dir` and renamed into place at the end,
    so a failure never leaves a partial package (nor touches an existing one)."""
    from moetune.ir.target import resolve_target
    from moetune.kernels.db import current_versions

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PackageError(f"{out} exists and is not empty; choose another directory or pass overwrite=True")
    kind = _kind(model)
    blocks = _moe_blocks(model)
    if not blocks:
        raise PackageError(f"{type(model).__name__} has no MoE block to run on tuned kernels")
    try:
        target_names = [resolve_target(t).name for t in targets]
    except ValueError as exc:
        raise PackageError(str(exc)) from None
    rows = _records(list(blocks.values()), list(targets), db)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and kind == "hf-causal-lm":
        warnings.warn(
            "moetune: packaging a causal LM without a tokenizer; `moetune run` will need token ids (--ids)",
            stacklevel=2,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write(model, tmp, kind, blocks, tokenizer, rows)
        files = sorted(f for f in tmp.rglob("*") if f.is_file() and f.name != MANIFEST)
        bad = [f.name for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
        if bad:
            raise PackageError(f"refusing to package pickle file(s) {', '.join(bad)}")
        manifest = {
            "format": FORMAT,
            "schema": SCHEMA,
            "kind": kind,
            "versions": current_versions(),
            "targets": target_names,
            "files": {str(f.relative_to(tmp)): {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(model: nn.Module, out: Path, kind: str, blocks: dict, tokenizer: Any, rows: list) -> None:
    meta: dict[str, Any] = {"kind": kind, "moe_configs": {k: v.to_dict() for k, v in blocks.items()}}
    if kind == "hf-causal-lm":
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
    elif kind != "moe":
        meta["config"] = model.package_config()
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_weights(model, out / WEIGHTS)  # quantized experts as codes + scales (model/safetensors_io.py)
    (out / KERNELS).write_text(json.dumps({"schema": 1, "records": rows}, indent=1, sort_keys=True) + "\n")
    (out / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _replace_dir(new: Path, out: Path) -> None:
    """Rename the finished package `new` to `out`; an existing `out` (empty, or overwritten) goes only after."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except OSError:
        old.rename(out)  # put the previous package back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- loading ----------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    """A package's JSON file as an object, or a PackageError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PackageError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: not a JSON object")
    return data


def _check_member(root: Path, name: Any) -> None:
    """A manifest name must stay inside the package and may not be, or pass through, a symbolic link: a
    tampered manifest must not make load() open (and hash) /etc/shadow or ../../anything."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise PackageError(f"{root}: the manifest names a file {str(name)[:60]!r} that is not a plain relative path")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise PackageError(f"{root}: the manifest names {name[:60]!r}, which is outside the package")
    here = root
    for part in rel.parts:
        here = here / part
        if here.is_symlink():
            raise PackageError(f"{root}: {here.relative_to(root)} is a symbolic link; packages hold plain files only")


def read_manifest(pkg_dir: str | Path) -> dict[str, Any]:
    """The verified manifest: every listed file inside the package, no links, present with its SHA-256."""
    root = Path(pkg_dir)
    path = root / MANIFEST
    if path.is_symlink():
        raise PackageError(f"{root}: {MANIFEST} is a symbolic link; packages hold plain files only")
    if not path.is_file():
        raise PackageError(f"{root} is not a moetune package (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: not a moetune package manifest")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA:
        raise PackageError(f"{path}: package schema {schema!r} is newer than this moetune reads ({SCHEMA}); upgrade")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        raise PackageError(f"{path}: 'files' must map each file name to its sha256 and size")
    for name in files:  # every name first, before any file is opened
        _check_member(root, name)
    for name, entry in files.items():
        f = root / name
        if not f.is_file():
            raise PackageError(f"{root}: file {name} listed in the manifest is missing")
        if _sha256(f) != entry.get("sha256"):
            raise PackageError(f"{root}: file {name} changed since it was packaged (SHA-256 mismatch)")
    for needed in (META, WEIGHTS, KERNELS):
        if needed not in files:
            raise PackageError(f"{path}: the manifest does not list {needed}")
    return manifest


def _target_kind(name: str) -> str | None:
    if name.startswith("llvm"):
        return "cpu"
    if name.startswith(("sm_", "cuda")):
        return "cuda"
    return None


def _retarget(record: Any, target_name: str) -> Any:
    """The record as if it had been tuned for `target_name` (a fallback's winners, served under our key)."""
    return dataclasses.replace(record, key=dataclasses.replace(record.key, target=target_name))


def kernel_db_for(root: Path, target: Any) -> Any:
    """An in-memory kernel DB of the package's records for `target`, with the fallbacks of the module doc."""
    from moetune.kernels.db import KernelRecord, MemoryKernelDB

    data = _read_json(root / KERNELS)
    records = [KernelRecord.from_dict(r) for r in data.get("records", [])]
    for unknown in sorted({r.key.target for r in records if _target_kind(r.key.target) is None}):
        warnings.warn(f"moetune: kernel records for unknown target {unknown!r} are ignored", stacklevel=3)
    for name in target.lookup_names:  # a GPU device's own records, then its architecture's
        mine = [r for r in records if r.key.target == name]
        if mine:
            break
    if mine and mine[0].key.target != target.name:
        mine = [_retarget(r, target.name) for r in mine]
    if not mine:
        same_kind = sorted({r.key.target for r in records if _target_kind(r.key.target) == target.kind})
        if same_kind:
            nearest = same_kind[0]
            warnings.warn(
                f"moetune: no kernel records for {target.name}; using those tuned for {nearest}", stacklevel=3
            )
            mine = [_retarget(r, target.name) for r in records if r.key.target == nearest]
        elif records or data.get("records") is not None:
            warnings.warn(
                f"moetune: the package has no kernel records for {target.name}; using default kernels", stacklevel=3
            )
    return MemoryKernelDB(mine)


def load_tokenizer(pkg_dir: str | Path) -> Any:
    """The package's tokenizer (transformers), or None when it was packaged without one."""
    root = Path(pkg_dir)
    if not any((root / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


def load(pkg_dir: str | Path, target: str = "cpu", backends: tuple[str, ...] | None = None) -> nn.Module:
    """Verify and load a package; returns a runnable module on the package's kernels for `target`."""
    from moetune.ir.target import resolve_target
    from moetune.kernels.registry import BACKENDS
    from moetune.model.hf.patch import patch
    from moetune.model.runtime.tuned import TunedMoE

    root = Path(pkg_dir)
    manifest = read_manifest(root)
    meta = _read_json(root / META)
    if not isinstance(meta.get("moe_configs"), dict):
        raise PackageError(f"{root}/{META}: no 'moe_configs' mapping")
    kind, tgt = manifest["kind"], resolve_target(target)
    db = kernel_db_for(root, tgt)
    kw = {"target": tgt, "db": db, "backends": backends or BACKENDS}
    if kind == "moe":
        (cfg,) = [MoEConfig.from_dict(c) for c in meta["moe_configs"].values()]
        model = TunedMoE(cfg, **kw)
    elif kind == "hf-causal-lm":
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(root)))
    elif kind in _KINDS or kind in _BUILTIN_KINDS:
        if kind not in _KINDS:
            import importlib

            module, name = _BUILTIN_KINDS[kind]
            register_kind(kind, getattr(importlib.import_module(module), name))
        model = _KINDS[kind].from_package_config(meta["config"], load_tokenizer(root))
    else:
        raise PackageError(f"{root}: unknown package kind {kind!r} (known: moe, hf-causal-lm, {', '.join(_KINDS)})")
    try:
        missing, unexpected = load_weights(model, root / WEIGHTS)
    except Exception as exc:  # safetensors' own error for a file that is not safetensors; torch's size mismatch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"{root}/{WEIGHTS} does not load into the packaged model: {first[:300]}") from None
    if missing or unexpected:
        raise PackageError(
            f"{root}/{WEIGHTS} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if kind == "moe":
        model.pack_weights()  # stored codes (or dense weights) into the kernels' layout
    else:
        formats = {(c.get("quant", "none"), c.get("quant_group", 32)) for c in meta["moe_configs"].values()}
        if len(formats) > 1:
            raise PackageError(f"{root}/{META}: MoE blocks in different weight formats {sorted(formats)}")
        ((quant, group),) = formats
        patch(model, **kw, quant=None if quant == "none" else quant, quant_group=None if quant == "none" else group)
    return model.eval()


def is_package(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
