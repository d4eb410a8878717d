"""TunedMoE: the drop-in MoE layer on tuned kernels, and where its weights come from.

Same constructor input (an MoEConfig), same forward signature, same parameter names and state_dict keys as
model.MoE. The kernels are chosen and run by a LayerRunner (plan.py); this module only adapts the weights'
owner to it. Three owners, one small adapter each:
  _OwnParameters   a moetune MoE's children (router, experts, shared_expert), shared with it or fresh:
                   the kernels read the parameters themselves
  _HFBlock         a Hugging Face MoE block whose children the TunedMoE adopts under their own names (gate or
                   router, experts, shared_expert(s), ...), so the model's state_dict and checkpoints are
                   unchanged; the kernels read views of them, or for gpt-oss's interleaved experts and the HF
                   shared MLPs a converted copy, memoised until a parameter changes (kernels/cache.py); forward
                   returns what the block returns (gpt-oss and Llama 4 return a pair: model/hf/blocks.py)
  HFExpertsRunner  transformers' experts interface: runs align -> gemm1 -> gemm2 on HF's routing, reading an HF
                   experts module that stays the weights' only owner (no nn.Module, no state_dict entries)
Inference only: the kernels have no backward, so forward runs under no_grad.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moetune.kernels.cache import TensorMemo
from moetune.kernels.registry import BACKENDS
from moetune.model.config import MoEConfig
from moetune.model.hf.blocks import SUPPORTED_BLOCKS, block_returns, experts_weights, hf_block_config, hf_block_weights
from moetune.model.moe import Experts, MoE, Router, SharedExpert
from moetune.model.runtime.inplace import pack_in_place
from moetune.model.runtime.plan import ConfigSpec, LayerRunner, Weights


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _check_input(x: Any, hidden: int, dtype: torch.dtype) -> None:
    """The layer's input, named as the input: its shape (..., H), a real tensor, the weights' dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != hidden:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"TunedMoE expects x[..., {hidden}], got {shape}")
    if x.is_meta:
        raise ValueError("TunedMoE input x is a meta tensor (no data); materialise the model and its inputs first")
    if x.dtype != dtype:
        raise ValueError(f"TunedMoE input x is {x.dtype} but the layer's weights are {dtype}; cast x.to({dtype})")


class _OwnParameters:
    """Weights of a moetune MoE's children: the parameters and buffers themselves, under their state_dict names."""

    def weights(self, layer: nn.Module) -> Weights:
        out: Weights = {}
        for prefix in ("router", "experts", "shared_expert"):
            child = getattr(layer, prefix)
            if child is not None:
                out.update({f"{prefix}.{k}": v for k, v in child.__dict__["_parameters"].items()})
                out.update({f"{prefix}.{k}": v for k, v in child.__dict__["_buffers"].items()})
        return out

    def returns(self, out: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor, w: Weights) -> Any:
        return out


class _HFBlock:
    """Weights of an adopted HF block's children, converted to moetune's layout and memoised on their versions."""

    def __init__(self, kind: str):
        self.kind = kind
        self.returns = block_returns(kind)
        self._memo = TensorMemo()

    def weights(self, layer: nn.Module) -> Weights:
        def convert() -> Weights:
            with torch.no_grad():
                return hf_block_weights(layer, layer.cfg, kind=self.kind)

        return self._memo.get(_tensors(layer), convert)

    def forget(self) -> None:
        """Drop the memoised conversion (it holds views of the parameters as they were)."""
        self._memo = TensorMemo()


