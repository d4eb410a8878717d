"""Lowering: MoEConfig + a token count -> MoEProgram, the ordered ops of one MoE layer.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K routed rows, BM rows per block,
NB blocks, Is shared intermediate.

The ops, in order (names are the program's; `Problem.op` is the kernel kind):
  route          x (T, H) -> weights (T, K) fp32, ids (T, K) int32      router GEMM + score fn + top-k
  align          ids (T, K) -> the S routed rows sorted by expert, padded per expert to a multiple of BM
  experts.gemm1  gathered x rows @ gate_up_proj[e]^T, activation fused   -> act (NB*BM, I)
                 (gated: act(gate) * up over 2I columns; non-gated: act over I columns)
  experts.gemm2  act @ down_proj[e]^T, routing weight + combine to T rows fused -> (T, H)
  shared.route   (Qwen2-MoE's gated shared expert only) sigmoid(x . g) as a one-expert route
  shared.align   the shared expert(s) as the same pipeline with E = 1, K = 1 (one block list over T rows)
  shared.gemm1
  shared.gemm2

Data-dependent token counts. The number of rows each expert receives is only known after routing. We handle
it the way vLLM's fused_moe does, so the TVM and Triton backends share one `align` output: every expert's
rows are padded up to a multiple of BM and cut into blocks of BM rows, each block tagged with its expert.
A GEMM kernel then sees a *static* inner tile (BM rows, one expert's weights) and a *symbolic* number of
blocks NB (and symbolic T), so one compiled kernel serves every batch size. BM is fixed per M bucket by
`block_m_for`: a power of two near half the mean rows per expert, capped at 8. Small blocks cost little on
the CPU because the schedules walk column panels outermost, so an expert's weight panel stays in cache across
its blocks, while big blocks cost padding (measured on the 2-core Zen3, Mixtral-8x7B fp32 T=256 gemm1:
BM=32 1578 ms, BM=8 1428 ms). BM is *not* a schedule parameter of the GEMMs: the align output (and so
the kernel's grid) depends on it.

BM on CUDA (`lower(cfg, T, target_kind="cuda")`): the same rule with BM in [16, 128] instead of [1, 8]. Tensor
core tiles (tl.dot) need at least 16 rows, and on a GPU a padded row costs idle MMA lanes rather than a cache
line, so blocks start at 16; the cap 128 is the largest BLOCK_M the Triton spaces offer (schedules/triton.py).
The Triton GEMMs tile a block of BM rows with BLOCK_M rows (a tuned parameter, a divisor of BM, or 16 with the
rows past BM masked when BM < 16), so they also run CPU-lowered programs (BM <= 8), only with more masked rows.

Problem signatures (the kernel database keys on these; they are stable and documented):
  "<op>[<key>=<value>,...]:<dtype>"  with the keys in the fixed per-op order below, booleans as 0/1, floats
  with repr(); T is *not* part of a signature (it is the DB's M bucket), BM is (the kernel depends on it).
  route  H,E,K,router,norm,scale,n_group,topk_group,group_score,bias,cbias     (router: the kind, e.g. topk_hard)
  align  E,K,BM
  gemm1  H,I,E,BM,gated,act,alpha,limit,bias,w_in  (gated: 1 = act(gate) * up from gate_up (E,2I,H), 0 = act(up)
                                                    from (E,I,H); w_in: routing weight applied to the input rows)
  gemm2  H,I,E,K,BM,bias,w_out                     (w_out: routing weight applied to the output rows)
  qgemm1 gemm1's keys + wq,G,aq                    quantized experts (cfg.quant): wq the code format (int8 /
  qgemm2 gemm2's keys + wq,G,aq                    int4), G weights per scale along the reduction, aq 8 when
                                                   the input is quantized to int8 per row and group of G too
                                                   (w8a8 / w4a8), else 0; the dtype stays the activations'.
                                                   Same launcher arguments as gemm1 / gemm2, the weight a
                                                   QuantizedWeight (kernels/quant.py).
The quantized GEMMs are ops of their own, not gemm1/gemm2 with a format key: the dense records tuned before them keep
their signatures, and a launcher of one op always receives the same kind of weight.
qgemm1 / qgemm2 gained `aq` with the w8a8 / w4a8 formats: int8 / int4 records from before it have another signature
and are never looked up again (tune them again).
gemm1 gained `gated` with non-gated experts (issue #7): DB records from before it have another signature and are
never looked up again (their kernel source hash is stale too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from moetune.model.config import MoEConfig

OPS = ("route", "align", "gemm1", "gemm2", "qgemm1", "qgemm2")
GEMM_OF = {"gemm1": "gemm1", "gemm2": "gemm2", "qgemm1": "gemm1", "qgemm2": "gemm2"}  # an expert GEMM's dense form
_KEYS = {
    "route": ("H", "E", "K", "router", "norm", "scale", "n_group", "topk_group", "group_score", "bias", "cbias"),
    "align": ("E", "K", "BM"),
    "gemm1": ("H", "I", "E", "BM", "gated", "act", "alpha", "limit", "bias", "w_in"),
    "gemm2": ("H", "I", "E", "K", "BM", "bias", "w_out"),
}
_KEYS["qgemm1"] = (*_KEYS["gemm1"], "wq", "G", "aq")
_KEYS["qgemm2"] = (*_KEYS["gemm2"], "wq", "G", "aq")


def _parse(text: str) -> Any:
    """A dim's value from its _fmt text: an int, a float, else the text (bools read back as 0 / 1)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class Problem:
    """One op with its static dims and dtype: target-independent, hashable, with a canonical signature."""

    op: str
    dims: tuple[tuple[str, Any], ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.op not in _KEYS:
            raise ValueError(f"unknown op {self.op!r}; known: {', '.join(OPS)}")
        names = tuple(k for k, _ in self.dims)
        if names != _KEYS[self.op]:
            raise ValueError(f"{self.op} dims must be {_KEYS[self.op]}, got {names}")

    @classmethod
    def make(cls, op: str, dtype: str, **dims: Any) -> Problem:
        keys = _KEYS.get(op)
        if keys is None:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
        missing = [k for k in keys if k not in dims]
        if missing or len(dims) != len(keys):
            raise ValueError(f"{op} needs dims {', '.join(keys)}; got {', '.join(dims)}")
        return cls(op, tuple((k, dims[k]) for k in keys), dtype)

    def __getitem__(self, name: str) -> Any:
        for k, v in self.dims:
            if k == name:
                return v
        raise KeyError(f"{self.op} has no dim {name!r}")

    @property
    def signature(self) -> str:
        return f"{self.op}[{','.join(f'{k}={_fmt(v)}' for k, v in self.dims)}]:{self.dtype}"

    @classmethod
    def from_signature(cls, signature: str) -> Problem:
        """The Problem a signature names (a DB record's op): `op[k=v,...]:dtype`, its canonical form only."""
        found = re.fullmatch(r"(\w+)\[([^\]]*)\]:(\w+)", signature)
        if not found:
            raise ValueError(f"not an op signature: {signature[:80]!r}")
        op, body, dtype = found.groups()
        dims = {}
        for item in body.split(","):
            name, eq, text = item.partition("=")
            if not eq:
                raise ValueError(f"not an op signature: {signature[:80]!r}")
            dims[name] = _parse(text)
        problem = cls.make(op, dtype, **dims)
        if problem.signature != signature:
            raise ValueError(f"not a canonical op signature: {signature[:80]!r}")
        return problem

    def __str__(self) -> str:
        return self.signature

    @property
    def gemm(self) -> str | None:
        """ "gemm1" / "gemm2" for an expert GEMM, quantized or not (what its dims mean), else None."""
        return GEMM_OF.get(self.op)

    @property
    def quant(self) -> str:
        """The weights' code format of a quantized GEMM ("int8" / "int4"), else "none"."""
        return self["wq"] if self.op in ("qgemm1", "qgemm2") else "none"

    @property
    def act_quant(self) -> bool:
        """Whether a quantized GEMM quantizes its input to int8 per row and group first (aq = 8: w8a8 / w4a8)."""
        return self.quant != "none" and self["aq"] == 8

    def dense(self) -> Problem:
        """A quantized GEMM as the dense GEMM it computes on the dequantized weights (itself otherwise)."""
        if self.quant == "none":
            return self
        dims = {k: v for k, v in self.dims if k not in ("wq", "G", "aq")}
        return Problem.make(self.op[1:], self.dtype, **dims)


@dataclass(frozen=True)
class ProgramOp:
    name: str  # e.g. "experts.gemm1"
    problem: Problem


@dataclass(frozen=True)
class MoEProgram:
    cfg: MoEConfig
    m_tokens: int  # T the program was lowered for
    m_bucket: int  # the DB's M bucket of T
    block_m: int  # BM of the routed experts
    ops: tuple[ProgramOp, ...] = field(default_factory=tuple)

    def op(self, name: str) -> Problem:
        for o in self.ops:
            if o.name == name:
                return o.problem
        raise KeyError(f"program has no op {name!r}; ops: {', '.join(o.name for o in self.ops)}")

    def __iter__(self):
        return iter(self.ops)


def m_bucket(m_tokens: int) -> int:
    """The M bucket of a token count: the next power of two (1, 2, 4, ...)."""
    if m_tokens < 1:
        raise ValueError(f"token count must be >= 1, got {m_tokens}")
    return 1 << (m_tokens - 1).bit_length()


BM_RANGE = {"cpu": (1, 8), "cuda": (16, 128)}  # (floor, cap) of BM per target kind


def block_m_for(m_tokens: int, top_k: int, num_experts: int, cap: int = 8, floor: int = 1) -> int:
    """BM: a power of two near half the mean rows per expert, in [floor, cap] (see the module docstring)."""
    mean_rows = m_bucket(m_tokens) * top_k / num_experts
    bm = floor
    while bm * 2 <= mean_rows / 2 and bm * 2 <= cap:
        bm *= 2
    return bm


def _block_m(m_tokens: int, top_k: int, num_experts: int, target_kind: str) -> int:
    if target_kind not in BM_RANGE:
        raise ValueError(f"unknown target kind {target_kind!r}; known: {', '.join(BM_RANGE)}")
    floor, cap = BM_RANGE[target_kind]
    return block_m_for(m_tokens, top_k, num_experts, cap=cap, floor=floor)


def _gemm_problems(
    cfg: MoEConfig, prefix: str, h: int, i: int, e: int, k: int, bm: int, bias: bool, w_in: bool
) -> tuple[ProgramOp, ProgramOp]:
    act_args = {"act": cfg.activation, "alpha": 0.0, "limit": 0.0}
    if cfg.activation == "swiglu_oai":
        act_args.update(alpha=float(cfg.swiglu_alpha), limit=float(cfg.swiglu_limit))
    # quantized: the routed experts only (the shared expert stays in the activations' dtype: model/moe.py)
    quant = {"wq": cfg.weight_quant, "G": cfg.quant_group, "aq": 8 if cfg.act_quant else 0}
    quant = {} if cfg.quant == "none" or prefix != "experts" else quant
    q = "q" if quant else ""
    g1 = Problem.make(
        f"{q}gemm1", cfg.dtype, H=h, I=i, E=e, BM=bm, gated=cfg.gated, bias=bias, w_in=w_in, **act_args, **quant
    )
    g2 = Problem.make(f"{q}gemm2", cfg.dtype, H=h, I=i, E=e, K=k, BM=bm, bias=bias, w_out=not w_in, **quant)
    return ProgramOp(f"{prefix}.gemm1", g1), ProgramOp(f"{prefix}.gemm2", g2)


def lower(cfg: MoEConfig, m_tokens: int, target_kind: str = "cpu") -> MoEProgram:
    """The MoEProgram of one layer of `cfg` for a batch of `m_tokens` tokens (T); BM per `target_kind`."""
    bucket = m_bucket(m_tokens)
    bm = _block_m(m_tokens, cfg.top_k, cfg.num_experts, target_kind)
    route = Problem.make(
        "route",
        cfg.dtype,
        H=cfg.hidden_size,
        E=cfg.num_experts,
        K=cfg.top_k,
        router=cfg.router,
        norm=cfg.norm_topk_prob,
        scale=float(cfg.routed_scaling_factor),
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        group_score=cfg.group_score,
        bias=cfg.router_bias,
        cbias=cfg.score_correction_bias,
    )
    align = Problem.make("align", "int32", E=cfg.num_experts, K=cfg.top_k, BM=bm)
    ops = [ProgramOp("route", route), ProgramOp("align", align)]
    ops += _gemm_problems(
        cfg,
        "experts",
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_experts,
        cfg.top_k,
        bm,
        cfg.expert_bias,
        cfg.apply_router_weight_on_input,
    )
    if cfg.num_shared_experts:
        # The shared expert is the same pipeline with E = K = 1: every token is one row of expert 0. Its
        # optional sigmoid gate is a route with one expert (topk_sigmoid: weight = sigmoid(x . g)), applied
        # to the output rows; without a gate the rows' weight is 1.
        sbm = _block_m(m_tokens, 1, 1, target_kind)
        if cfg.shared_expert_gate:
            gate = Problem.make(
                "route",
                cfg.dtype,
                H=cfg.hidden_size,
                E=1,
                K=1,
                router="topk_sigmoid",
                norm=False,
                scale=1.0,
                n_group=1,
                topk_group=1,
                group_score="max",
                bias=False,
                cbias=False,
            )
            ops.append(ProgramOp("shared.route", gate))
        ops.append(ProgramOp("shared.align", Problem.make("align", "int32", E=1, K=1, BM=sbm)))
        ops += _gemm_problems(cfg, "shared", cfg.hidden_size, cfg.shared_size, 1, 1, sbm, False, False)
    return MoEProgram(cfg=cfg, m_tokens=m_tokens, m_bucket=bucket, block_m=bm, ops=tuple(ops))


def route_config(problem: Problem) -> MoEConfig:
    """The routing fields of a route Problem as a MoEConfig (for reference.select_experts)."""
    if problem.op != "route":
        raise ValueError(f"route_config needs a route problem, got {problem.op}")
    return MoEConfig(
        hidden_size=problem["H"],
        intermediate_size=1,
        num_experts=problem["E"],
        top_k=problem["K"],
        router=problem["router"],
        norm_topk_prob=problem["norm"],
        routed_scaling_factor=problem["scale"],
        n_group=problem["n_group"],
        topk_group=problem["topk_group"],
        group_score=problem["group_score"],
    )
