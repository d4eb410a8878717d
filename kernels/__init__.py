"""moetune.kernels: the ops' reference, their implementations per backend, and the kernel database.

ops.py        the launcher contract: one signature per op, the Aligned routing data, input checks
reference.py  the one reference of every op (readable torch), which tests and benchmarks compare against
registry.py   backends and their implementations (register_impl / get_impl), preference per target kind
cache.py      the cache root, the build cache of compiled kernels, the memo of derived weights
db/           the kernel database (written by the tuner, read by the runtime)
torch/ triton/ tvm_cpu/ tvm_cuda/   one subpackage per backend: its kernels, launchers, build and launch helpers
"""
