"""A/B of launcher scratch reuse (kernels/scratch.py) in one process: a layer with reuse on vs off
(scratch.MAX_BYTES = -1: a fresh torch.empty per call, as before), interleaved, p50 of 3 rounds x N inputs.

Usage: .venv/bin/python results/amd-epyc-znver4-2c-x86_64/scratch_ab.py PRESET DTYPE T [T ...]
PRESET: a preset name (full size) or "student" (the distilled MiniLM student's MoE: E=40 K=8 of 32, gelu, biases).
"""

import dataclasses
import statistics
import sys
import time

import torch

from moetune.kernels import scratch
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS
from moetune.model.distill.moefy import student_config
from moetune.model.moe import MoE

torch.set_num_threads(2)
preset, dtype, tokens = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3:]]
if preset == "student":
    cfg = dataclasses.replace(student_config(384, 1280, 40, 8, "gelu"), dtype=dtype)
else:
    cfg = MoEConfig(**{**PRESETS[preset], "dtype": dtype})
layer = TunedMoE.from_module(MoE(cfg), backends=("tvm",), db=False)
layer.pack_weights()
keep = scratch.MAX_BYTES
for t in tokens:
    xs = [torch.randn(t, cfg.hidden_size).to(cfg.torch_dtype) for _ in range(4)]
    times = {"reuse": [], "fresh": []}
    for x in xs[:2]:
        layer(x)
    for _ in range(3):
        for mode in ("fresh", "reuse"):
            scratch.MAX_BYTES = keep if mode == "reuse" else -1
            scratch.release()
            layer(xs[0])  # the reused buffers exist before timing, as in a model's second layer
            for x in xs:
                t0 = time.perf_counter()
                layer(x)
                times[mode].append(time.perf_counter() - t0)
    p50 = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    print(
        f"{preset} {dtype} T={t}: fresh {p50['fresh']:.2f} ms, reuse {p50['reuse']:.2f} ms, "
        f"{p50['fresh'] / p50['reuse']:.2f}x",
        flush=True,
    )
