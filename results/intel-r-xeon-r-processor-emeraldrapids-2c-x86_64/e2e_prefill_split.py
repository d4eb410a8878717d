"""Where a patched 4-layer Qwen3-MoE model's prefill (256 tokens, fp32) goes: time inside the MoE blocks (forward
hooks) vs the rest, for hf-grouped_mm and for the model after `patch` (untuned defaults), alternating rounds."""

import statistics
import sys
import time

import torch

from moetune.autotune.bench.e2e import causal_lm
from moetune.model import MoEConfig, patch
from moetune.model.config.presets import PRESETS
from moetune.model.runtime.inplace import unpack_in_place  # noqa: F401  (the e2e bench's own restore path)

torch.set_num_threads(2)
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 256
cfg = MoEConfig(**PRESETS["qwen3-30b-a3b"])
model = causal_lm(cfg, 4).eval()
model.config._experts_implementation = "grouped_mm"
prompt = torch.randint(0, 8192, (1, tokens))
moe_s = []


def timed(model, label):
    blocks = [m for n, m in model.named_modules() if n.endswith("mlp")]
    starts = {}

    def before(m, a):
        starts[id(m)] = time.perf_counter()

    def after(m, a, o):
        moe_s.append(time.perf_counter() - starts[id(m)])

    hooks = [b.register_forward_pre_hook(before) for b in blocks] + [b.register_forward_hook(after) for b in blocks]
    with torch.no_grad():
        model(prompt)
        rows = []
        for _ in range(3):
            moe_s.clear()
            t0 = time.perf_counter()
            model(prompt)
            total = time.perf_counter() - t0
            rows.append((total, sum(moe_s)))
    for h in hooks:
        h.remove()
    total, moe = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    rest = total - moe
    print(
        f"{label:14s} T={tokens} total {total * 1e3:7.1f} ms  MoE blocks {moe * 1e3:7.1f} ms  rest {rest * 1e3:7.1f} ms"
    )


timed(model, "hf-grouped_mm")
patch(model, db=False)
timed(model, "patched")

# the routing the MoE blocks saw in this prefill: experts touched and the busiest expert's rows, per layer
seen = []
blocks = [m for n, m in model.named_modules() if n.endswith("mlp")]
hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))) for b in blocks]
with torch.no_grad():
    model(prompt)
for h in hooks:
    h.remove()
for layer, (block, x) in enumerate(zip(blocks, seen, strict=True)):
    router = block.router if hasattr(block, "router") else block.gate
    w = router.weight if hasattr(router, "weight") else router.gate.weight
    ids = torch.topk(x.float() @ w.float().T, cfg.top_k, dim=-1).indices
    counts = torch.bincount(ids.flatten(), minlength=cfg.num_experts)
    touched = int((counts > 0).sum())
    print(f"layer {layer}: {touched} of {cfg.num_experts} experts touched, max rows {int(counts.max())}")
