"""Drop moetune into existing models: `patch(model)` and transformers' `experts_implementation="moetune"`.

patch(model, target=..., db=...)
    Walks `model` and replaces every MoE block (a moetune MoE, or a Hugging Face block of a supported family)
    by `TunedMoE.from_module(block)` in place. The TunedMoE adopts the block's children, so the model's
    parameters, state_dict keys and the block's return value stay the same. Returns {qualified name: TunedMoE}.

register_hf(target=..., db=...)
    Registers "moetune" in transformers' ExpertsInterface, so that
        AutoModelForCausalLM.from_config(cfg, experts_implementation="moetune")     (or from_pretrained)
    runs each experts module through moetune's align -> gemm1 -> gemm2 kernels, on the routing that the HF
    router computed. The routers, shared experts and the rest of the model stay HF's. Llama 4's experts class
    does not go through transformers' interface (it computes every expert densely), so for Llama 4 the whole
    Llama4TextMoe block switches to TunedMoE when its config asks for "moetune".

Both are inference paths (no backward) and do not record router logits for auxiliary losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moetune.kernels.registry import BACKENDS
from moetune.model.config import MoEConfig
from moetune.model.hf.blocks import SUPPORTED_BLOCKS
from moetune.model.moe import MoE

IMPLEMENTATION = "moetune"
_SETTINGS: dict[str, Any] = {"target": "cpu", "db": None, "configs": None, "backends": BACKENDS}


def _is_moe_block(module: nn.Module) -> bool:
    return isinstance(module, MoE) or type(module).__name__ in SUPPORTED_BLOCKS


def patch(
    model: nn.Module,
    target: str = "cpu",
    db: Any = None,
    configs: dict | None = None,
    backends: tuple[str, ...] = BACKENDS,
    pack: bool = True,
    quant: str | None = None,
    quant_group: int | None = None,
) -> dict[str, nn.Module]:
    """Swap every MoE block of `model` for a TunedMoE in place; returns {qualified name: TunedMoE}.

    `pack`: store each layer's routed experts once, packed for the CPU kernels (TunedMoE.pack_weights), so
    the patched model needs no more memory than the original; a no-op on a GPU target.
    `quant` ("int8" / "int4"): quantize every layer's routed experts in place (TunedMoE.from_module), with
    `quant_group` weights per scale (default 32 on a CPU, 128 on a GPU). Every layer's format is checked before
    the first one changes."""
    from moetune.ir.target import resolve_target
    from moetune.model.hf.blocks import hf_block_config
    from moetune.model.runtime.plan import runtime_db
    from moetune.model.runtime.tuned import TunedMoE

    if _is_moe_block(model):
        raise ValueError(
            f"patch() swaps the MoE blocks inside a model; for a lone {type(model).__name__} use "
            "TunedMoE.from_module(block)"
        )
    found = [(name, m) for name, m in model.named_modules() if name and _is_moe_block(m)]
    if not found:
        if any(isinstance(m, TunedMoE) for m in model.modules()):
            return {}  # already patched
        raise ValueError(
            f"no MoE block found in {type(model).__name__}; patch() swaps moetune MoE modules and the Hugging Face "
            f"blocks {', '.join(SUPPORTED_BLOCKS)}"
        )
    kind = resolve_target(target).kind
    for _, block in found:  # a bad format or group is reported before any block changes
        (block.cfg if isinstance(block, MoE) else hf_block_config(block)).quantized(quant, quant_group, kind)
    _warn_spinning_openmp(target, backends)
    handle = runtime_db(db)  # one connection for every block
    handle = False if handle is None else handle
    swapped: dict[str, nn.Module] = {}
    for name, block in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        tuned = TunedMoE.from_module(
            block, target=target, configs=configs, backends=backends, db=handle, quant=quant, quant_group=quant_group
        )
        setattr(parent, attr, tuned)
        if pack:
            tuned.pack_weights()
        swapped[name] = tuned
    return swapped


_WARNED: set[str] = set()


def _warn_spinning_openmp(target: str, backends: tuple[str, ...]) -> None:
    """Once per process: inside a model, torch's OpenMP threads busy-wait after every torch op (attention, norms)
    and take the cores from the TVM kernels' threads. Measured on the Zen4 host (results/amd-epyc-znver4-2c-x86_64):
    a patched 2-layer Qwen3-MoE decoded at 32.4 ms/token, 19.9 ms with OMP_WAIT_POLICY=PASSIVE. The variable is
    read when torch loads its OpenMP runtime, so only the user can set it (before Python starts)."""
    import os
    import warnings

    from moetune.ir.target import resolve_target

    if "spin" in _WARNED or "tvm" not in backends or os.environ.get("OMP_WAIT_POLICY") or torch.get_num_threads() < 2:
        return
    if resolve_target(target).kind != "cpu":
        return
    _WARNED.add("spin")
    warnings.warn(
        "moetune: torch's OpenMP threads spin between ops and slow moetune's CPU kernels inside a model (decode "
        "1.6x slower measured); start Python with OMP_WAIT_POLICY=PASSIVE",
        stacklevel=3,
    )


# ---- transformers' experts interface ------------------------------------------------------------------------------
def _experts_config(experts: nn.Module, top_k: int) -> MoEConfig:
    """The routed part of the model's MoEConfig, in the dtype of the experts' weights."""
    cfg = MoEConfig.from_hf(experts.config)
    if cfg.top_k != top_k:
        cfg = cfg.replace(top_k=top_k)
    dtype = str(experts.gate_up_proj.dtype).removeprefix("torch.")
    return cfg.replace(dtype=dtype, num_shared_experts=0, shared_intermediate_size=0, shared_expert_gate=False)


def moetune_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts signature: (T, H), ids (T, K), weights (T, K) -> (T, H), on moetune's kernels."""
    from moetune.model.runtime.tuned import HFExpertsRunner

    runner = self.__dict__.get("_moetune")
    if runner is None:
        cfg = _experts_config(self, top_k_index.shape[-1])
        layout = (getattr(self, "is_concatenated", True), getattr(self, "is_transposed", False))
        runner = HFExpertsRunner(self, cfg, *layout, **_SETTINGS)
        runner.pack_weights()  # the experts stored once, packed for the CPU kernels (a no-op on a GPU)
        self.__dict__["_moetune"] = runner  # not a child: the model's state_dict stays HF's
    return runner.run_experts(hidden_states, top_k_weights, top_k_index).to(hidden_states.dtype)


