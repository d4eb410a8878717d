"""MoEConfig: the one description of an MoE layer that every other part of moetune reads.

Data flow: MoEConfig (here, from kwargs / a preset / an HF config) -> ir.lower -> schedules -> kernels.
The config is a frozen dataclass; it validates itself on construction so that an impossible layer never
reaches the lowering or the kernel database.

Shape legend used across moetune: T tokens, H hidden, I intermediate (per expert), E experts, K top-k,
S = T*K routed rows, Is = shared-expert intermediate (all shared experts together).

Router kinds (what `router` selects; the reference implementation is kernels/reference.py):
  softmax       softmax over the E logits, then top-k (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2);
                `norm_topk_prob` renormalises the k weights to sum to 1.
  sigmoid       sigmoid scores; the choice uses scores + `e_score_correction_bias`, the weights are the
                plain scores of the chosen experts (DeepSeek-V3).
  topk_softmax  top-k on the raw logits, then softmax over those k (gpt-oss).
  topk_sigmoid  top-k on the raw logits, weight = sigmoid of the chosen logit (Llama 4).
  topk_hard     top-k on the raw logits (router bias included), every chosen expert weighs 1.0: plain,
                unweighted selection (a dense FFN distilled into experts). The generic steps still apply:
                `norm_topk_prob` renormalises the K ones to 1/K each, `routed_scaling_factor` scales them; a
                student that sums its experts like the dense FFN it came from sets norm_topk_prob=False.
Any router can be group-limited (`n_group` > 1: keep the best `topk_group` groups of E/n_group experts,
scored by `group_score`) and scaled (`routed_scaling_factor`).

Quantized experts (`quant`): the routed experts' weights stored as symmetric int8 or int4 codes with one scale
per group of `quant_group` consecutive weights along the reduction (kernels/quant.py); the router, the shared
expert (a dense MLP every token runs), biases and activations stay in `dtype` (weight-only quantization:
int8 / int4). w8a8 / w4a8 keep the same codes and also quantize each expert GEMM's input to int8 per token and
group on the fly (kernels/quant.py), which lets CPUs with integer dot products (AVX-512 VNNI) multiply bytes.

Experts are gated MLPs, act(x Wg^T + bg) * (x Wu^T + bu) then the down projection (`gated=True`, every
published MoE), or plain MLPs act(x Wu^T + bu) then down (`gated=False`: BERT-style FFNs and students
distilled from them; any activation but swiglu_oai, which needs a gate).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetune.model.config.hf_config import fields_from_hf
from moetune.model.config.presets import PRESETS

ROUTERS = ("softmax", "sigmoid", "topk_softmax", "topk_sigmoid", "topk_hard")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
NON_GATED_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")  # swiglu_oai clamps a gate and an up half
GROUP_SCORES = ("max", "top2_sum")
# expert weight formats: as `dtype`; int8 / int4 codes with group scales, the activations as they are (weight-only,
# "w8a16" / "w4a16"); w8a8 / w4a8: the same codes, and each GEMM's input quantized to int8 per token and group on
# the fly (llama.cpp's Q8_0 / Q4_0 dot products; integer VNNI dot products on CPUs that have them)
QUANTS = ("none", "int8", "int4", "w8a8", "w4a8")
WEIGHT_QUANT = {"int8": "int8", "int4": "int4", "w8a8": "int8", "w4a8": "int4"}  # a format's weight codes
QUANT_GROUPS = (32, 64, 128)  # weights per scale along the reduction
# the default group per target kind: 32 on CPUs (llama.cpp's Q8_0 / Q4_0), 128 on GPUs (GPTQ / AWQ checkpoints)
QUANT_GROUP_DEFAULT = {"cpu": 32, "cuda": 128}
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "torch.float32": "float32",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "torch.float16": "float16",
}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MoEConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: routed experts (gated or plain MLPs), a router, optional shared experts."""

    hidden_size: int  # H
    intermediate_size: int  # I, per routed expert
    num_experts: int  # E
    top_k: int  # K
    router: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited top-k: E experts in n_group groups ...
    topk_group: int = 1  # ... of which the best topk_group stay eligible
    group_score: str = "max"  # how a group is scored: its best expert, or the sum of its best two
    router_bias: bool = False  # gpt-oss: the router linear has a bias
    score_correction_bias: bool = False  # DeepSeek-V3: a per-expert bias used for the choice only
    apply_router_weight_on_input: bool = False  # Llama 4: scale the expert's input, not its output
    gated: bool = True  # experts (shared ones too) compute act(gate) * up; False: act(up) alone (BERT FFN)
    activation: str = "silu"  # act(gate) * up; swiglu_oai is gpt-oss's clamped variant
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False  # biases on the experts' gate_up and down projections
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0  # per shared expert; they run as one MLP of the summed width
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared expert's output
    dtype: str = "float32"
    quant: str = "none"  # expert weights: "none" (stored in dtype), else one of QUANTS (codes + one scale per group)
    quant_group: int = 32  # weights per scale, along the reduction (H for gate_up, I for down)
    name: str = ""  # informational label (preset or HF model type); not part of any kernel key

    def __post_init__(self) -> None:
        dtype = _DTYPE_ALIASES.get(str(self.dtype), str(self.dtype))
        object.__setattr__(self, "dtype", dtype)
        _check_choice("dtype", dtype, DTYPES)
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "n_group", "topk_group"):
            _check_int(name, getattr(self, name), 1)
        _check_int("num_shared_experts", self.num_shared_experts, 0)
        _check_int("shared_intermediate_size", self.shared_intermediate_size, 0)
        _check_choice("router", self.router, ROUTERS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.gated, bool):
            raise ValueError(f"MoEConfig.gated must be a bool, got {self.gated!r}")
        if not self.gated and self.activation not in NON_GATED_ACTIVATIONS:
            raise ValueError(
                f"MoEConfig.activation must be one of {', '.join(NON_GATED_ACTIVATIONS)} for non-gated experts "
                f"(gated=False); got {self.activation!r}"
            )
        _check_choice("group_score", self.group_score, GROUP_SCORES)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        if self.num_experts % self.n_group:
            raise ValueError(f"MoEConfig.n_group must divide num_experts ({self.num_experts}), got {self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group must be <= n_group ({self.n_group}), got {self.topk_group}")
        eligible = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > eligible:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) exceeds the {eligible} experts left eligible by "
                f"topk_group={self.topk_group} of n_group={self.n_group}"
            )
        if self.group_score == "top2_sum" and self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError("MoEConfig.group_score 'top2_sum' needs at least 2 experts per group")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.activation == "swiglu_oai" and not (self.swiglu_alpha > 0 and self.swiglu_limit > 0):
            raise ValueError("MoEConfig.swiglu_alpha and swiglu_limit must be > 0 for activation 'swiglu_oai'")
        if (self.num_shared_experts > 0) != (self.shared_intermediate_size > 0):
            raise ValueError(
                "MoEConfig.num_shared_experts and shared_intermediate_size must both be > 0 or both 0, got "
                f"{self.num_shared_experts} and {self.shared_intermediate_size}"
            )
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("MoEConfig.shared_expert_gate needs num_shared_experts > 0")
        self._check_quant()

    def _check_quant(self) -> None:
        _check_choice("quant", self.quant, QUANTS)
        if self.quant == "none":
            return
        if self.quant_group not in QUANT_GROUPS:
            allowed = ", ".join(map(str, QUANT_GROUPS))
            raise ValueError(f"MoEConfig.quant_group must be one of {allowed}; got {self.quant_group!r}")
        for name, size in (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size)):
            if size % self.quant_group:
                raise ValueError(
                    f"MoEConfig.quant_group {self.quant_group} must divide {name} ({size}), the reduction it groups"
                )

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def shared_size(self) -> int:
        """Is: the width of the fused shared-expert MLP (0 without shared experts)."""
        return self.num_shared_experts * self.shared_intermediate_size

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def up_factor(self) -> int:
        """Rows of gate_up_proj per intermediate neuron: 2 (gate and up) when gated, else 1 (up only)."""
        return 2 if self.gated else 1

    @property
    def weight_quant(self) -> str:
        """The experts' weight code format: "int8" / "int4", or "none"."""
        return WEIGHT_QUANT.get(self.quant, "none")

    @property
    def act_quant(self) -> bool:
        """Whether the expert GEMMs quantize their inputs to int8 per token and group (w8a8 / w4a8)."""
        return self.quant in ("w8a8", "w4a8")

    @property
    def quant_bits(self) -> int:
        """Bits per stored expert weight code: 8 / 4 when quantized, else the dtype's width."""
        return {"int8": 8, "int4": 4}.get(self.weight_quant, 32 if self.dtype == "float32" else 16)

    def quantized(self, quant: str | None, group: int | None = None, target_kind: str = "cpu") -> MoEConfig:
        """This layer with its experts in `quant` (None: as it is), `group` weights per scale (None: the target
        kind's default, QUANT_GROUP_DEFAULT). A layer already quantized another way is an error."""
        if quant is None or quant == self.quant:
            return self if group in (None, self.quant_group) else self.replace(quant_group=group)
        if self.quant != "none":
            raise ValueError(f"the layer is already {self.quant} (group {self.quant_group}); cannot make it {quant}")
        if group is None:  # the target kind's default, else the largest smaller group that divides H and I
            default = QUANT_GROUP_DEFAULT.get(target_kind, QUANT_GROUP_DEFAULT["cpu"])
            fits = [
                g for g in QUANT_GROUPS if g <= default and not self.hidden_size % g and not self.intermediate_size % g
            ]
            group = max(fits, default=default)
        return self.replace(quant=quant, quant_group=group)

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one token through the layer (router + K experts + shared)."""
        h, i, u, s = self.hidden_size, self.intermediate_size, self.up_factor, self.shared_size
        routed = self.top_k * (2 * h * u * i + 2 * i * h)
        shared = 2 * h * u * s + 2 * s * h + (2 * h if self.shared_expert_gate else 0)
        return 2 * h * self.num_experts + routed + shared

    # ---- construction / serialisation ----------------------------------------------------------------
    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def shrunk(self, factor: int) -> MoEConfig:
        """H and I (and the shared width) divided by `factor` (at least 8), named "<name>/<factor>": a smaller
        layer of the same structure (experts, top-k, router) for quick benchmarks, tuning and studies."""
        if factor == 1:
            return self
        return self.replace(
            name=f"{self.name}/{factor}",
            hidden_size=max(8, self.hidden_size // factor),
            intermediate_size=max(8, self.intermediate_size // factor),
            shared_intermediate_size=max(8, self.shared_intermediate_size // factor) if self.num_shared_experts else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoEConfig has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> MoEConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable MoEConfig JSON file: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MoEConfig:
        """A real published MoE layer shape by name (see `presets()`); overrides replace fields."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], "name": key, **overrides})

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)

    @classmethod
    def from_hf(cls, config_or_path: Any) -> MoEConfig:
        """From a transformers config object, a config.json path, or a model directory holding one."""
        return cls(**fields_from_hf(config_or_path))
