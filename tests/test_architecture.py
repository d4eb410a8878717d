"""The house rules of ARCHITECTURE.md, checked on the source: imports point down the flow, no import cycle,
the runtime needs neither the tuner nor Optuna, files stay small, and the package list matches the folders.

The flow, first stage first: model/config -> ir -> schedules -> kernels -> model (the runtime modules) ->
autotune. A module may import its own stage and the stages before it, never a later one; module-level and
function-level (lazy) imports count alike, and no file may take part in an import cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("model", "ir", "schedules", "kernels", "autotune")
STAGES = ("model.config", "ir", "schedules", "kernels", "model", "autotune")  # the flow, first stage first


def _modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found["moetune." + ".".join(parts)] = path
    return found


MODULES = _modules()


def stage(module: str) -> int:
    """Index in STAGES of the most specific stage prefix of `module` (moetune.model.config.x -> model.config)."""
    name = module.removeprefix("moetune.")
    best = max((s for s in STAGES if name == s or name.startswith(s + ".")), key=len)
    return STAGES.index(best)


def imports_of(module: str) -> set[str]:
    """The moetune modules `module` imports, anywhere in the file (lazy imports included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if stage(t) > stage(m))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_every_import_points_down_the_flow():
    assert not upward_imports(GRAPH), "imports of a later stage:\n" + "\n".join(upward_imports(GRAPH))


def test_no_import_cycle():
    assert not import_cycles(GRAPH)


def test_the_checks_catch_a_planted_cycle_and_an_upward_import():
    """The two rules can fail: the space importing the tuner's prepare (as it once did) and a two-file loop."""
    planted = {m: set(t) for m, t in GRAPH.items()}
    planted["moetune.schedules.triton"].add("moetune.autotune.tuning.prepare")
    planted["moetune.kernels.db.records"].add("moetune.kernels.db.sql")
    assert upward_imports(planted) == ["moetune.schedules.triton -> moetune.autotune.tuning.prepare"]
    assert ["moetune.kernels.db.records", "moetune.kernels.db.sql"] in import_cycles(planted)
    assert stage("moetune.model.config.presets") < stage("moetune.ir.program") < stage("moetune.kernels.db")
    assert stage("moetune.kernels.db") < stage("moetune.model.runtime.tuned") < stage("moetune.autotune.cli")


def test_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big


def test_pyproject_lists_every_package():
    """A wheel ships the packages pyproject names: every folder with an __init__.py must be listed."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == packages


_RUNTIME = """
import sys
import torch
from moetune.model import MoE, MoEConfig, TunedMoE, load, package, patch
cfg = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2)
ref = MoE(cfg)
x = torch.randn(5, 32)
out = TunedMoE.from_module(ref, db=False)(x)
assert (out - ref(x)).abs().max() < 1e-5
package(ref, sys.argv[1], db="memory")
assert (load(sys.argv[1])(x) - out).abs().max() < 1e-5
loaded = sorted(m for m in sys.modules if m.startswith(("moetune.autotune", "optuna")) or m == "optuna")
print(loaded)
"""


@pytest.mark.slow
def test_the_runtime_imports_no_tuner(tmp_path):
    """TunedMoE, package and load, then a forward: nothing of moetune.autotune and no Optuna gets imported."""
    done = subprocess.run(
        [sys.executable, "-c", _RUNTIME, str(tmp_path / "pkg")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_one_key_constructor_for_every_caller():
    """The DB key is built by kernels/db/key.py only: no other module constructs a KernelKey by hand."""
    by_hand = [
        str(p.relative_to(ROOT))
        for m, p in MODULES.items()
        if m not in ("moetune.kernels.db.key", "moetune.kernels.db.records", "moetune.kernels.db.sql")
        and "KernelKey(" in p.read_text()
    ]
    assert not by_hand, by_hand


def test_one_cache_root():
    """$MOETUNE_CACHE_DIR is read in kernels/cache.py alone."""
    readers = defaultdict(list)
    for m, p in MODULES.items():
        if 'environ.get("MOETUNE_CACHE_DIR"' in p.read_text():
            readers["env"].append(m)
        if '".cache"' in p.read_text():
            readers["home"].append(m)
    assert readers == {"env": ["moetune.kernels.cache"], "home": ["moetune.kernels.cache"]}


def test_static_tools_and_python_m_follow_the_mapping(tmp_path):
    """mypy resolves moetune.<folder> imports through the editable install (`make setup` links the sources,
    editable_mode=strict, because type checkers cannot run setuptools' import hook), and `python -m` finds the
    CLI and the trial worker by their module names."""
    mypy = pytest.importorskip("mypy.api")
    probe = tmp_path / "probe.py"
    probe.write_text("from moetune.kernels.db import kernel_key\nreveal_type(kernel_key)\n")
    out, err, status = mypy.run(
        [
            "--python-executable",
            sys.executable,
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / "c"),
            str(probe),
        ]
    )
    assert status == 0 and "-> moetune.kernels.db.records.KernelKey" in out, out + err
    for module in ("moetune.autotune.cli", "moetune.autotune.tuning.worker"):
        code = f"import importlib.util as u; print(u.find_spec({module!r}) is not None)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.stdout.strip() == "True", (module, done.stderr)
    cli = subprocess.run(
        [sys.executable, "-m", "moetune.autotune.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert cli.returncode == 0 and "Usage: moetune" in cli.stdout
