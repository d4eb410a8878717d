"""The `torch` backend: every op in plain vectorised torch, always available (launchers.py)."""
