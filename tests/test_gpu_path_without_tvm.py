"""The GPU code path runs where TVM is not installed (issue #18): the GPU image has torch, Triton and CuPy, no TVM.

A child process blocks `tvm` (and `optuna` where the step needs none) at import, resolves a CUDA target with
MOETUNE_GPU_INTERPRET=1 so its Triton kernels run on CPU tensors under Triton's interpreter, and then
1. plans and runs a TunedMoE on the Triton backend, checked against the reference (no tvm, no optuna imported);
2. sets up the bench's providers for that target and verifies them the way `moetune bench` does;
3. runs `moetune tune` on it (optuna allowed, tvm blocked): the studies finish, tvm_cuda is skipped with a note,
   and the winners are stored under the interpreter's device name, which no real GPU looks up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"blocked for this test: {name}")
BLOCK = _Block(sys.argv[1].split(","))
sys.meta_path.insert(0, BLOCK)
"""

RUNTIME = """
import json, torch
from moetune.autotune.bench.layer import make_provider, verify
from moetune.ir.target import resolve_target
from moetune.kernels.db import MemoryKernelDB
from moetune.model import MoE, MoEConfig
from moetune.model.runtime.tuned import TunedMoE

target = resolve_target("sm_90")
cfg = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=6, top_k=2, dtype="float32")
torch.manual_seed(0)
ref = MoE(cfg).eval().requires_grad_(False)
tuned = TunedMoE.from_module(ref, target=target.name, backends=("triton",), db=MemoryKernelDB())
x = torch.randn(9, 32)
with torch.no_grad():
    err = ((tuned(x) - ref(x)).norm() / ref(x).norm()).item()
providers = {name: make_provider(name, ref, target.name, MemoryKernelDB(), 1e9) for name in ("triton", "tuned")}
reasons = {name: verify(p, ref, [1, 16]) for name, p in providers.items()}
backends = sorted({row["backend"] for row in tuned.describe(9)})
print("@@" + json.dumps({"target": target.name, "device": target.torch_device, "err": err, "reasons": reasons,
                         "backends": backends, "loaded": sorted(m for m in ("tvm", "optuna") if m in sys.modules)}))
"""

TUNE = """
import json, sys
from typer.testing import CliRunner
from moetune.autotune.cli import app
from moetune.kernels.db import open_db
db, storage = sys.argv[2], sys.argv[3]
args = ["tune", "--model", "olmoe-1b-7b", "--shrink", "32", "--dtype", "float32", "--target", "sm_90", "--m", "1",
        "--ops", "experts.gemm1", "--trials", "2", "--repeat", "3", "--db", db, "--storage", storage, "--json"]
result = CliRunner().invoke(app, args)
with open_db(db, create=False) as kdb:
    targets = sorted({r.key.target for r in kdb.records()})
print("@@" + json.dumps({"rc": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                         "targets": targets, "tvm_loaded": "tvm" in sys.modules}))
"""


def _child(code: str, blocked: str, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOETUNE_GPU_INTERPRET": "1"}
    script = BLOCKER + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script, blocked, *args], capture_output=True, text=True, env=env, timeout=600
    )
    marked = [line for line in done.stdout.splitlines() if line.startswith("@@")]
    assert done.returncode == 0 and marked, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(marked[-1][2:])


def test_plan_run_and_bench_setup_without_tvm_or_optuna():
    out = _child(RUNTIME, "tvm,tvm_ffi,optuna")
    assert out["target"] == "cuda -arch=sm_90 -device=triton-interpreter" and out["device"] == "cpu"
    assert out["err"] < 1e-5 and out["backends"] == ["triton"]
    assert out["reasons"] == {"triton": None, "tuned": None}  # both match the reference
    assert out["loaded"] == []


def test_the_tuning_loop_runs_without_tvm(tmp_path):
    out = _child(TUNE, "tvm,tvm_ffi", str(tmp_path / "k.db"), str(tmp_path / "journal"))
    assert out["rc"] == 0, out["stdout"] + out["stderr"]
    assert "note: backend tvm_cuda is not tuned here: tvm, cupy not installed" in out["stderr"]
    report = json.loads(out["stdout"])
    (study,) = report["outcomes"]
    assert study["name"] == "experts.gemm1" and study["status"] == "tuned" and study["failed"] == 0
    assert study["trials"] >= 2 and study["backend"] in ("triton", "torch")
    assert out["targets"] == ["cuda -arch=sm_90 -device=triton-interpreter"]  # never a real GPU's key
    assert not out["tvm_loaded"]