class TunedMoE(nn.Module):
    """MoE layer on tuned (or default) kernels: forward(x[..., H]) -> same shape and dtype."""

    def __init__(
        self,
        cfg: MoEConfig,
        target: str = "cpu",
        configs: dict[str, ConfigSpec] | None = None,
        backends: tuple[str, ...] = BACKENDS,
        db: Any = None,
    ):
        """Fresh parameters, initialised like MoE's (from_module shares a module's parameters instead)."""
        super().__init__()
        self.cfg = cfg
        self.runner = LayerRunner(cfg, target, configs, backends, db)
        self._owner: _OwnParameters | _HFBlock = _OwnParameters()
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_expert = SharedExpert(cfg) if cfg.num_shared_experts else None
        if cfg.quant != "none":
            self.pack_weights()  # codes + scales in the kernels' layout

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        target: str = "cpu",
        configs: dict[str, ConfigSpec] | None = None,
        backends: tuple[str, ...] = BACKENDS,
        db: Any = None,
        quant: str | None = None,
        quant_group: int | None = None,
    ) -> TunedMoE:
        """A TunedMoE sharing `module`'s parameters (no copy), same state_dict keys and values.

        `module`: a moetune MoE or TunedMoE, or a Hugging Face MoE block of a supported family.
        `quant` ("int8" / "int4"): the routed experts' weights are quantized in place (kernels/quant.py; the
        module's own parameters become the codes, so its memory drops 4x / 8x in fp32), `quant_group` weights per
        scale (default: 32 on a CPU, 128 on a GPU). A quantized module's format is kept as it is."""
        if isinstance(module, TunedMoE):
            module = module.as_moe()
        if isinstance(module, MoE):
            cfg, children, owner = module.cfg, module.named_children(), _OwnParameters()
        elif type(module).__name__ in SUPPORTED_BLOCKS:
            cfg, children, owner = hf_block_config(module), module.named_children(), _HFBlock(type(module).__name__)
        else:
            raise ValueError(
                f"TunedMoE.from_module takes a moetune MoE or a Hugging Face MoE block "
                f"({', '.join(SUPPORTED_BLOCKS)}), got {type(module).__name__}"
            )
        runner = LayerRunner(cfg, target, configs, backends, db)
        cfg = cfg.quantized(quant, quant_group, runner.target.kind)
        if cfg is not runner.cfg:
            runner = LayerRunner(cfg, target, configs, backends, db)
        tuned = cls.__new__(cls)
        nn.Module.__init__(tuned)
        tuned.cfg, tuned._owner, tuned.runner = cfg, owner, runner
        for name, child in children:
            tuned.add_module(name, child)
        if isinstance(owner, _OwnParameters) and "shared_expert" not in tuned._modules:
            tuned.shared_expert = None  # an MoE without a shared expert has no such child
        if quant is not None:
            tuned.pack_weights()  # quantized now, in the kernels' layout (a quantized module's are laid out on use)
        return tuned

    def as_moe(self) -> MoE:
        """A reference MoE sharing this layer's parameters (only for a TunedMoE of moetune's own layout)."""
        if not isinstance(self._owner, _OwnParameters):
            raise ValueError(
                f"TunedMoE.from_module: this TunedMoE wraps a {self._owner.kind} block; pass the block itself"
            )
        moe = MoE.__new__(MoE)
        nn.Module.__init__(moe)
        moe.cfg, moe.router, moe.experts, moe.shared_expert = self.cfg, self.router, self.experts, self.shared_expert
        return moe

    # ---- what the runner knows --------------------------------------------------------------------------------
    @property
    def target(self):
        return self.runner.target

    @property
    def db(self):
        return self.runner.db

    @property
    def hf_block_kind(self) -> str | None:
        """The class name of the Hugging Face block whose children this layer adopted, None for moetune's own."""
        return getattr(self._owner, "kind", None)

    def weights(self) -> Weights:
        """moetune state_dict name -> tensor in moetune's layout (model/moe.py), or None where absent."""
        return self._owner.weights(self)

    def pack_weights(self) -> dict[str, tuple[int, int | None]]:
        """Store the routed experts' weights once, in the CPU kernels' panel layout, in place of the parameters
        (model/runtime/inplace.py): the layer's memory drops to about its weights' size, state_dict and
        load_state_dict keep working. Returns {weight name: (panel, interleave)}; {} off the tvm backend."""
        weights = self.weights()
        done = pack_in_place(self, weights, self.runner)
        del weights
        if isinstance(self._owner, _HFBlock):
            self._owner.forget()
        return done

    def plan(self, m_tokens: int):
        """The lowered program for a batch of m_tokens and the kernel chosen for each op (plan.Plan)."""
        return self.runner.plan(m_tokens)

    def describe(self, m_tokens: int) -> list[dict[str, Any]]:
        """Per op: name, problem signature, backend, config and where it came from (config/db:.../default)."""
        return self.runner.describe(m_tokens)

    # ---- running ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        w = self.weights()
        _check_input(x, self.cfg.hidden_size, w["router.weight"].dtype)
        x2 = x.reshape(-1, self.cfg.hidden_size)
        if x2.shape[0] == 0:  # no tokens: the empty output the reference returns (the kernels need T >= 1)
            weights = x2.new_empty(0, self.cfg.top_k, dtype=torch.float32)
            return self._owner.returns(torch.empty_like(x), x2, weights, w)
        out, weights = self.runner.layer(x2, w)
        return self._owner.returns(out.reshape(x.shape), x2, weights, w)

    @torch.no_grad()
    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts on a routing computed elsewhere: x (T, H), weights and ids (T, K) -> (T, H)."""
        return self.runner.experts(x, weights, ids, self.weights())

    def extra_repr(self) -> str:
        c = self.cfg
        return f"H={c.hidden_size}, I={c.intermediate_size}, E={c.num_experts}, K={c.top_k}, target={self.target}"


class HFExpertsRunner:
    """transformers' experts interface: moetune's align -> gemm1 -> gemm2 on an HF experts module's weights and
    HF's routing. Not an nn.Module: the experts module stays the weights' only owner (model/hf/patch.py keeps
    one runner per experts module, outside its state_dict)."""

    def __init__(self, experts: nn.Module, cfg: MoEConfig, concatenated: bool, transposed: bool, **kw: Any):
        self.runner = LayerRunner(cfg, **kw)
        self._experts, self._layout = experts, (concatenated, transposed)
        self._memo = TensorMemo()

    def weights(self) -> Weights:
        def convert() -> Weights:
            with torch.no_grad():
                found = experts_weights(self._experts, *self._layout)
                return {f"experts.{k}": v.detach() for k, v in found.items()}

        return self._memo.get(_tensors(self._experts), convert)

    def describe(self, m_tokens: int) -> list[dict[str, Any]]:
        """Per op: the kernel chosen at m_tokens and where it came from (LayerRunner.describe)."""
        return self.runner.describe(m_tokens)

    def pack_weights(self) -> dict[str, tuple[int, int | None]]:
        """TunedMoE.pack_weights for the experts module's own parameters (those of moetune's layout)."""
        weights = self.weights()
        done = pack_in_place(self._experts, weights, self.runner)
        del weights
        self._memo = TensorMemo()
        return done

    @torch.no_grad()
    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, H), weights and ids (T, K) -> (T, H)."""
        return self.runner.experts(x, weights, ids, self.weights())
