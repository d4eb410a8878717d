"""This machine's roofline, measured in the run that uses it, and the work and traffic of one MoE layer forward.

Ceilings (torch on the threads the benchmark uses, the fastest of several calls: a ceiling is the best the
machine does, and a busy neighbour only ever slows a call down; a median let one noisy run halve the bandwidth):
  peak GFLOP/s   a square N x N x N matmul per dtype (fp32 sgemm; bf16/fp16 where torch has a CPU kernel)
  read GB/s      summing a large fp32 tensor (every byte read once; what streaming weights needs)
  copy GB/s      copying a large fp32 tensor, counted as read + write (the GPU's roof; reported on a CPU)
A cell's roof: min(peak, bandwidth x arithmetic intensity) GFLOP/s, with intensity = useful FLOPs / bytes;
the bandwidth is the read rate on a CPU and the copy rate on a GPU, whose targets are stated against its
measured copy bandwidth. The peak used for a cell is the best measured matmul rate of the cell's dtype or of
fp32 (a kernel may always upcast to fp32 and compute there, which is what the CPU kernels here do for bf16).
On a GPU (device "cuda") the same measurements run on the device, timed by CUDA events: a matmul of n = 8192
and a 1 GiB copy are far past launch overhead and the 50 MB L2.

Bytes of a forward at T tokens (what has to come from memory at least once): the router weights, the
weights of the experts that the batch's routing actually touches (counted on the benchmark's own inputs),
the shared expert's weights, biases, and the activations in and out (T x H each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moetune.model.config import MoEConfig


@dataclass(frozen=True)
class Machine:
    """Measured ceilings: matmul GFLOP/s per dtype and stream bandwidths in GB/s."""

    peak_gflops: dict[str, float]
    read_gbs: float
    copy_gbs: float
    matmul_n: dict[str, int]  # the square size each dtype's peak was measured at
    stream_bytes: int
    device: str = "cpu"

    @property
    def roof_stream(self) -> str:
        """Which bandwidth the roof uses: "read" on a CPU, "copy" on a GPU (see the module doc)."""
        return "copy" if self.device.startswith("cuda") else "read"

    @property
    def roof_gbs(self) -> float:
        return self.copy_gbs if self.roof_stream == "copy" else self.read_gbs

    def peak_for(self, dtype: str) -> float:
        return max(self.peak_gflops.get(dtype, 0.0), self.peak_gflops.get("float32", 0.0))

    def roof_gflops(self, flops: float, nbytes: float, dtype: str) -> float:
        """min(peak, bandwidth x intensity) for a piece of work of `flops` that moves `nbytes`."""
        return min(self.peak_for(dtype), self.roof_gbs * flops / nbytes)


def _fastest_seconds(fn, calls: int, device: str = "cpu") -> float:
    fn()  # warm-up: page faults, oneDNN kernel selection, cuBLAS handles
    samples = []
    cuda = device.startswith("cuda")
    for _ in range(calls):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3)
        else:
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return min(samples)


def measure_matmul(
    dtype: str, n: int = 2048, calls: int = 5, call_budget_s: float = 2.0, device: str = "cpu"
) -> tuple[float, int]:
    """(GFLOP/s, size used) of the faster of torch.mm(a, b) and F.linear(a, b) (a @ b.T) on n x n inputs.

    A dtype without a fast CPU kernel (bf16 without AVX-512 BF16 runs at a few GFLOP/s here) is measured at
    a smaller size, probed first, so that one call stays within about `call_budget_s`. On a GPU: n itself."""
    dt = getattr(torch, dtype)
    if device.startswith("cuda"):
        a, b = (torch.randn(n, n, device=device).to(dt) for _ in range(2))
        seconds = min(
            _fastest_seconds(lambda: torch.mm(a, b), calls, device),
            _fastest_seconds(lambda: torch.nn.functional.linear(a, b), calls, device),
        )
        return 2 * n**3 / seconds / 1e9, n
    rate = 0.0
    for size in sorted({min(n, 256), min(n, 512), min(n, 1024), n}):
        a, b = torch.randn(size, size).to(dt), torch.randn(size, size).to(dt)
        seconds = min(
            _fastest_seconds(lambda a=a, b=b: torch.mm(a, b), calls),
            _fastest_seconds(lambda a=a, b=b: torch.nn.functional.linear(a, b), calls),
        )
        rate = 2 * size**3 / seconds / 1e9
        bigger = next((s for s in (512, 1024, n) if s > size), None)
        if bigger is None or 2 * bigger**3 / (rate * 1e9) > call_budget_s:
            return rate, size
    return rate, n


def measure_bandwidth(nbytes: int = 1 << 30, calls: int = 5, device: str = "cpu") -> tuple[float, float]:
    """(read GB/s, copy GB/s) over an fp32 tensor of `nbytes` (far larger than any cache).

    Read: the faster of a sum (one stream per thread) and a matrix-vector product over the same bytes (its kernels
    walk several rows at once: several streams per thread). A core keeps more lines in flight with more streams:
    on the Intel Emerald Rapids host (2 vCPUs) sum 19.5 GB/s, GEMV 21.5, a C loop with 4 streams per thread
    25-28; the ceiling a kernel is held to should not be the lowest of these."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    readers = [lambda: src.sum()]
    if src.numel() % 1024 == 0:
        ones = torch.ones(1024, device=device)
        readers.append(lambda: torch.mv(src.view(-1, 1024), ones))
    read = nbytes / min(_fastest_seconds(fn, calls, device) for fn in readers) / 1e9
    copy = 2 * nbytes / _fastest_seconds(lambda: dst.copy_(src), calls, device) / 1e9
    return read, copy


