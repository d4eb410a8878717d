"""Per-op p50 of one qwen3-30b-a3b layer (ARGS: dtype T; env QUANT=format, PACK=0|1), 32 inputs x 3 rounds."""

import collections
import os
import statistics
import sys
import time

import torch

from moetune.autotune.bench.layer import reference_layer
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS
from moetune.model.runtime import plan as planmod

torch.set_num_threads(2)
dtype = sys.argv[1]
t = int(sys.argv[2])
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": dtype, "quant": os.environ.get("QUANT", "none")})
ref = reference_layer(cfg)
tuned = TunedMoE.from_module(ref, backends=("tvm",), db=False, quant=cfg.quant if cfg.quant != "none" else None)
if os.environ.get("PACK", "1") == "1":  # PACK=0: the launchers' memoised packed copies instead of in place
    tuned.pack_weights()
times = collections.defaultdict(list)
orig = planmod.Plan.run


def run(self, name, *a, **k):
    t0 = time.perf_counter()
    r = orig(self, name, *a, **k)
    times[name].append(time.perf_counter() - t0)
    return r


planmod.Plan.run = run
xs = [torch.randn(t, cfg.hidden_size).to(cfg.torch_dtype) for _ in range(32)]
tot = []
for x in xs[:4]:
    tuned(x)
times.clear()
for _r in range(3):
    for x in xs:
        t0 = time.perf_counter()
        tuned(x)
        tot.append(time.perf_counter() - t0)
s = 0
for k, v in times.items():
    m = statistics.median(v) * 1e3
    s += m
    print(f"{k:16s} {m:.3f} ms")
print(f"sum of ops {s:.3f} ms, layer p50 {statistics.median(tot) * 1e3:.3f} ms")
