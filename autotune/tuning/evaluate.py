"""What a worker does with one Task: build the candidate, check it against the reference, time it.

Inputs come from the layer itself: random weights of the config (built once per worker and config) and
random tokens routed and aligned by the torch backend, so each op sees the data layout it sees in a real
forward. Verification uses fresh inputs (another seed) plus edge cases that the same compiled kernel must
handle: a single token, every token on one expert (which leaves all other experts with zero rows), and the
study's T. A wrong kernel is a failed trial. Timing rotates three input sets; on a CPU, a check call at the
study's T slower than measure.WARMUP_ENOUGH_S is the warm-up (a Mixtral-size gemm1 call takes 0.77 s).

Tolerances (norm-wise relative error against the fp32 reference of kernels/reference.py): fp32 1e-4;
bf16/fp16 at most 2x the error of the torch backend in the same dtype, plus 1e-3. A GPU candidate is timed on
the device (CUDA events; CUDA graph replays for calls under half a millisecond: autotune/measure.py).
Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from functools import lru_cache

import torch

from moetune.autotune.measure import WARMUP_ENOUGH_S, measure
from moetune.autotune.tuning.trial import Result, Task
from moetune.ir.program import MoEProgram, lower, route_config
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.ops import Aligned
from moetune.kernels.registry import KernelConfig, get_impl
from moetune.model.config import MoEConfig
from moetune.model.moe import MoE

TORCH = KernelConfig.of("torch")


@lru_cache(maxsize=2)
def _layer(cfg_json: str, device: str = "cpu") -> MoE:
    """The config's layer with seeded random weights (the same values on every device), on `device`."""
    import json

    torch.manual_seed(1234)
    layer = MoE(MoEConfig.from_dict(json.loads(cfg_json))).eval()
    if layer.router.e_score_correction_bias is not None:
        layer.router.e_score_correction_bias.normal_(std=0.05)
    return layer.to(device)


def _op_params(layer: MoE, op: str):
    if op.startswith("experts."):
        ex = layer.experts
        return {"gemm1": (ex.gate_up_proj, ex.gate_up_bias), "gemm2": (ex.down_proj, ex.down_bias)}[op.split(".")[1]]
    se = layer.shared_expert
    return {"gemm1": (se.gate_up_proj.unsqueeze(0), None), "gemm2": (se.down_proj.unsqueeze(0), None)}[op.split(".")[1]]


def _case(layer: MoE, program: MoEProgram, op: str, x: torch.Tensor, one_expert: bool) -> tuple:
    """The op's tensor arguments for tokens x, produced by the torch backend's upstream ops."""
    target, prefix = resolve_target("cpu"), op.split(".")[0]
    t = x.shape[0]
    if op == "route":
        return (x, layer.router.weight, layer.router.bias, layer.router.e_score_correction_bias)
    if prefix == "shared":
        gate = layer.shared_expert.gate_weight
        if op == "shared.route":
            return (x, gate, None, None)
        weights = torch.sigmoid(x.float() @ gate.float().T) if gate is not None else torch.ones(t, 1, device=x.device)
        ids = torch.zeros(t, 1, dtype=torch.int32, device=x.device)
        align_problem = program.op("shared.align")
    else:
        r = layer.router
        weights, ids = get_impl("route", "torch").fn(
            program.op("route"), TORCH, target, x, r.weight, r.bias, r.e_score_correction_bias
        )
        if one_expert:  # every token on expert 0 (k = 0) and on experts 1..K-1: all other experts get no rows
            ids = torch.arange(ids.shape[1], dtype=torch.int32, device=x.device).expand(t, -1).contiguous()
        align_problem = program.op("align")
    if op.endswith("align"):
        return (weights, ids)
    aligned = get_impl("align", "torch").fn(align_problem, TORCH, target, weights, ids)
    w, b = _op_params(layer, op)
    if op.endswith("gemm1"):
        return (x, aligned, w, b)
    w1, b1 = _op_params(layer, f"{prefix}.gemm1")
    g1 = program.op(f"{prefix}.gemm1")
    act = get_impl(g1.op, "torch").fn(g1, TORCH, target, x, aligned, w1, b1)
    return (act, aligned, w, b)


