"""MoE: the readable reference nn.Module of one MoE layer.

It owns the parameters and wires the reference ops of kernels/reference.py together; it is the module every
kernel, test and benchmark compares against, and the one TunedMoE mirrors (same state_dict keys).

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, Is shared intermediate.
Parameters (state_dict keys), U = 2 for gated experts (cfg.gated, the default), U = 1 for non-gated ones:
  router.weight                   (E, H)
  router.bias                     (E,)      router_bias (gpt-oss)
  router.e_score_correction_bias  (E,)      score_correction_bias (DeepSeek-V3), a buffer
  experts.gate_up_proj            (E, UI, H) gated: rows laid out [gate | up]; non-gated: the up projection
  experts.down_proj               (E, H, I)
  experts.gate_up_bias            (E, UI)   expert_bias (gpt-oss; a distilled BERT FFN's b1)
  experts.down_bias               (E, H)    expert_bias
  shared_expert.gate_up_proj      (UIs, H)  num_shared_experts > 0; gated like the routed experts
  shared_expert.down_proj         (H, Is)
  shared_expert.gate_weight       (1, H)    shared_expert_gate (Qwen2-MoE)
Quantized experts (cfg.quant int8 / int4): experts.gate_up_proj and experts.down_proj are QuantizedWeights
(kernels/quant.py: codes + group scales, quantized from the initial values) and the reference runs on their
dequantized values; the state_dict holds those dense values (quantizing them again gives the same codes), so
checkpoints stay plain tensors. The shared expert, the router and the biases stay in cfg.dtype.
A non-gated config keeps the name gate_up_proj for its (up-only) projection, so one code path and one
state_dict layout serve both kinds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moetune.kernels import reference as ref
from moetune.kernels.packed import StoredWeight
from moetune.kernels.quant import QuantizedWeight
from moetune.model.config import MoEConfig
from moetune.model.config.moe_config import WEIGHT_QUANT
from moetune.model.hf.blocks import hf_block_config, hf_block_weights


def _param(*shape: int, dtype: torch.dtype, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape, dtype=dtype).uniform_(-bound, bound))


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        e, h, dt = cfg.num_experts, cfg.hidden_size, cfg.torch_dtype
        self.weight = _param(e, h, dtype=dt, fan_in=h)
        self.bias = _param(e, dtype=dt, fan_in=h) if cfg.router_bias else None
        if cfg.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None


class Experts(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        e, h, i, dt = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.torch_dtype
        u = cfg.up_factor
        self.gate_up_proj = _param(e, u * i, h, dtype=dt, fan_in=h)
        self.down_proj = _param(e, h, i, dtype=dt, fan_in=i)
        self.gate_up_bias = _param(e, u * i, dtype=dt, fan_in=h) if cfg.expert_bias else None
        self.down_bias = _param(e, h, dtype=dt, fan_in=i) if cfg.expert_bias else None
        if cfg.quant != "none":
            quantize_experts(self, cfg.quant, cfg.quant_group)


def quantize_experts(experts: nn.Module, quant: str, group: int) -> None:
    """An Experts module's gate_up_proj and down_proj quantized in place to `quant`'s weight codes (natural
    layout; w8a8 / w4a8 store int8 / int4 codes: the activations are quantized by the kernels); its state_dict
    keeps giving dense values."""
    fmt = WEIGHT_QUANT.get(quant, quant)
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name)
        dense = w.unpack() if isinstance(w, StoredWeight) else w.detach()
        setattr(experts, name, nn.Parameter(QuantizedWeight.of(dense, fmt, group), requires_grad=False))
    if not getattr(experts, "_moetune_dense_state", False):
        experts._register_state_dict_hook(dense_state)
        experts._moetune_dense_state = True


def dense_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict hook: weights stored in another form (StoredWeight: packed panels, codes) become dense tensors,
    so checkpoints stay plain."""
    for key, value in list(state_dict.items()):
        if key.startswith(prefix) and isinstance(value, StoredWeight):
            state_dict[key] = value.unpack()


def _dense(w: torch.Tensor) -> torch.Tensor:
    """A stored weight unpacked once for the reference (indexing it per expert would unpack it per expert)."""
    return w.unpack() if isinstance(w, StoredWeight) else w


class SharedExpert(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        h, s, dt = cfg.hidden_size, cfg.shared_size, cfg.torch_dtype
        self.gate_up_proj = _param(cfg.up_factor * s, h, dtype=dt, fan_in=h)
        self.down_proj = _param(h, s, dtype=dt, fan_in=s)
        self.gate_weight = _param(1, h, dtype=dt, fan_in=h) if cfg.shared_expert_gate else None


class MoE(nn.Module):
    """Reference MoE layer: forward(x[..., H]) -> same shape and dtype."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_expert = SharedExpert(cfg) if cfg.num_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, H) -> (weights (T, K) fp32, ids (T, K) int64)."""
        logits = ref.router_logits(x, self.router.weight, self.router.bias)
        return ref.select_experts(logits, self.cfg, self.router.e_score_correction_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"MoE expects x[..., {self.cfg.hidden_size}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cfg.hidden_size)
        weights, ids = self.route(x2)
        ex = self.experts
        out = ref.routed_experts(
            x2, weights, ids, _dense(ex.gate_up_proj), _dense(ex.down_proj), ex.gate_up_bias, ex.down_bias, self.cfg
        )
        if self.shared_expert is not None:
            se = self.shared_expert
            out = out + ref.shared_expert(x2, se.gate_up_proj, se.down_proj, se.gate_weight, self.cfg)
        return out.reshape(*lead, self.cfg.hidden_size)

    def quantize_(self, quant: str, group: int | None = None, target_kind: str = "cpu") -> MoE:
        """This layer's routed experts quantized in place (MoEConfig.quantized picks the group; an impossible
        format is an error before anything changes). Returns self."""
        cfg = self.cfg.quantized(quant, group, target_kind)
        if cfg is not self.cfg:
            quantize_experts(self.experts, cfg.quant, cfg.quant_group)
            self.cfg = cfg
        return self

    @classmethod
    def from_hf_block(cls, block: nn.Module) -> MoE:
        """A reference MoE holding a copy of a Hugging Face sparse-MoE block's weights."""
        cfg = hf_block_config(block)
        moe = cls(cfg)
        state = hf_block_weights(block, cfg)
        moe.load_state_dict({k: v.clone().contiguous() for k, v in state.items()}, strict=True)
        return moe

    def extra_repr(self) -> str:
        c = self.cfg
        shape = f"H={c.hidden_size}, I={c.intermediate_size}, E={c.num_experts}, K={c.top_k}"
        return f"{shape}, router={c.router}" + ("" if c.gated else ", gated=False")
