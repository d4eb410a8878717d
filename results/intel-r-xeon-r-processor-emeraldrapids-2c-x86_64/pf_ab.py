"""A/B of the dot-product kernels' software prefetch distance: qwen3-30b-a3b at T (ARGV[2]) in format ARGV[1]
(bf16 or w8a8 / w4a8 on fp32; fp32 runs the TE kernels, which have no pf), both GEMMs at their default config
with pf = each of ARGV[4] (KiB, comma-separated; NT:PF also sets both panel widths to NT, mt 1; NT:PF:ORDER
also the order, NT 0 keeping the default width). 64 rotating
inputs (8 at T > 16: the weights stream from memory), ROUNDS (ARGV[3]) rounds, the variants interleaved call by
call, each on another input; per-op and layer p50 ms."""

import statistics
import sys
import time

import torch
from op_timer import label, times

from moetune.autotune.bench.layer import reference_layer
from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels.registry import KernelConfig, default_config
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS

torch.set_num_threads(2)
fmt, t = sys.argv[1], int(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
dtype = "bfloat16" if fmt == "bf16" else "float32"
quant = fmt if fmt not in ("fp32", "bf16") else "none"
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": dtype, "quant": quant})
ref = reference_layer(cfg)
host = resolve_target("cpu")
program = lower(cfg, t)
layers = {}
for variant in sys.argv[4].split(","):  # PF or NT:PF (both GEMMs at panel width NT, mt 1)
    configs = {}
    for op in ("experts.gemm1", "experts.gemm2"):
        point = default_config(program.op(op), "tvm", host).as_dict()
        parts = variant.split(":")  # PF | NT:PF | NT:PF:ORDER (NT 0: the default width)
        if len(parts) > 1 and int(parts[0]):
            point = {**point, "nt": int(parts[0]), "mt": 1}
        if len(parts) > 2:
            point = {**point, "order": parts[2]}
        configs[op] = KernelConfig.of("tvm", {**point, "pf": int(parts[1] if len(parts) > 1 else parts[0])})
    order = f"pf={variant}"
    layers[order] = TunedMoE.from_module(
        ref, backends=("tvm",), db=False, configs=configs, quant=None if quant == "none" else quant
    )
    layers[order].pack_weights()
print({op: default_config(program.op(op), "tvm", host).as_dict() for op in ("experts.gemm1", "experts.gemm2")})
xs = [torch.randn(t, 2048).to(cfg.torch_dtype) for _ in range(64 if t <= 16 else 8)]
for r in range(rounds + 1):  # variants interleaved call by call, each on another input (no shared cache lines)
    for i in range(len(xs)):
        for v, (name, layer) in enumerate(layers.items()):
            label[0] = name
            x = xs[(i + v * len(xs) // len(layers)) % len(xs)]
            t0 = time.perf_counter()
            layer(x)
            times[(name, "layer")].append(time.perf_counter() - t0)
    if r == 0:
        times.clear()
for name in layers:
    row = " ".join(
        f"{op.split('.')[-1]} {statistics.median(times[(name, op)]) * 1e3:.3f}"
        for op in ("experts.gemm1", "experts.gemm2", "layer")
    )
    print(f"{fmt} T={t} {name:13s} {row}", flush=True)
