"""Benchmarks of a whole MoE layer: moetune against what users would run instead, on this machine.

layer.py     providers (reference, HF implementations, torch, untuned, tuned) timed on the same weights
hf.py        Hugging Face transformers' own MoE blocks as providers
roofline.py  this machine's measured ceilings and a layer's work and traffic
report.py    the table, the JSON report and the plots
"""
