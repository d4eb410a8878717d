"""A/B on this host: a bf16 qwen3-30b-a3b layer (full size), TE widening kernels ("te") vs vdpbf16ps ("dot"),
untuned defaults, interleaved rounds, p50 ms. Also fp32 TE for reference of the same weights' shape."""

import statistics
import sys
import time

import torch

from moetune.autotune.bench.layer import reference_layer
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS
from moetune.schedules import tvm_cpu

torch.set_num_threads(2)
tokens = [int(t) for t in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 16, 256]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": "bfloat16"})
ref = reference_layer(cfg)
real = tvm_cpu.dot_kernel
te = TunedMoE.from_module(ref, backends=("tvm",), db=False)
dot = TunedMoE.from_module(ref, backends=("tvm",), db=False)


def run(layer, x, use_dot):
    tvm_cpu.dot_kernel = real if use_dot else (lambda p, t: None)
    try:
        t0 = time.perf_counter()
        out = layer(x)
        return time.perf_counter() - t0, out
    finally:
        tvm_cpu.dot_kernel = real


res = {}
for t in tokens:
    x = torch.randn(t, cfg.hidden_size).bfloat16()
    want = ref(x).float()
    for name, layer, d in (("te", te, False), ("dot", dot, True)):
        for _ in range(2):
            _, out = run(layer, x, d)
        err = ((out.float() - want).norm() / want.norm()).item()
        res[(t, name)] = {"err": err, "times": []}
    for _ in range(rounds):
        for name, layer, d in (("te", te, False), ("dot", dot, True)):
            res[(t, name)]["times"].append(run(layer, x, d)[0])
    for name in ("te", "dot"):
        r = res[(t, name)]
        p50, low = statistics.median(r["times"]) * 1e3, min(r["times"]) * 1e3
        print(f"T={t:4d} {name:4s} p50 {p50:8.2f} ms  min {low:8.2f}  rel err {r['err']:.2e}", flush=True)
    speedup = statistics.median(res[(t, "te")]["times"]) / statistics.median(res[(t, "dot")]["times"])
    print(f"T={t:4d} speedup dot/te {speedup:.2f}x", flush=True)
print(te.describe(1)[2:4])
print(dot.describe(256)[2:4])
