"""moetune.autotune: the search (Optuna), measurement, kernel database and the `moetune` CLI."""
