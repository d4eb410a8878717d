"""`python -m moetune.autotune.cli ...`: the `moetune` command (the tune workers start their children this way)."""

from moetune.autotune.cli.app import app

app(prog_name="moetune")
