"""The `triton` backend (CUDA targets; the interpreter runs it on CPU tensors for tests).

launchers.py     check shapes, allocate, launch: one launcher per op, registered in kernels/registry.py
route_kernel.py, align_kernel.py, gemm_kernels.py   the @triton.jit kernels (+ their ahead-of-time specs)
common.py        compiled vs interpreted kernels, AotSpec, the kernel source hash
aot.py           which kernel a point launches, and the prepared verdicts the space's `aot` constraint reads
"""
