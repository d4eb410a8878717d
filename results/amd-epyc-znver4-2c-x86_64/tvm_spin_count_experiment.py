"""One process: a qwen3-30b-a3b layer (fp32, full size) on default TVM kernels, alone and with torch ops between.

Run once per setting, settings interleaved over rounds (see RESULTS.md):
    TVM_THREAD_POOL_SPIN_COUNT=<n> python tvm_spin_count_experiment.py >> tvm_spin_count_experiment.jsonl
"""

import json
import os
import statistics
import time

import torch

from moetune.model import MoE, MoEConfig, TunedMoE


def p50_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ref = MoE(MoEConfig.preset("qwen3-30b-a3b", dtype="float32"))
    all_tvm = TunedMoE.from_module(ref, db=False)
    mixed = TunedMoE.from_module(ref, db=False, configs={"route": {"backend": "torch"}})  # torch between TVM ops
    dense = torch.nn.Linear(2048, 2048)  # a torch op like attention's projections, between two layers
    out = {"spin": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "default")}
    with torch.no_grad():
        for t in (1, 16, 256):
            x = torch.randn(t, 2048)
            calls = 30 if t < 256 else 8
            out[f"tvm T={t}"] = p50_ms(lambda x=x: all_tvm(x), calls)
            out[f"mixed T={t}"] = p50_ms(lambda x=x: mixed(x), calls)
            out[f"model-like T={t}"] = p50_ms(lambda x=x: dense(all_tvm(dense(x))), calls)
            out[f"torch-only T={t}"] = p50_ms(lambda x=x: dense(dense(x)), calls)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
