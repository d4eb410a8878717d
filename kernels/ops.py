"""The MoE ops' launcher signatures and the data they pass between them.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K routed rows, BM rows per block,
NB blocks (data dependent). Every backend implements each op with exactly this signature (see registry.py):

  route(problem, config, target, x (T,H), weight (E,H), bias (E,)|None, correction_bias (E,)|None)
      -> weights (T,K) fp32, ids (T,K) int32
  align(problem, config, target, weights (T,K) fp32, ids (T,K) int32) -> Aligned
  gemm1(problem, config, target, x (T,H), aligned, gate_up_proj (E,UI,H), gate_up_bias (E,UI)|None)
      -> act (NB,BM,I) in x's dtype; U = 2 when problem["gated"] (rows [gate | up]), else 1 (up only)
  gemm2(problem, config, target, act (NB,BM,I), aligned, down_proj (E,H,I), down_bias (E,H)|None)
      -> out (T,H) in act's dtype

The reference semantics of all four live in kernels/reference.py (`align`, `gemm1`, `gemm2`).

Empty blocks. An align that must not synchronise with the host (the Triton backend's, on a GPU: a decode step
cannot wait for the row counts) cannot size its output by the data, so it allocates the static upper bound
NB = max_blocks(S, E, BM) and leaves the blocks past the used ones *empty*: block_expert = -1, every row a
pad row (token 0, weight 0, slot -1). The used blocks always come first (offsets[E] = used blocks * BM <= NB*BM)
and are exactly what a host-synchronising align (reference, torch, tvm) returns. Every gemm accepts both:
gemm1 writes zeros into an empty block's rows (their values are never combined), gemm2 skips them (no slot
maps to them). So any backend's align can feed any backend's gemm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Aligned:
    """The S routed rows sorted by expert, each expert's rows padded to a multiple of BM.

    Padded position p = block * BM + row. Pad rows read token 0 with weight 0 (so kernels need no bounds
    checks; their results are never combined) and have slot -1. Trailing blocks may be empty (block_expert
    -1, all pad rows: see the module docstring).
    """

    sorted_token: torch.Tensor  # (NB, BM) int32: token of each padded row (pad: 0)
    sorted_weight: torch.Tensor  # (NB, BM) fp32: routing weight of each padded row (pad: 0)
    sorted_slot: torch.Tensor  # (NB, BM) int32: flat slot t*K+k of each padded row (pad: -1)
    block_expert: torch.Tensor  # (NB,) int32: the expert of each block (-1: an empty trailing block)
    inverse: torch.Tensor  # (T, K) int32: padded position of slot (t, k)
    counts: torch.Tensor  # (E,) int32: rows per expert (sum = S)
    offsets: torch.Tensor  # (E+1,) int32: padded row offset of each expert (offsets[E] = used blocks * BM)

    @property
    def num_blocks(self) -> int:
        """NB, empty trailing blocks included (static for a no-host-sync align)."""
        return self.block_expert.shape[0]

    @property
    def block_m(self) -> int:
        return self.sorted_token.shape[1]

    def used_blocks(self) -> int:
        """Blocks that hold rows (offsets[E] / BM). Reads a device value: a host sync on a GPU."""
        return int(self.offsets[-1]) // self.block_m

    def trimmed(self) -> Aligned:
        """The same rows without the empty trailing blocks (what a host-synchronising align returns)."""
        nb = self.used_blocks()
        if nb == self.num_blocks:
            return self
        return Aligned(
            self.sorted_token[:nb],
            self.sorted_weight[:nb],
            self.sorted_slot[:nb],
            self.block_expert[:nb],
            self.inverse,
            self.counts,
            self.offsets,
        )


def max_blocks(s_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of NB. At most min(E, S) experts have rows, and an expert with c rows has ceil(c / BM) <=
    (c + BM - 1) / BM blocks, so NB <= (S + min(E, S) * (BM - 1)) // BM (exact for BM = 1: NB = S)."""
    return (s_rows + min(num_experts, s_rows) * (block_m - 1)) // block_m


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    """A launcher's input check: `t` has exactly `shape` (and `dtype`), else a ValueError naming it."""
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{name}: expected {shape} {dtype or ''}, got {tuple(t.shape)} {t.dtype}")
