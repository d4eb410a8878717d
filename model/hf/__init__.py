"""Hugging Face models on moetune's kernels.

blocks.py  HF sparse-MoE blocks read as moetune layers (MoEConfig off the modules, weights in moetune's layout)
patch.py   patch(model) and register_hf() (transformers' experts_implementation="moetune")
"""