def _reference(program: MoEProgram, op: str, args: tuple):
    problem = program.op(op)
    if problem.op == "route":
        x, w, b, cb = args
        return ref.select_experts(ref.router_logits(x, w, b), route_config(problem), cb)
    if problem.op == "align":
        weights, ids = args
        return ref.align(weights, ids, problem["E"], problem["BM"])
    b = None if args[3] is None else args[3].float()
    if problem.op == "qgemm1":  # the quantized weight as it is: the reference dequantizes it
        return ref.qgemm1(problem, args[0].float(), args[1], args[2], b)
    if problem.op == "qgemm2":
        return ref.qgemm2(problem, args[0].float(), args[1], args[2], b, args[1].inverse.shape[0])
    if problem.op == "gemm1":
        x, aligned, w, _ = args
        return ref.gemm1(problem, x.float(), aligned, w.float(), b)
    act, aligned, w, _ = args
    return ref.gemm2(problem, act.float(), aligned, w.float(), b, aligned.inverse.shape[0])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _error(problem_op: str, got, want) -> float:
    """Relative error of an op's output; exact-match ops (align, route ids) give inf on any mismatch."""
    if problem_op == "align":
        # a no-host-sync align (Triton's) appends empty blocks (kernels/ops.py): compare the used blocks and
        # check that the tail is empty (expert -1, pad rows: token 0, weight 0, slot -1)
        used = got.trimmed()
        tail = slice(used.num_blocks, None)
        empty = (
            bool((got.block_expert[tail] == -1).all())
            and bool((got.sorted_token[tail] == 0).all())
            and bool((got.sorted_weight[tail] == 0).all())
            and bool((got.sorted_slot[tail] == -1).all())
        )
        fields = ("sorted_token", "sorted_weight", "sorted_slot", "block_expert", "inverse", "counts", "offsets")
        same = all(torch.equal(getattr(used, f), getattr(want, f)) for f in fields)
        return 0.0 if same and empty else float("inf")
    if problem_op == "route":
        (gw, gi), (ww, wi) = got, want
        if not torch.equal(gi.long(), wi.long()):
            return float("inf")
        return _rel(gw, ww)
    return _rel(got, want)


def _to(value, device: torch.device):
    """Move a case's tensors (and Aligned fields) to the device a CUDA-target candidate runs on."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Aligned):
        return Aligned(*(getattr(value, f.name).to(device) for f in dataclasses.fields(Aligned)))
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value


@lru_cache(maxsize=4)
def _inputs(cfg_json: str, target_name: str, m: int, op: str, seed: int) -> tuple[list, list]:
    """The op's verification cases [(name, args, reference output, error limit)] and three timing input sets.

    They depend on the problem and the seed, not on the candidate, so a worker makes them once per study (the
    torch backend's upstream ops and the reference take most of a trial's time otherwise). They are made on the
    target's device (a GPU computes its own references: Mixtral's at T=4096 are TFLOPs), the references then
    kept on the host, where the checks compare."""
    target = resolve_target(target_name)
    device, host = torch.device(target.torch_device), torch.device("cpu")
    layer = _layer(cfg_json, device.type)
    cfg = layer.cfg
    program = lower(cfg, m, target_kind=target.kind)
    problem = program.op(op)
    gen = torch.Generator().manual_seed(seed + 1)
    checks = []
    for name, t, one in (("T=1", 1, False), ("one-expert", max(2, m // 2), True), (f"T={m}", m, False)):
        x = torch.randn(t, cfg.hidden_size, generator=gen).to(device, cfg.torch_dtype)
        args = _case(layer, program, op, x, one)
        want = _to(_reference(program, op, args), host)
        limit = 1e-4
        if cfg.dtype != "float32" and problem.gemm is not None:
            torch_out = _to(get_impl(problem.op, "torch").fn(problem, TORCH, target, *args), host)
            limit = 2 * _error(problem.op, torch_out, want) + 1e-3
        checks.append((name, args, want, limit))
    sets = [_case(layer, program, op, torch.randn(m, cfg.hidden_size).to(device, cfg.torch_dtype), False)
            for _ in range(3)]  # fmt: skip
    return checks, sets


def evaluate(task: Task) -> Result:
    started = time.monotonic()
    for module in task.imports:
        importlib.import_module(module)
    import json

    cfg_json = json.dumps(task.cfg, sort_keys=True)
    cfg = MoEConfig.from_dict(task.cfg)
    target = resolve_target(task.target)
    program = lower(cfg, task.m_tokens, target_kind=target.kind)
    problem = program.op(task.op)
    impl = get_impl(problem.op, task.backend)
    config = KernelConfig.of(task.backend, task.params)
    # inputs are made on the target's device by the torch backend (_inputs); outputs are checked on the host
    device = torch.device(target.torch_device)

    def run(args):
        return _to(impl.fn(problem, config, target, *_to(args, device)), torch.device("cpu"))

    def run_timed(args):  # timing: inputs already on the device, no copy back (a GPU is timed by its events)
        return impl.fn(problem, config, target, *args)

    checks, sets = _inputs(cfg_json, task.target, task.m_tokens, task.op, task.seed)
    # 1. verify on fresh inputs and edge cases (T = 1, one expert takes every token, the study's T)
    worst, last_call = 0.0, 0.0
    for name, args, want, limit in checks:
        start = time.perf_counter()
        got = run(args)
        last_call = time.perf_counter() - start  # the last check runs the study's T: a warm-up call too
        err = _error(problem.op, got, want)
        if not err <= limit:
            return Result(
                False,
                f"wrong result on {name}: rel err {err:.3g} > {limit:.3g}",
                max_rel_err=err,
                seconds=time.monotonic() - started,
            )
        worst = max(worst, err)
    # 2. time on rotating inputs of the study's T
    sets = [_to(args, device) for args in sets]
    with torch.no_grad():
        warmup = 0 if device.type == "cpu" and last_call > WARMUP_ENOUGH_S else task.warmup
        timing = measure(
            run_timed,
            sets,
            warmup=warmup,
            repeat=task.repeat,
            max_seconds=task.max_seconds,
            device=device.type,
            cutoff_ms=task.cutoff_ms,
        )
    return Result(True, None, timing.p20_ms, timing.p50_ms, timing.p80_ms, worst, time.monotonic() - started)
