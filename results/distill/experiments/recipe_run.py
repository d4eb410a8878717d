"""One recipe of results/distill/recipes.md: distill() with keyword arguments given as JSON, one JSON row out.

Usage: OMP_NUM_THREADS=1 .venv/bin/python results/distill/experiments/recipe_run.py '{"experts": 40, "top_k": 8}' TAG
Defaults here: 2048 layer-wise texts, 256 held-out texts (the session-7 rows); the row is also appended to
recipe_runs.jsonl beside this file.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from moetune.model.distill.pipeline import distill

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
kw = json.loads(sys.argv[1])
tag = sys.argv[2]
kw.setdefault("layerwise_texts", 2048)
kw.setdefault("eval_texts", 256)
t0 = time.time()


def progress(info):
    if info.get("phase") in ("layerwise", "moefy"):
        print(tag, info, f"{time.time() - t0:.0f}s", flush=True)


_, rep = distill("minilm", progress=progress, **kw)
held = rep["heldout"]
row = {
    "tag": tag,
    "kw": kw,
    **{k: held[k] for k in ("cosine_mean", "cosine_p05", "retrieval_at10")},
    "moefy_cos": rep["heldout_after_moefy"]["cosine_mean"],
    "flops": rep["ffn_flops_ratio"],
    "min": (time.time() - t0) / 60,
    "lw": [round(r["rel_err_after"], 3) for r in rep["layerwise"]],
}
print(json.dumps(row), flush=True)
with (Path(__file__).parent / "recipe_runs.jsonl").open("a") as f:
    f.write(json.dumps(row) + "\n")
