import statistics
import sys
import time

import torch

from moetune.autotune.bench.layer import reference_layer
from moetune.kernels.registry import KernelConfig
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS

torch.set_num_threads(2)
t = int(sys.argv[1])
variants = [v.split(":") for v in sys.argv[2].split(",")]  # op:nt:mt
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": "bfloat16"})
ref = reference_layer(cfg)
layers = {}
for v in variants:
    op, nt, mt = v
    layers[":".join(v)] = TunedMoE.from_module(
        ref,
        backends=("tvm",),
        db=False,
        configs={f"experts.{op}": KernelConfig.of("tvm", {"nt": int(nt), "mt": int(mt), "order": "panels_outer"})},
    )
xs = [torch.randn(t, cfg.hidden_size).bfloat16() for _ in range(16)]
times = {k: [] for k in layers}
for l in layers.values():
    l(xs[0])
    l(xs[1])
for _r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 5):
    for k, l in layers.items():
        for x in xs:
            t0 = time.perf_counter()
            l(x)
            times[k].append(time.perf_counter() - t0)
for k in layers:
    print(t, k, f"p50 {statistics.median(times[k]) * 1e3:.3f} ms", flush=True)
