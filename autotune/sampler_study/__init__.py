"""The sampler study (`moetune study`): how many trials each of the tuner's samplers needs on a space.

grid.py    study problems and their exhaustively measured grids
replay.py  each sampler replayed on a measured grid (trials to within 5% of the grid's best)
report.py  Markdown tables and the plot
"""
