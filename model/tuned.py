"""TunedMoE: the drop-in MoE layer that runs the lowered program op by op on chosen kernels.

Same constructor input (an MoEConfig), same forward signature, same parameter names and state_dict keys as
model.MoE. Per batch size it lowers the config (ir.lower, cached per M bucket), picks one (backend, config)
per op, and runs route -> align -> gemm1 -> gemm2 (+ the shared expert's align -> gemm1 -> gemm2).

Choosing kernels, per op, first match wins:
  1. `configs`: an op name ("experts.gemm1") or a problem signature -> KernelConfig (or
     {"backend": ..., "params": {...}});
  2. the kernel database `db` (autotune/db.py): the winner for (target, problem, M bucket) with the current
     versions, else the winner of the nearest tuned M bucket; stale records (other versions or kernel
     source) are reported with a warning and never used; `db=None` reads the embedded default DB if it
     exists, `db=False` reads none;
  3. the first backend of `backends` that implements the op on the target, at its default point.
It performs no tuning itself (that is `moetune tune` / moetune.autotune.tune).

Built from a Hugging Face MoE block (`from_module(hf_block)`), it adopts the block's own children under
their own names (gate/router, experts, shared_expert(s), ...), so its parameters and state_dict keys are the
block's and a checkpoint loads unchanged; forward returns what the block returns (gpt-oss and Llama 4 return
a pair). The kernels read the weights in moetune's layout (`weights()`): views of the block's parameters, or
for gpt-oss's interleaved experts and the HF shared MLPs a converted copy, cached until a parameter changes.
Inference only: the kernels have no backward, so forward runs under no_grad.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from moetune.ir.program import MoEProgram, Problem, lower, m_bucket
from moetune.kernels.registry import BACKENDS, KernelConfig, backend_info, backends_for, default_config, get_impl
from moetune.kernels.target import resolve_target
from moetune.model.config import MoEConfig
from moetune.model.hf_block import SUPPORTED_BLOCKS, experts_weights, hf_block_config, hf_block_weights
from moetune.model.moe import Experts, MoE, Router, SharedExpert

ConfigSpec = KernelConfig | dict[str, Any]


def _as_kernel_config(spec: ConfigSpec) -> KernelConfig:
    if isinstance(spec, KernelConfig):
        return spec
    if isinstance(spec, dict) and "backend" in spec:
        return KernelConfig.of(spec["backend"], spec.get("params", {}))
    raise ValueError(f"a kernel config is a KernelConfig or {{'backend': ..., 'params': {{...}}}}, got {spec!r}")


def _open_db(db: Any):
    """None -> the embedded default DB if it exists (never created here); False -> none; else open_db(db)."""
    if db is False:
        return None
    from moetune.autotune.db import KernelDB, default_db_path, open_db

    if isinstance(db, KernelDB):
        return db
    if db is None:
        path = default_db_path()
        return open_db(path) if "://" in str(path) or path.exists() else None
    return open_db(db)


class TunedMoE(nn.Module):
    """MoE layer on tuned (or default) kernels: forward(x[..., H]) -> same shape and dtype."""

    def __init__(
        self,
        cfg: MoEConfig,
        target: str = "cpu",
        configs: dict[str, ConfigSpec] | None = None,
        backends: tuple[str, ...] = BACKENDS,
        db: Any = None,
        _from: MoE | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.target = resolve_target(target)
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise ValueError(f"backends must be a non-empty subset of {', '.join(BACKENDS)}, got {backends}")
        self.backends = tuple(backends)
        self.configs = {k: _as_kernel_config(v) for k, v in (configs or {}).items()}
        self.db = _open_db(db)
        self._kind = "moe"  # or the HF block's class name, or "experts" (transformers' experts interface)
        self._cache: tuple[tuple, dict[str, torch.Tensor | None]] | None = None
        if _from is None or isinstance(_from, MoE):
            # Parameters: shared with the module we were built from, else freshly initialised like MoE's.
            self.router = _from.router if _from is not None else Router(cfg)
            self.experts = _from.experts if _from is not None else Experts(cfg)
            if _from is not None:
                self.shared_expert = _from.shared_expert
            else:
                self.shared_expert = SharedExpert(cfg) if cfg.num_shared_experts else None
        elif isinstance(_from, tuple):  # ("experts", module, concatenated, transposed): not our child
            self._kind = "experts"
            self.__dict__["_hf_experts"] = _from[1:]
        else:
            self._kind = type(_from).__name__
            for name, child in _from.named_children():
                self.add_module(name, child)
        self._plans: dict[int, tuple[MoEProgram, dict[str, tuple[Any, KernelConfig, str]]]] = {}

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        target: str = "cpu",
        configs: dict[str, ConfigSpec] | None = None,
        backends: tuple[str, ...] = BACKENDS,
        db: Any = None,
    ) -> TunedMoE:
        """A TunedMoE sharing `module`'s parameters (no copy), same state_dict keys and values.

        `module`: a moetune MoE or TunedMoE, or a Hugging Face MoE block of a supported family."""
        kw = {"target": target, "configs": configs, "backends": backends, "db": db}
        if isinstance(module, TunedMoE):
            module = module._source()
        if isinstance(module, MoE):
            return cls(module.cfg, _from=module, **kw)
        if type(module).__name__ in SUPPORTED_BLOCKS:
            return cls(hf_block_config(module), _from=module, **kw)
        raise ValueError(
            f"TunedMoE.from_module takes a moetune MoE or a Hugging Face MoE block "
            f"({', '.join(SUPPORTED_BLOCKS)}), got {type(module).__name__}"
        )

    @classmethod
    def for_hf_experts(
        cls, experts: nn.Module, cfg: MoEConfig, concatenated: bool, transposed: bool, **kw: Any
    ) -> TunedMoE:
        """A runner of `run_experts` on an HF experts module's weights, which stays their only owner (the
        runner has no children, so the model's state_dict is unchanged). Used by transformers' experts
        interface (model/hf.py)."""
        return cls(cfg, _from=("experts", experts, concatenated, transposed), **kw)

    def _source(self) -> nn.Module:
        if self._kind != "moe":
            raise ValueError(f"TunedMoE.from_module: this TunedMoE wraps a {self._kind} block; pass the block itself")
        moe = MoE.__new__(MoE)
        nn.Module.__init__(moe)
        moe.cfg, moe.router, moe.experts, moe.shared_expert = self.cfg, self.router, self.experts, self.shared_expert
        return moe

    # ---- weights in moetune's layout --------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor | None]:
        """moetune state_dict name -> tensor in moetune's layout (model/moe.py), or None where absent.

        Native: the parameters themselves. HF: views or converted copies, cached on the identity and version
        of every source tensor (an in-place update, e.g. load_state_dict, invalidates the cache)."""
        if self._kind == "moe":
            out: dict[str, torch.Tensor | None] = {}
            for prefix, mod in (
                ("router", self.router),
                ("experts", self.experts),
                ("shared_expert", self.shared_expert),
            ):
                if mod is not None:
                    out.update({f"{prefix}.{k}": v for k, v in mod.__dict__["_parameters"].items()})
                    out.update({f"{prefix}.{k}": v for k, v in mod.__dict__["_buffers"].items()})
            return out
        owner = self.__dict__["_hf_experts"][0] if self._kind == "experts" else self
        tensors = [*owner.parameters(), *owner.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                if self._kind == "experts":
                    ex, concatenated, transposed = self.__dict__["_hf_experts"]
                    found = {
                        f"experts.{k}": v.detach() for k, v in experts_weights(ex, concatenated, transposed).items()
                    }
                else:
                    found = hf_block_weights(self, self.cfg, kind=self._kind)
            self._cache = (key, found)
        return self._cache[1]

    # ---- choosing kernels -------------------------------------------------------------------------------------
    def _choose(self, name: str, problem: Problem, bucket: int) -> tuple[Any, KernelConfig, str]:
        spec, source = self.configs.get(name) or self.configs.get(problem.signature), "config"
        if spec is None and self.db is not None:
            spec, source = self._from_db(name, problem, bucket)
        if spec is None:
            candidates = backends_for(problem.op, self.target.kind, self.backends)
            if not candidates:
                raise ValueError(f"no backend among {self.backends} implements {problem.op} on {self.target}")
            spec, source = default_config(problem, candidates[0], self.target), "default"
        if spec.backend not in self.backends:
            raise ValueError(f"{name}: backend {spec.backend!r} is not in the allowed backends {self.backends}")
        violations = backend_info(spec.backend).space(problem, self.target).violations(spec.as_dict())
        if violations:
            raise ValueError(f"{name}: config {spec.as_dict()} is infeasible for {problem}: {'; '.join(violations)}")
        return get_impl(problem.op, spec.backend), spec, source

    def _from_db(self, name: str, problem: Problem, bucket: int) -> tuple[KernelConfig | None, str]:
        from moetune.autotune.db import KernelKey, current_versions

        for target_name in self.target.lookup_names:  # a GPU's own records, then its architecture's
            found = self.db.lookup(KernelKey(target_name, problem.signature, problem.dtype, bucket), current_versions())
            if found.record is not None:
                break
        if found.stale:
            warnings.warn(
                f"moetune: {len(found.stale)} stale kernel record(s) for {name} ({problem.signature}, M={bucket}) "
                "were tuned with other versions and are not used; re-run `moetune tune`",
                stacklevel=4,
            )
        record = found.record
        if record is None or record.backend not in self.backends:
            return None, "default"
        spec = KernelConfig.of(record.backend, record.config)
        if backend_info(record.backend).space(problem, self.target).violations(spec.as_dict()):
            return None, "default"  # e.g. a nearest-M winner whose tile does not divide this bucket's BM
        return spec, f"db:{found.kind}"

    def plan(self, m_tokens: int) -> tuple[MoEProgram, dict[str, tuple[Any, KernelConfig]]]:
        """The lowered program for a batch of m_tokens and the (impl, config) chosen for each of its ops."""
        bucket = m_bucket(m_tokens)
        if bucket not in self._plans:
            program = lower(self.cfg, bucket, target_kind=self.target.kind)
            self._plans[bucket] = (program, {op.name: self._choose(op.name, op.problem, bucket) for op in program})
        return self._plans[bucket]

    def describe(self, m_tokens: int) -> list[dict[str, Any]]:
        """Per op: name, problem signature, backend, config and where it came from (config/db:.../default)."""
        program, chosen = self.plan(m_tokens)
        return [
            {
                "op": op.name,
                "problem": op.problem.signature,
                "backend": chosen[op.name][1].backend,
                "config": chosen[op.name][1].as_dict(),
                "source": chosen[op.name][2],
            }
            for op in program
        ]

    # ---- running ----------------------------------------------------------------------------------------------
    def _run(self, chosen, program: MoEProgram, name: str, *args):
        impl, config, _ = chosen[name]
        return impl.fn(program.op(name), config, self.target, *args)

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        h = self.cfg.hidden_size
        if x.shape[-1] != h:
            raise ValueError(f"TunedMoE expects x[..., {h}], got shape {tuple(x.shape)}")
        if self._kind == "experts":
            raise ValueError("this TunedMoE runs an HF experts module's run_experts(); it has no router")
        w = self.weights()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, h)
        program, chosen = self.plan(x2.shape[0])
        route = (x2, w["router.weight"], w.get("router.bias"), w.get("router.e_score_correction_bias"))
        weights, ids = self._run(chosen, program, "route", *route)
        out = self._experts(chosen, program, x2, weights, ids, w)
        if self.cfg.num_shared_experts:
            out = out + self._shared(chosen, program, x2, w)
        if self._kind == "GptOssMLP":  # HF returns (out, router_scores (T, K))
            return out.reshape(*lead, h), weights.to(x.dtype)
        if self._kind == "Llama4TextMoe":  # HF returns (out (T, H), router_logits (T, E))
            return out, torch.nn.functional.linear(x2, w["router.weight"])
        return out.reshape(*lead, h)

    @torch.no_grad()
    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts on a routing computed elsewhere: x (T, H), weights and ids (T, K) -> (T, H)."""
        program, chosen = self.plan(x.shape[0])
        return self._experts(chosen, program, x, weights.float(), ids.to(torch.int32), self.weights())

    def _experts(self, chosen, program: MoEProgram, x2, weights, ids, w) -> torch.Tensor:
        aligned = self._run(chosen, program, "align", weights, ids)
        gate_up = (x2, aligned, w["experts.gate_up_proj"], w.get("experts.gate_up_bias"))
        act = self._run(chosen, program, "experts.gemm1", *gate_up)
        return self._run(
            chosen, program, "experts.gemm2", act, aligned, w["experts.down_proj"], w.get("experts.down_bias")
        )

    def _shared(self, chosen, program: MoEProgram, x2: torch.Tensor, w) -> torch.Tensor:
        t = x2.shape[0]
        gate = w.get("shared_expert.gate_weight")
        if gate is not None:
            weights, ids = self._run(chosen, program, "shared.route", x2, gate, None, None)
        else:
            weights = torch.ones(t, 1, device=x2.device)
            ids = torch.zeros(t, 1, dtype=torch.int32, device=x2.device)
        aligned = self._run(chosen, program, "shared.align", weights, ids)
        act = self._run(
            chosen, program, "shared.gemm1", x2, aligned, w["shared_expert.gate_up_proj"].unsqueeze(0), None
        )
        return self._run(chosen, program, "shared.gemm2", act, aligned, w["shared_expert.down_proj"].unsqueeze(0), None)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"H={c.hidden_size}, I={c.intermediate_size}, E={c.num_experts}, K={c.top_k}, target={self.target}"
