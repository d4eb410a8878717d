"""Distillation: a dense BERT-style teacher -> an MoE student that runs on moetune's kernels.

pipeline.py  distill(): load the teacher, MoEfy it, train (kd.py), report
moefy.py     split each dense FFN into experts by neuron co-activation, fit a router per layer
kd.py        the layer-wise and end-to-end knowledge-distillation stages
student.py   the student encoder (BERT with MoE FFNs) and its sentence embedding
text.py      real English text (Debian's fortunes), with a fixed held-out split
"""