def _wrap_llama4() -> None:
    try:
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    except ImportError:  # an older transformers without Llama 4
        return
    if getattr(Llama4TextMoe, "_moetune_wrapped", False):
        return
    init, forward = Llama4TextMoe.__init__, Llama4TextMoe.forward

    def __init__(self, config, *args, **kwargs):
        init(self, config, *args, **kwargs)
        self.__dict__["_moetune_hf_config"] = config

    def moe_forward(self, hidden_states):
        config = self.__dict__.get("_moetune_hf_config")
        if getattr(config, "_experts_implementation", None) != IMPLEMENTATION:
            return forward(self, hidden_states)
        runner = self.__dict__.get("_moetune")
        if runner is None:
            from moetune.model.runtime.tuned import TunedMoE

            runner = TunedMoE.from_module(self, **_SETTINGS)
            self.__dict__["_moetune"] = runner
        return runner(hidden_states)

    Llama4TextMoe.__init__, Llama4TextMoe.forward = __init__, moe_forward
    Llama4TextMoe._moetune_wrapped = True


def register_hf(
    target: str = "cpu", db: Any = None, configs: dict | None = None, backends: tuple[str, ...] = BACKENDS
) -> None:
    """Register "moetune" as a transformers experts implementation (idempotent; the last settings win for
    modules that have not run yet)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        raise ImportError("register_hf needs transformers >= 5 (pip install 'moetune[hf]')") from None
    from moetune.ir.target import resolve_target
    from moetune.model.runtime.plan import runtime_db

    handle = runtime_db(db)
    _SETTINGS.update(target=resolve_target(target), db=False if handle is None else handle, configs=configs)
    _SETTINGS["backends"] = backends
    ExpertsInterface.register(IMPLEMENTATION, moetune_experts_forward)
    _wrap_llama4()
