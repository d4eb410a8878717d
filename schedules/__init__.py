"""moetune.schedules: search spaces as data, and the schedule templates that apply a point, per backend.

space.py     SearchSpace: named parameters, choices and named constraints
tvm_cpu.py   the `tvm` backend on CPUs: register-tiled GEMM schedules, spaces sized to the SIMD registers
tvm_cuda.py  the `tvm_cuda` backend: CUDA GEMM schedules and their shared-memory / thread limits
triton.py    the `triton` backend's configs (BLOCK_M/N/K, GROUP_M, warps, stages) and static limits
"""
