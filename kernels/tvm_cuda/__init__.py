"""The `tvm_cuda` backend: TVM-scheduled CUDA GEMMs compiled to cubins by nvcc, launched through CuPy.

launchers.py    emit CUDA source, compile (cached in kernels/cache.py's build cache), launch
cupy_launch.py  launch a cached cubin from torch tensors (what a deployed model needs: no TVM, no nvcc)
"""
