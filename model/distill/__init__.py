"""Distillation: a dense BERT-style teacher -> an MoE student that runs on moetune's kernels.

pipeline.py  distill(): load the teacher, MoEfy it, train (kd.py), report
moefy.py     split each dense FFN into a shared expert (most important neurons) + routed experts (co-activation)
recipe.py    the default recipe (E, K, shared width, schedule) of distill() and `moetune distill`
kd.py        the layer-wise and end-to-end knowledge-distillation stages
student.py   the student encoder (BERT with MoE FFNs) and its sentence embedding
text.py      real English text (Debian's fortunes, with a fixed held-out split; manual pages and docs as extra)
"""
