import itertools
import statistics
import sys
import time

import torch

from moetune.autotune.bench.layer import reference_layer
from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.registry import KernelConfig, backend_info, default_config, get_impl
from moetune.model import MoEConfig
from moetune.model.config.presets import PRESETS

torch.set_num_threads(2)
HOST = resolve_target("cpu")
t = int(sys.argv[1])
ops = sys.argv[2].split(",")
cfg = MoEConfig(**{**PRESETS["qwen3-30b-a3b"], "dtype": "bfloat16"})
layer = reference_layer(cfg)
program = lower(cfg, t)
x = torch.randn(t, cfg.hidden_size).bfloat16()
al = ref.align(*layer.route(x), cfg.num_experts, program.block_m)
ex = layer.experts
print("BM", program.block_m, "NB", al.num_blocks)
act = None
for opn in ops:
    g = program.op(f"experts.{opn}")
    sp = backend_info("tvm").space(g, HOST)
    d = default_config(g, "tvm", HOST).as_dict()
    pts = [
        dict(zip(("nt", "mt", "order"), v, strict=False))
        for v in itertools.product((16, 32, 64), (1, 2, 3, 4, 6, 8), ("panels_outer", "blocks_outer"))
    ]
    pts = [p for p in pts if sp.is_feasible(p)]
    for p in pts:
        c = KernelConfig.of("tvm", p)
        if opn == "gemm1":

            def fn(g=g, c=c):
                return get_impl("gemm1", "tvm").fn(g, c, HOST, x, al, ex.gate_up_proj, None)
        else:
            a = torch.randn(al.num_blocks, program.block_m, cfg.intermediate_size).bfloat16()

            def fn(g=g, c=c, a=a):
                return get_impl("gemm2", "tvm").fn(g, c, HOST, a, al, ex.down_proj, None)

        fn()
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        print(opn, p, f"{statistics.median(ts) * 1e3:.2f} ms", "DEFAULT" if p == d else "", flush=True)
