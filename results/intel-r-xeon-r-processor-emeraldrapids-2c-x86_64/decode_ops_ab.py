"""Per-op p50 (gemm1, gemm2) of qwen3-30b-a3b layers at T (ARGV[1]), fp32 and bf16 variants side by side.

Variants (ARGV[2], comma-separated): fp32 (defaults), bf16 (defaults: vdpbf16ps where the target has it),
bf16te (the widening TE kernels forced), bf16:NT[:PF] (vdpbf16ps, both GEMMs at panel width NT, mt 1,
prefetch PF KiB, default 0).
32 inputs x ROUNDS (ARGV[3]) interleaved per round; routing differs per input, so weights stream from memory.
"""

import statistics
import sys
import time

import torch
from op_timer import label, times

from moetune.autotune.bench.layer import reference_layer
from moetune.kernels.registry import KernelConfig
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS
from moetune.schedules import tvm_cpu

torch.set_num_threads(2)
t = int(sys.argv[1])
names = sys.argv[2].split(",")
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
real = tvm_cpu.dot_kernel
refs = {dt: reference_layer(MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": dt})) for dt in ("float32", "bfloat16")}
layers, forced_te = {}, set()
for name in names:
    dt = "float32" if name == "fp32" else "bfloat16"
    configs = None
    if name.startswith("bf16:"):
        parts = name.split(":")  # bf16:NT[:PF]
        nt, pf = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
        cfg = KernelConfig.of("tvm", {"nt": nt, "mt": 1, "order": "panels_outer", "pf": pf})
        configs = {"experts.gemm1": cfg, "experts.gemm2": cfg}
    if name == "bf16te":
        forced_te.add(name)
        tvm_cpu.dot_kernel = lambda p, tg: None
    layers[name] = TunedMoE.from_module(refs[dt], backends=("tvm",), db=False, configs=configs)
    layers[name].pack_weights()
    tvm_cpu.dot_kernel = real
xs = [torch.randn(t, 2048) for _ in range(32)]
for _r in range(rounds + 1):
    for name, layer in layers.items():
        label[0] = name
        tvm_cpu.dot_kernel = (lambda p, tg: None) if name in forced_te else real
        for x in xs:
            t0 = time.perf_counter()
            layer(x.to(torch.float32 if name == "fp32" else torch.bfloat16))
            times[(name, "layer")].append(time.perf_counter() - t0)
        tvm_cpu.dot_kernel = real
    if _r == 0:
        times.clear()  # warm-up round
for name in layers:
    row = {op: statistics.median(times[(name, op)]) * 1e3 for op in ("experts.gemm1", "experts.gemm2", "layer")}
    print(
        f"T={t} {name:8s} gemm1 {row['experts.gemm1']:.3f} gemm2 {row['experts.gemm2']:.3f} layer {row['layer']:.3f} ms"
    )
