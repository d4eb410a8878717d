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

The reference semantics of all four live in kernels/reference.py (`align_reference` et al.).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Aligned:
    """The S routed rows sorted by expert, each expert's rows padded to a multiple of BM.

    Padded position p = block * BM + row. Pad rows read token 0 with weight 0 (so kernels need no bounds
    checks; their results are never combined) and have slot -1.
    """

    sorted_token: torch.Tensor  # (NB, BM) int32: token of each padded row (pad: 0)
    sorted_weight: torch.Tensor  # (NB, BM) fp32: routing weight of each padded row (pad: 0)
    sorted_slot: torch.Tensor  # (NB, BM) int32: flat slot t*K+k of each padded row (pad: -1)
    block_expert: torch.Tensor  # (NB,) int32: the expert of each block
    inverse: torch.Tensor  # (T, K) int32: padded position of slot (t, k)
    counts: torch.Tensor  # (E,) int32: rows per expert (sum = S)
    offsets: torch.Tensor  # (E+1,) int32: padded row offset of each expert (offsets[E] = NB*BM)

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    @property
    def block_m(self) -> int:
        return self.sorted_token.shape[1]


def max_blocks(s_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of NB: every expert with rows adds at most one partly filled block."""
    return -(-s_rows // block_m) + min(num_experts, s_rows)
