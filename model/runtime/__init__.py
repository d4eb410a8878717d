"""Running a layer on chosen kernels: the plan (which kernel runs each op at a token count) and TunedMoE.

plan.py   LayerPlan: lowers the config per M bucket, picks (backend, config) per op (explicit configs, the
          kernel DB, else the first backend's default point) and runs route -> align -> gemm1 -> gemm2
tuned.py  TunedMoE, the drop-in nn.Module, and its weight sources (a moetune MoE, a Hugging Face block,
          transformers' experts interface)
Reads the kernel DB (moetune.kernels.db); never imports the tuner.
"""
