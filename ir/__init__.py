"""moetune.ir: lowering of a MoEConfig into a MoEProgram (ordered ops with shapes) and its TVM / Triton IR."""
