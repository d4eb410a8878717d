"""The default distillation recipe of `moetune distill` (and of distill()), in one place; no heavy imports.

How it was chosen: results/distill/recipes.md (each recipe measured on the fixed held-out split).
"""

from __future__ import annotations

RECIPE = {
    "experts": 40,  # routed experts per FFN (32 neurons each: two AVX-512 vectors, no partial kernel panel)
    "top_k": 8,  # routed experts per token
    "shared": None,  # always-on shared expert width; None: default_shared() (1/6 of the FFN, 256 on MiniLM)
    "steps": 0,  # end-to-end KD steps after the layer-wise stage (50 measured -0.002: recipes.md row 15)
    "layerwise_texts": 12800,  # all 12,721 fortunes of the training split
    "layerwise_epochs": 3,
    "layerwise_lr": 3e-3,
    "extra_texts": 0,  # training texts from manual pages / package docs (model/distill/text.py) beside fortunes
}


def default_shared(intermediate: int, experts: int) -> int:
    """The shared expert's width when none is given: about 1/6 of the FFN, rounded up so that E divides the rest
    (0 if that leaves nothing to route)."""
    shared = intermediate // 6
    shared += (intermediate - shared) % experts
    return shared if shared < intermediate else 0
