"""Launch a compiled cubin through CuPy from torch tensors: what a deployed model needs (no TVM, no nvcc).

A kernel's launch metadata (kernels/tvm_cuda/launchers.py writes it next to the cubin) lists its name, its arguments in
order (name, dtype, pointer or int32 scalar) and its grid as [symbol, multiplier, divisor] per dimension
(extent = ceil(symbol * multiplier / divisor); symbol null: the constant multiplier). The symbols are the
launch's data-dependent sizes (NB blocks, T tokens), read from the tensors' shapes, so one cubin serves every
batch. Arguments go in as raw device pointers (`data_ptr()`) and the kernel runs on torch's current stream.
CuPy is imported on the first launch only (the CPU machines that build cubins have none).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int32": torch.int32,
}


def extent(dim: list, sizes: dict[str, int]) -> int:
    symbol, mul, div = dim
    value = mul if symbol is None else sizes[symbol] * mul
    return -(-value // div)


def grid_of(kernel: dict[str, Any], sizes: dict[str, int]) -> tuple[int, int, int]:
    return tuple(extent(d, sizes) for d in kernel["grid"])


@cache
def _module(path: str):
    import cupy

    return cupy.RawModule(path=path)


def _function(path: str, name: str):
    return _module(path).get_function(name)


def launch(cubin: str, kernel: dict[str, Any], tensors: dict[str, torch.Tensor], sizes: dict[str, int]) -> None:
    """Launch one kernel of `cubin` with named tensors and sizes (checked against the metadata)."""
    import cupy
    import numpy as np

    grid = grid_of(kernel, sizes)
    if 0 in grid:
        return  # nothing to do (no blocks)
    args = []
    device = None
    for arg in kernel["args"]:
        name, dtype = arg["name"], arg["dtype"]
        if arg["pointer"]:
            t = tensors[name]
            if t.dtype != TORCH_DTYPES[dtype] or not t.is_cuda or not t.is_contiguous():
                raise ValueError(f"{kernel['name']} argument {name}: want contiguous cuda {dtype}, got {t.dtype}")
            device = t.device
            args.append(np.uint64(t.data_ptr()))
        else:
            args.append(np.int32(sizes[name]))
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        _function(cubin, kernel["name"])(grid, tuple(kernel["block"]), tuple(args), shared_mem=kernel["dynamic_smem"])
