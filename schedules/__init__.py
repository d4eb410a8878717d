"""moetune.schedules: parameterised schedule templates and their search spaces, per backend and target."""
