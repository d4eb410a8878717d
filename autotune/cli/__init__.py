"""The `moetune` command line (typer + rich): app.py mounts one module per command group.

app.py            the typer app: targets, presets, and every command below
tune.py           moetune tune (live view, summary; --prepare for a GPU arch)
tune_parallel.py  moetune tune --workers N (N tuning processes, one combined view)
bench.py          moetune bench
study.py          moetune study grid | run
db.py             moetune db ls | show | export | import | prune
package.py        moetune package | run
distill.py        moetune distill
common.py         consoles, one-line failures (exit 2), JSON output
"""

from moetune.autotune.cli.app import app

__all__ = ["app"]
