import statistics
import sys
import time

import torch

import moetune.kernels.tvm_cpu.launchers as L
from moetune.autotune.bench.layer import reference_layer
from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.registry import default_config, get_impl
from moetune.model import MoEConfig
from moetune.model.config.presets import PRESETS

torch.set_num_threads(2)
HOST = resolve_target("cpu")
fmt = sys.argv[1]
t = int(sys.argv[2])
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": "float32", "quant": fmt})
layer = reference_layer(cfg)
program = lower(cfg, t)
g1 = program.op("experts.gemm1")
c1 = default_config(g1, "tvm", HOST)
print(c1)
xs = [torch.randn(t, cfg.hidden_size) for _ in range(16)]
als = [ref.align(*layer.route(x), cfg.num_experts, program.block_m) for x in xs]
mod = L._module(g1, c1, HOST)
w = layer.experts.gate_up_proj
times = {"quant": [], "acc": [], "main": [], "whole": []}
fn = get_impl("qgemm1", "tvm").fn
for i in range(16):
    fn(g1, c1, HOST, xs[i], als[i], w, None)
orig = {k: mod[k] for k in ("quant", "acc", "main")} if L.tvm_cpu.dot_kernel(g1, HOST) else {}


class Wrap:
    def __init__(self, m):
        self.m = m

    def __getitem__(self, k):
        f = self.m[k]

        def timed(*a):
            t0 = time.perf_counter()
            f(*a)
            times[k].append(time.perf_counter() - t0)

        return timed


key = (g1, c1, HOST.name)
L._MODULES[key] = Wrap(mod)
for _r in range(3):
    for i in range(16):
        t0 = time.perf_counter()
        fn(g1, c1, HOST, xs[i], als[i], w, None)
        times["whole"].append(time.perf_counter() - t0)
for k, v in times.items():
    if v:
        print(k, f"{statistics.median(v) * 1e3:.3f} ms")
