"""Timing: warm-up, then many timed calls on rotating inputs; report p20 / p50 / p80.

CPU kernels are synchronous, so a perf_counter around each call times the kernel itself. On a GPU
(`measure(..., device="cuda")`) the clock is the device's: CUDA events recorded on the stream around each call.
A call whose kernels are short (p50 under GRAPH_BELOW_MS) is dominated by the host's launch overhead, which a
model served with CUDA graphs does not pay: such a call is captured into a CUDA graph (GRAPH_CALLS calls over
the rotating inputs per replay), and each replay's events give one sample per call. A call that cannot be
captured (it reads a value on the host: the torch backend's align does) keeps its event timings, and the
Timing says which clock it came from. Inputs rotate through several random sets so caches do not flatter a
provider that reads the same few bytes every call; never zeros.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MIN_SAMPLES = 3  # samples before a time limit or a cutoff may end the timing
WARMUP_ENOUGH_S = 0.25  # a warm-up call this slow ends the warm-up
GRAPH_BELOW_MS = 0.5  # GPU calls faster than this are timed as CUDA graph replays
GRAPH_CALLS = 20  # calls captured per graph (over the rotating inputs); a replay's time / GRAPH_CALLS is a sample


@dataclass(frozen=True)
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    n: int
    clock: str = "wall"  # wall (host perf_counter) | events (CUDA events per call) | graph (CUDA graph replays)


def quantiles_ms(samples_s: Sequence[float], clock: str = "wall") -> Timing:
    ms = sorted(s * 1e3 for s in samples_s)
    if len(ms) == 1:
        return Timing(ms[0], ms[0], ms[0], 1, clock)
    q = statistics.quantiles(ms, n=10, method="inclusive")  # deciles: q[1] = p20, q[4] = p50, q[7] = p80
    return Timing(q[1], q[4], q[7], len(ms), clock)


def measure(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    warmup: int = 2,
    repeat: int = 10,
    max_seconds: float = 20.0,
    device: str = "cpu",
    cutoff_ms: float | None = None,
) -> Timing:
    """Time fn(inputs[i % len(inputs)]) `repeat` times after `warmup` calls (fewer if max_seconds runs out).

    A warm-up call slower than WARMUP_ENOUGH_S ends the warm-up (a call that long is past cold caches).
    cutoff_ms (CPU): stop after MIN_SAMPLES once their median is over it; the tuner passes a multiple of the
    study's best, so a clearly slower candidate costs 3 timed calls instead of `repeat`.
    device "cuda": device-side timing (measure_cuda); fn must launch on torch's current stream."""
    if device.startswith("cuda"):
        return measure_cuda(fn, inputs, warmup, repeat, max_seconds)
    for i in range(warmup):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        if time.perf_counter() - start > WARMUP_ENOUGH_S:
            break
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for i in range(repeat):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        samples.append(time.perf_counter() - start)
        if len(samples) >= MIN_SAMPLES and time.perf_counter() > deadline:
            break
        if cutoff_ms is not None and len(samples) >= MIN_SAMPLES and statistics.median(samples) * 1e3 > cutoff_ms:
            break
    return quantiles_ms(samples)


def measure_interleaved(
    fns: dict[str, Callable[[Any], Any]],
    inputs: Sequence[Any],
    warmup: int = 1,
    repeat: int = 10,
    max_seconds: float = 20.0,
) -> dict[str, Timing]:
    """CPU timings of several callables compared with each other: after `warmup` calls each, `repeat` rounds
    call every one once on the round's input, in an order rotated each round, so a host whose speed drifts
    (a VM's read bandwidth moved 30-50% within a minute: results/) slows all of them alike and their ratios
    hold. Stops after MIN_SAMPLES rounds once max_seconds per callable have passed."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](inputs[i % len(inputs)])
    samples: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + max_seconds * len(names)
    for i in range(repeat):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            start = time.perf_counter()
            fns[name](inputs[i % len(inputs)])
            samples[name].append(time.perf_counter() - start)
        if i + 1 >= MIN_SAMPLES and time.perf_counter() > deadline:
            break
    return {name: quantiles_ms(samples[name]) for name in names}


def measure_cuda(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    warmup: int = 2,
    repeat: int = 10,
    max_seconds: float = 20.0,
    graph_below_ms: float = GRAPH_BELOW_MS,
) -> Timing:
    """Device-side timing of a GPU call: CUDA events per call, or CUDA graph replays for short calls."""
    import torch

    for i in range(max(1, warmup)):  # the first call compiles / loads modules: never inside a capture
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    deadline = time.perf_counter() + max_seconds
    pairs = []
    for i in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        pairs.append((start, end))
        if len(pairs) >= 3 and time.perf_counter() > deadline:
            break
    torch.cuda.synchronize()
    events = quantiles_ms([s.elapsed_time(e) * 1e-3 for s, e in pairs], "events")
    if events.p50_ms >= graph_below_ms:
        return events
    replays = _graph_replays(fn, inputs, repeat)
    return events if replays is None else quantiles_ms(replays, "graph")


def _graph_replays(fn: Callable[[Any], Any], inputs: Sequence[Any], repeat: int) -> list[float] | None:
    """Per-call seconds of `repeat` replays of a graph of GRAPH_CALLS calls; None when fn cannot be captured."""
    import torch

    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # a call that waits on the device cannot be captured: ask first
    try:
        fn(inputs[0])
    except RuntimeError:
        return None
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants (allocator pools, lazy init)
        for i in range(len(inputs)):
            fn(inputs[i])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(GRAPH_CALLS):
                fn(inputs[i % len(inputs)])
    except Exception:  # an unsupported call during capture that the sync check did not see
        torch.cuda.synchronize()
        return None
    graph.replay()  # first replay uploads the graph
    samples = []
    for _ in range(max(3, repeat)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / GRAPH_CALLS)
    del graph
    return samples


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None (then nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine_name(device: str = "cpu") -> str:
    """A stable folder name for results/: CPU model, LLVM's name of its microarchitecture and core count
    (amd-epyc-znver4-2c-x86_64: two EPYC machines of different generations report the same model name), or
    the GPU's name (device "cuda[:i]")."""
    from moetune.ir.target import device_slug, host_cpu

    if device.startswith("cuda"):
        import torch

        return device_slug(torch.cuda.get_device_name(torch.device(device)))  # e.g. nvidia-h100-80gb-hbm3
    cpu = host_cpu()
    mcpu = cpu["target"].rpartition("-mcpu=")[2]
    return f"{device_slug(cpu['name'])}-{device_slug(mcpu)}-{cpu['cores']}c-{platform.machine()}"
