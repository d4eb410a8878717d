"""A/B of schedule points for qwen3-30b-a3b's expert GEMMs at T (ARGV[2]) in format ARGV[1] (fp32, bf16, int8,
int4, w8a8, w4a8): each variant (ARGV[4], ';'-separated; each a ','-separated list of key=value overriding both
GEMMs' default points, "default" for none) is one layer; ROUNDS (ARGV[3]) rounds over 64 rotating inputs (8 at
T > 16), the variants interleaved call by call, each on another input; per-op and layer p50 ms.
Run with ../../intel-r-xeon-r-processor-emeraldrapids-2c-x86_64 on PYTHONPATH (its op_timer.py)."""

import statistics
import sys
import time

import torch

from moetune.autotune.bench.layer import reference_layer
from moetune.model import MoEConfig
from moetune.model.config.presets import PRESETS

OPS = ("experts.gemm1", "experts.gemm2")


def setup(fmt: str):
    """(config, reference layer, quant format or None) of qwen3-30b-a3b in `fmt`, 2 threads."""
    torch.set_num_threads(2)
    dtype = "bfloat16" if fmt == "bf16" else "float32"
    quant = fmt if fmt not in ("fp32", "bf16") else "none"
    cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": dtype, "quant": quant})
    return cfg, reference_layer(cfg), None if quant == "none" else quant


def main() -> None:
    from op_timer import label, times

    from moetune.ir.program import lower
    from moetune.ir.target import resolve_target
    from moetune.kernels.registry import KernelConfig, default_config
    from moetune.model import TunedMoE

    fmt, t, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg, ref, quant = setup(fmt)
    program, host = lower(cfg, t), resolve_target("cpu")
    defaults = {op: default_config(program.op(op), "tvm", host).as_dict() for op in OPS}
    print(defaults)
    layers = {}
    for variant in sys.argv[4].split(";"):
        pairs = [kv.split("=") for kv in variant.split(",") if kv != "default"]
        over = {k: int(v) if v.isdigit() else v for k, v in pairs}
        configs = {op: KernelConfig.of("tvm", {**defaults[op], **over}) for op in OPS}
        layers[variant] = TunedMoE.from_module(ref, backends=("tvm",), db=False, configs=configs, quant=quant)
        layers[variant].pack_weights()
    xs = [torch.randn(t, cfg.hidden_size).to(cfg.torch_dtype) for _ in range(64 if t <= 16 else 8)]
    for r in range(rounds + 1):  # the first round warms up
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
            f"{op.split('.')[-1]} {statistics.median(times[(name, op)]) * 1e3:.3f}" for op in (*OPS, "layer")
        )
        print(f"{fmt} T={t} {name:28s} {row}", flush=True)


if __name__ == "__main__":
    main()
