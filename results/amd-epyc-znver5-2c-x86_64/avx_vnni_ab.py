"""A/B on this host: qwen3-30b-a3b (full size, fp32 activations) w8a8 / w4a8 compiled for an AVX2 + AVX-VNNI CPU
(-mcpu=alderlake): the 8-lane vpdpbusd kernels vs the weight-only fallback they replace there (dequantizing
codes on the int8-quantized inputs' values), interleaved, p50 ms over 8 inputs x rounds."""

import statistics
import sys
import time

import torch

from moetune.autotune.bench.layer import reference_layer
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS
from moetune.schedules import tvm_cpu

torch.set_num_threads(2)
fmt, tokens, rounds = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3])
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": "float32"})
target = "llvm -mcpu=alderlake"
real = tvm_cpu.dot_kernel
layers = {}
for name in ("fallback", "vnni256"):
    ref = reference_layer(cfg)
    layers[name] = TunedMoE.from_module(ref, quant=fmt, target=target, backends=("tvm",), db=False)
    del ref


def run(name, x):
    tvm_cpu.dot_kernel = real if name == "vnni256" else (lambda p, t: None)
    try:
        start = time.perf_counter()
        out = layers[name](x)
        return time.perf_counter() - start, out
    finally:
        tvm_cpu.dot_kernel = real


for t in tokens:
    xs = [torch.randn(t, cfg.hidden_size) for _ in range(8)]
    times = {n: [] for n in layers}
    outs = {n: run(n, xs[0])[1] for n in layers}
    for _ in range(rounds):
        for n in layers:
            for x in xs:
                times[n].append(run(n, x)[0])
    err = ((outs["vnni256"] - outs["fallback"]).norm() / outs["fallback"].norm()).item()
    p50 = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(
        f"{fmt} T={t}: fallback {p50['fallback']:.2f} ms, vnni256 {p50['vnni256']:.2f} ms, "
        f"{p50['fallback'] / p50['vnni256']:.2f}x, rel diff {err:.1e}",
        flush=True,
    )
