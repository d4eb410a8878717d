"""The tuner: one Optuna study per (problem, target, M bucket), trials in an isolated worker, winners to the DB.

tuner.py     tune(cfg, target, m, trials, db) -> TuneReport: every op of the lowered layer, per M bucket
search.py    one op's study: baseline, samplers, early stop, the winner into the kernel DB
samplers.py  Optuna samplers and how a schedule point becomes trial parameters
storage.py   Optuna storages (a journal file on one host, an RDB with heartbeats for many)
trial.py     Task / Result: one trial as data
worker.py    the long-lived trial process (parent side, and `python -m` child side)
evaluate.py  what the worker does with a Task: build, check against the reference, time
prepare.py   compile every Triton candidate for a GPU architecture ahead of time (no GPU needed)
"""
