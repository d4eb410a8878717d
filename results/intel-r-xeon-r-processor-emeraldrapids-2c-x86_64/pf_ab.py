"""A/B of the dot-product kernels' software prefetch distance: qwen3-30b-a3b at T (ARGV[2]) in format ARGV[1]
(bf16 or w8a8 / w4a8 on fp32; fp32 runs the TE kernels, which have no pf), both GEMMs at their default config
with pf = each of ARGV[4] (KiB, comma-separated; NT:PF also sets both panel widths to NT, mt 1; NT:PF:ORDER
also the order, NT 0 keeping the default width). 64 rotating
inputs (8 at T > 16: the weights stream from memory), ROUNDS (ARGV[3]) rounds, the variants interleaved call by
call, each on another input; per-op and layer p50 ms. The loop is ../amd-epyc-znver4-2c-x86_64/session9/point_ab.py
(any point); this script names its variants."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "amd-epyc-znver4-2c-x86_64" / "session9"))
from point_ab import main


def _point(variant: str) -> str:
    """PF | NT:PF | NT:PF:ORDER -> point_ab's key=value overrides."""
    parts = variant.split(":")
    over = [f"pf={parts[1] if len(parts) > 1 else parts[0]}"]
    if len(parts) > 1 and int(parts[0]):
        over += [f"nt={parts[0]}", "mt=1"]
    if len(parts) > 2:
        over.append(f"order={parts[2]}")
    return ",".join(over)


fmt, t = sys.argv[1], sys.argv[2]
rounds = sys.argv[3] if len(sys.argv) > 3 else "3"
sys.argv = [sys.argv[0], fmt, t, rounds, ";".join(_point(v) for v in sys.argv[4].split(","))]
main()
