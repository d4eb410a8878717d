"""Hot vs cold per-op p50 of a qwen3-30b-a3b layer at T (ARGV[2]) in format ARGV[1] (fp32/bf16 dtype or a quant
format on fp32): "hot" repeats one input (its 8 experts' weights stay in L2/L3: the kernels' compute time),
"cold" rotates 64 inputs (the weights stream from memory). Interleaved rounds, p50 of each op."""

import statistics
import sys

import torch
from op_timer import label, times

from moetune.autotune.bench.layer import reference_layer
from moetune.model import MoEConfig, TunedMoE
from moetune.model.config.presets import PRESETS

torch.set_num_threads(2)
fmt, t = sys.argv[1], int(sys.argv[2])
dtype = "bfloat16" if fmt == "bf16" else "float32"
quant = fmt if fmt not in ("fp32", "bf16") else "none"
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": dtype, "quant": quant})
layer = TunedMoE.from_module(
    reference_layer(cfg), backends=("tvm",), db=False, quant=None if quant == "none" else quant
)
layer.pack_weights()
xs = [torch.randn(t, 2048).to(cfg.torch_dtype) for _ in range(64 if t <= 16 else 8)]
for _r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 4):
    label[0] = "cold"
    for x in xs:
        layer(x)
    label[0] = "hot"
    for _ in range(len(xs)):
        layer(xs[0])
ops = ("route", "align", "experts.gemm1", "experts.gemm2")
for m in ("hot", "cold"):
    print(
        fmt, f"T={t}", m, " ".join(f"{op.split('.')[-1]} {statistics.median(times[(m, op)]) * 1e3:.3f}" for op in ops)
    )
