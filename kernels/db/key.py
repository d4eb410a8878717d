"""The one constructor of a kernel DB key, and the keys of a whole layer.

A key is (target string, op signature, dtype, M bucket). The op signature depends on how the layer was lowered,
and lowering depends on the target's kind (BM differs between CPU and CUDA), so a key built from a program
lowered for another kind names a problem nobody tuned: that is how `moetune tune --target cuda --workers N`
once summarised nothing. The tuner, the runtime and the workers' summary all build keys here.
"""

from __future__ import annotations

from moetune.ir.program import Problem, lower, m_bucket
from moetune.ir.target import Target
from moetune.kernels.db.records import KernelKey
from moetune.model.config import MoEConfig


def kernel_key(target: Target | str, problem: Problem, m_tokens: int) -> KernelKey:
    """The key of `problem` (lowered for this target's kind) at the M bucket of `m_tokens`."""
    return KernelKey(str(target), problem.signature, problem.dtype, m_bucket(m_tokens))


def layer_keys(cfg: MoEConfig, target: Target, m_tokens: int) -> dict[str, KernelKey]:
    """Every op of `cfg`'s layer, lowered for `target` at the M bucket of `m_tokens` -> its key."""
    program = lower(cfg, m_bucket(m_tokens), target_kind=target.kind)
    return {op.name: kernel_key(target, op.problem, m_tokens) for op in program}
