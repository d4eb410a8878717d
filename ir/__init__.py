"""moetune.ir: what to compile for which machine.

program.py     MoEConfig + a token count -> MoEProgram (ordered ops, each a Problem with its shapes)
target.py      hardware targets: the host CPU through LLVM, CUDA GPUs (detected or named), their limits
tvm_ir.py      TVM TensorIR of the GEMM-like ops (TE compute)
tvm_script.py  TVMScript of the data-dependent ops (top-k selection, align)
"""
