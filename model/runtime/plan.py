"""LayerRunner: which kernel runs each op of a layer at a token count, and running them.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k.

Per M bucket the config is lowered for the target's kind (ir.lower, cached per bucket) and one
(backend, config) is chosen per op, first match wins:
  1. `configs`: an op name ("experts.gemm1") or a problem signature -> KernelConfig (or
     {"backend": ..., "params": {...}});
  2. the kernel DB (moetune.kernels.db): the winner for (target, problem, M bucket) with the current versions,
     else the winner of the nearest tuned M bucket; a GPU device's own records, then its architecture's;
     stale records (other versions or kernel source) are reported with a warning and never used;
  3. the first backend of `backends` that implements the op on the target, at its default point.
Running: route -> align -> gemm1 -> gemm2 (+ the shared expert's route -> align -> gemm1 -> gemm2), on weights
in moetune's layout (model/moe.py's state_dict names). It performs no tuning and never imports the tuner.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from moetune.ir.program import MoEProgram, Problem, lower, m_bucket
from moetune.ir.target import resolve_target
from moetune.kernels.db import KernelDB, default_db_path, kernel_key, open_db
from moetune.kernels.registry import (
    BACKENDS,
    ImplInfo,
    KernelConfig,
    backend_info,
    backends_for,
    default_config,
    get_impl,
)
from moetune.model.config import MoEConfig

PACKED_OPS = ("experts.gemm1", "experts.gemm2")  # the ops whose weights TunedMoE.pack_weights stores packed
ConfigSpec = KernelConfig | dict[str, Any]
Weights = dict[str, torch.Tensor | None]  # moetune state_dict name -> tensor in moetune's layout


def as_kernel_config(spec: ConfigSpec) -> KernelConfig:
    if isinstance(spec, KernelConfig):
        return spec
    if isinstance(spec, dict) and "backend" in spec:
        return KernelConfig.of(spec["backend"], spec.get("params", {}))
    raise ValueError(f"a kernel config is a KernelConfig or {{'backend': ..., 'params': {{...}}}}, got {spec!r}")


def runtime_db(db: Any) -> KernelDB | None:
    """The runtime's reading of `db`: None -> the default DB if it exists; False -> none; a KernelDB as it is;
    else open_db(db), which must exist: the runtime only reads, it never creates a database."""
    if db is False:
        return None
    if isinstance(db, KernelDB):
        return db
    if db is None:
        path = default_db_path()
        return open_db(path) if "://" in str(path) or path.exists() else None
    return open_db(db, create=False)


@dataclass(frozen=True)
class Choice:
    impl: ImplInfo
    config: KernelConfig
    source: str  # "config" | "db:exact" | "db:nearest" | "default"


@dataclass(frozen=True)
class Plan:
    """The lowered program for one M bucket and the kernel chosen for each of its ops."""

    program: MoEProgram
    chosen: dict[str, Choice]

    def run(self, name: str, target, *args):
        choice = self.chosen[name]
        return choice.impl.fn(self.program.op(name), choice.config, target, *args)


class LayerRunner:
    """Chooses and runs the kernels of one MoE layer (cfg) on a target."""

    def __init__(
        self,
        cfg: MoEConfig,
        target: Any = "cpu",
        configs: dict[str, ConfigSpec] | None = None,
        backends: tuple[str, ...] = BACKENDS,
        db: Any = None,
    ):
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise ValueError(f"backends must be a non-empty subset of {', '.join(BACKENDS)}, got {backends}")
        self.cfg = cfg
        self.target = resolve_target(target)
        self.backends = tuple(backends)
        self.configs = {k: as_kernel_config(v) for k, v in (configs or {}).items()}
        self.db = runtime_db(db)
        self._plans: dict[int, Plan] = {}
        self._stale: dict[str, int] = {}  # op name -> stale records seen while choosing (one warning per plan)
        self._panels: dict[str, int] = {}  # op name -> the panel width its weight is packed in (pin_layouts)

    # ---- choosing ---------------------------------------------------------------------------------------------
    def plan(self, m_tokens: int) -> Plan:
        """The plan for a batch of m_tokens (cached per M bucket)."""
        bucket = m_bucket(m_tokens)
        if bucket not in self._plans:
            program = lower(self.cfg, bucket, target_kind=self.target.kind)
            self._stale = {}
            chosen = {op.name: self._choose(op.name, op.problem, bucket) for op in program}
            self._plans[bucket] = Plan(program, chosen)
            if self._stale:  # one warning per plan, not one per op
                ops = ", ".join(f"{name} ({count})" for name, count in self._stale.items())
                warnings.warn(
                    f"moetune: stale kernel records (tuned with other versions) are not used at M={bucket}: {ops}; "
                    "re-run `moetune tune`, or `moetune db prune` to delete them",
                    stacklevel=2,
                )
        return self._plans[bucket]

    def describe(self, m_tokens: int) -> list[dict[str, Any]]:
        """Per op: name, problem signature, backend, config and where it came from (config/db:.../default)."""
        plan = self.plan(m_tokens)
        return [
            {
                "op": op.name,
                "problem": op.problem.signature,
                "backend": plan.chosen[op.name].config.backend,
                "config": plan.chosen[op.name].config.as_dict(),
                "source": plan.chosen[op.name].source,
            }
            for op in plan.program
        ]

    def _choose(self, name: str, problem: Problem, bucket: int) -> Choice:
        spec, source = self.configs.get(name) or self.configs.get(problem.signature), "config"
        if spec is None and self.db is not None:
            spec, source = self._from_db(name, problem, bucket)
        if spec is None:
            candidates = backends_for(problem.op, self.target.kind, self.backends)
            if not candidates:
                raise ValueError(f"no backend among {self.backends} implements {problem.op} on {self.target}")
            spec, source = default_config(problem, candidates[0], self.target), "default"
        panel = self._panels.get(name)
        if panel is not None and source != "config" and (spec.backend != "tvm" or spec["nt"] != panel):
            spec, source = self._in_layout(problem, spec, panel), f"{source}+layout"
        if spec.backend not in self.backends:
            raise ValueError(f"{name}: backend {spec.backend!r} is not in the allowed backends {self.backends}")
        violations = backend_info(spec.backend).space(problem, self.target).violations(spec.as_dict())
        if violations:
            raise ValueError(f"{name}: config {spec.as_dict()} is infeasible for {problem}: {'; '.join(violations)}")
        return Choice(get_impl(problem.op, spec.backend), spec, source)

    def _from_db(self, name: str, problem: Problem, bucket: int) -> tuple[KernelConfig | None, str]:
        for target_name in self.target.lookup_names:  # a GPU's own records, then its architecture's
            found = self.db.lookup(kernel_key(target_name, problem, bucket))
            if found.record is not None:
                break
        if found.stale:
            self._stale[name] = len(found.stale)
        record = found.record
        if record is None or record.backend not in self.backends:
            return None, "default"
        spec = KernelConfig.of(record.backend, record.config)
        if backend_info(record.backend).space(problem, self.target).violations(spec.as_dict()):
            return None, "default"  # e.g. a nearest-M winner whose tile does not divide this bucket's BM
        return spec, f"db:{found.kind}"

    # ---- one packed layout per weight (TunedMoE.pack_weights) -------------------------------------------------
    def layouts(self) -> dict[str, int]:
        """The panel width to pack each routed-expert weight in (op name -> nt of the tvm backend): that of the
        op's tvm winner at the largest exactly tuned M bucket, else of its default point at M=1; {} where the
        layer does not run the tvm backend. Prefill is FMA-bound and its tile decides; decode streams the weights
        once whatever the panel (qwen3-30b-a3b gemm2 at T=1 on the Zen4 host: nt=16 1.85 ms, nt=32 1.84 ms)."""
        if self.target.kind != "cpu" or "tvm" not in self.backends:
            return {}
        found: dict[str, int] = {}
        for m in (4096, 1024, 256, 64, 16, 4, 1):
            for name, choice in self.plan(m).chosen.items():
                exact = choice.source.startswith("db:exact") and choice.config.backend == "tvm"
                if name in PACKED_OPS and name not in found and exact:
                    found[name] = choice.config["nt"]
        program = self.plan(1).program
        for name in PACKED_OPS:
            found.setdefault(name, default_config(program.op(name), "tvm", self.target)["nt"])
        return found

    def pin_layouts(self, panels: dict[str, int]) -> None:
        """From now on the ops of `panels` run the tvm backend with that panel width (their weights are packed
        in it): a winner of another width, or of another backend, is adapted (source "...+layout")."""
        self._panels = dict(panels)
        self._plans.clear()

    def _in_layout(self, problem: Problem, spec: KernelConfig, panel: int) -> KernelConfig:
        """`spec` moved to the tvm backend at panel width `panel`: its other parameters where feasible, the rows
        per tile lowered until the accumulators fit the registers; else the default point at that width."""
        space = backend_info("tvm").space(problem, self.target)
        base = spec.as_dict() if spec.backend == "tvm" else default_config(problem, "tvm", self.target).as_dict()
        for point in (base, default_config(problem, "tvm", self.target).as_dict()):
            mts = next(p.choices for p in space.params if p.name == "mt")
            for mt in sorted((m for m in mts if m <= point["mt"]), reverse=True):
                if space.is_feasible({**point, "nt": panel, "mt": mt}):
                    return KernelConfig.of("tvm", {**point, "nt": panel, "mt": mt})
        raise ValueError(f"no feasible tvm point of panel width {panel} for {problem}")

    # ---- running ----------------------------------------------------------------------------------------------
    def layer(self, x2: torch.Tensor, w: Weights) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer on x2 (T, H): (out (T, H), routing weights (T, K))."""
        plan = self.plan(x2.shape[0])
        route = (x2, w["router.weight"], w.get("router.bias"), w.get("router.e_score_correction_bias"))
        weights, ids = plan.run("route", self.target, *route)
        out = self._experts(plan, x2, weights, ids, w)
        if self.cfg.num_shared_experts:
            out = out + self._shared(plan, x2, w)
        return out, weights

    def experts(self, x2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w: Weights) -> torch.Tensor:
        """The routed experts on a routing computed elsewhere: x2 (T, H), weights and ids (T, K) -> (T, H)."""
        return self._experts(self.plan(x2.shape[0]), x2, weights.float(), ids.to(torch.int32), w)

    def _experts(self, plan: Plan, x2, weights, ids, w: Weights) -> torch.Tensor:
        aligned = plan.run("align", self.target, weights, ids)
        gate_up = (x2, aligned, w["experts.gate_up_proj"], w.get("experts.gate_up_bias"))
        act = plan.run("experts.gemm1", self.target, *gate_up)
        down = (act, aligned, w["experts.down_proj"], w.get("experts.down_bias"))
        return plan.run("experts.gemm2", self.target, *down)

    def _shared(self, plan: Plan, x2: torch.Tensor, w: Weights) -> torch.Tensor:
        t = x2.shape[0]
        gate = w.get("shared_expert.gate_weight")
        if gate is not None:
            weights, ids = plan.run("shared.route", self.target, x2, gate, None, None)
        else:
            weights = torch.ones(t, 1, device=x2.device)
            ids = torch.zeros(t, 1, dtype=torch.int32, device=x2.device)
        aligned = plan.run("shared.align", self.target, weights, ids)
        gate_up = w["shared_expert.gate_up_proj"].unsqueeze(0)
        act = plan.run("shared.gemm1", self.target, x2, aligned, gate_up, None)
        return plan.run("shared.gemm2", self.target, act, aligned, w["shared_expert.down_proj"].unsqueeze(0), None)
