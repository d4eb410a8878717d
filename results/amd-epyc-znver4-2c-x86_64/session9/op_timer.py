"""Per-op wall times of TunedMoE layers for this folder's scripts: importing it wraps Plan.run, and each call's
time lands in times[(label[0], op name)]; a script sets label[0] to the variant or mode it is running."""

import collections
import time

from moetune.model.runtime import plan as planmod

times: dict[tuple, list[float]] = collections.defaultdict(list)
label: list = [None]
_run = planmod.Plan.run


def _timed_run(self, op, *args, **kwargs):
    t0 = time.perf_counter()
    out = _run(self, op, *args, **kwargs)
    times[(label[0], op)].append(time.perf_counter() - t0)
    return out


planmod.Plan.run = _timed_run
