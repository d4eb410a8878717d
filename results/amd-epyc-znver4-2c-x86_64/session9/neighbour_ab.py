"""What slows a moetune layer call when another implementation runs between its calls: qwen3-30b-a3b at T
(ARGV[2]) in format ARGV[1]; the tvm layer is timed after each of: nothing (back to back), a 2 ms sleep, a
torch matmul, ggml's layer (the bench's anchor); ROUNDS (ARGV[3]) x 32 calls per pattern, patterns interleaved.
Run with ../../intel-r-xeon-r-processor-emeraldrapids-2c-x86_64 on PYTHONPATH (its op_timer.py)."""

import statistics
import sys
import time

import torch
from op_timer import label
from op_timer import times as op_times
from point_ab import setup

from moetune.autotune.bench.ggml import GgmlMoE
from moetune.model import TunedMoE

fmt, t, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg, ref, quant = setup(fmt)
layer = TunedMoE.from_module(ref, backends=("tvm",), db=False, quant=quant)
layer.pack_weights()
gg = GgmlMoE(ref)
a, b = torch.randn(512, 512), torch.randn(512, 512)
between = {
    "back-to-back": lambda x: None,
    "sleep 2 ms": lambda x: time.sleep(0.002),
    "torch matmul": lambda x: [a @ b for _ in range(4)],
    "ggml layer": lambda x: gg(x),
}
xs = [torch.randn(t, 2048).to(cfg.torch_dtype) for _ in range(32)]
times = {k: [] for k in between}
with torch.no_grad():
    for r in range(rounds + 1):
        for name, other in between.items():
            label[0] = name if r else None
            for x in xs:
                other(x)
                t0 = time.perf_counter()
                layer(x)
                if r:
                    times[name].append(time.perf_counter() - t0)
ops = sorted({op for (n, op) in op_times if n is not None})
for name, v in times.items():
    per_op = " ".join(f"{op} {statistics.median(op_times[(name, op)]) * 1e3:.3f}" for op in ops)
    print(f"{fmt} T={t} tvm layer after {name:14s} p50 {statistics.median(v) * 1e3:.3f} ms; {per_op}", flush=True)
