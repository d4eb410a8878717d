"""The `tvm` backend: TVM TensorIR scheduled for the host CPU by schedules/tvm_cpu.py, compiled by LLVM.

launchers.py  pack weights into panels, check shapes, allocate, launch
build.py      compile a scheduled op for a target, through the shared build cache (kernels/cache.py)
"""