def measure_machine(
    dtypes: tuple[str, ...] = ("float32",), n: int = 2048, nbytes: int = 1 << 30, device: str = "cpu"
) -> Machine:
    """The ceilings of the host CPU (device "cpu", on torch's threads) or of a GPU (device "cuda[:i]")."""
    peaks, sizes = {}, {}
    for d in dict.fromkeys(("float32", *dtypes)):
        rate, size = measure_matmul(d, n, device=device)
        peaks[d], sizes[d] = round(rate, 2), size
    read, copy = measure_bandwidth(nbytes, device=device)
    return Machine(peaks, round(read, 2), round(copy, 2), sizes, nbytes, device)


# ---- the layer's work and traffic ---------------------------------------------------------------------------------
def expert_bytes(cfg: MoEConfig) -> int:
    """Bytes of one routed expert's weights (gate_up + down, and their biases); quantized: codes + fp16 scales."""
    h, i, u = cfg.hidden_size, cfg.intermediate_size, cfg.up_factor
    size = torch.finfo(cfg.torch_dtype).bits // 8
    weights, biases = u * i * h + h * i, ((u * i + h) if cfg.expert_bias else 0)
    if cfg.quant == "none":
        return (weights + biases) * size
    return weights * cfg.quant_bits // 8 + weights // cfg.quant_group * 2 + biases * size


def layer_bytes(cfg: MoEConfig, tokens: int, experts_touched: float) -> float:
    """Bytes one forward must move at least: touched experts, router, shared expert, activations in and out."""
    size = torch.finfo(cfg.torch_dtype).bits // 8
    h, s = cfg.hidden_size, cfg.shared_size
    router = (cfg.num_experts * h + (cfg.num_experts if cfg.router_bias else 0)) * size
    shared = (cfg.up_factor * s * h + h * s + (h if cfg.shared_expert_gate else 0)) * size
    return experts_touched * expert_bytes(cfg) + router + shared + 2 * tokens * h * size


def experts_touched(ids: torch.Tensor) -> int:
    """Distinct experts in a routing's ids (T, K)."""
    return int(torch.unique(ids).numel())
