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
        # Parameters: shared with the module we were built from, else freshly initialised like MoE's.
        self.router = _from.router if _from is not None else Router(cfg)
        self.experts = _from.experts if _from is not None else Experts(cfg)
        if _from is not None:
            self.shared_expert = _from.shared_expert
        else:
            self.shared_expert = SharedExpert(cfg) if cfg.num_shared_experts else None
        self._plans: dict[int, tuple[MoEProgram, dict[str, tuple[Any, KernelConfig, str]]]] = {}

    @classmethod
    def from_module(
        cls,
        module: MoE,
        target: str = "cpu",
        configs: dict[str, ConfigSpec] | None = None,
        backends: tuple[str, ...] = BACKENDS,
        db: Any = None,
    ) -> TunedMoE:
        """A TunedMoE sharing `module`'s parameters (no copy): same state_dict keys and values."""
        if not isinstance(module, MoE):
            raise ValueError(f"TunedMoE.from_module takes a moetune MoE, got {type(module).__name__}")
        return cls(module.cfg, target=target, configs=configs, backends=backends, db=db, _from=module)

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

        found = self.db.lookup(
            KernelKey(self.target.name, problem.signature, problem.dtype, bucket), current_versions()
        )
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
            program = lower(self.cfg, bucket)
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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cfg.hidden_size
        if x.shape[-1] != h:
            raise ValueError(f"TunedMoE expects x[..., {h}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, h)
        t = x2.shape[0]
        program, chosen = self.plan(t)
        r, ex = self.router, self.experts
        weights, ids = self._run(chosen, program, "route", x2, r.weight, r.bias, r.e_score_correction_bias)
        aligned = self._run(chosen, program, "align", weights, ids)
        act = self._run(chosen, program, "experts.gemm1", x2, aligned, ex.gate_up_proj, ex.gate_up_bias)
        out = self._run(chosen, program, "experts.gemm2", act, aligned, ex.down_proj, ex.down_bias)
        if self.shared_expert is not None:
            out = out + self._shared(chosen, program, x2)
        return out.reshape(*lead, h)

    def _shared(self, chosen, program: MoEProgram, x2: torch.Tensor) -> torch.Tensor:
        se, t = self.shared_expert, x2.shape[0]
        if se.gate_weight is not None:
            weights, ids = self._run(chosen, program, "shared.route", x2, se.gate_weight, None, None)
        else:
            weights, ids = torch.ones(t, 1), torch.zeros(t, 1, dtype=torch.int32)
        aligned = self._run(chosen, program, "shared.align", weights, ids)
        act = self._run(chosen, program, "shared.gemm1", x2, aligned, se.gate_up_proj.unsqueeze(0), None)
        return self._run(chosen, program, "shared.gemm2", act, aligned, se.down_proj.unsqueeze(0), None)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"H={c.hidden_size}, I={c.intermediate_size}, E={c.num_experts}, K={c.top_k}, target={self.target}"
