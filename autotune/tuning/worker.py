"""Trial evaluation in an isolated worker process: build -> verify against the reference -> time.

The parent (autotune/tuning/search.py) talks to one long-lived worker over JSON lines (`python -m
moetune.autotune.tuning.worker`); keeping the process alive amortises the seconds of importing torch and TVM and of
building the layer's weights. A compile error or a wrong result comes back as a failed result with its
reason; a crash (segfault, OOM kill) or a hang past the timeout kills the worker, the parent records the
trial as failed, and the next trial starts a fresh worker; so does a sticky CUDA error (an illegal address, a
device-side assert), after which the worker answers the failed trial and exits. Nothing a candidate does can
stop the run.

The protocol uses a private copy of the worker's stdout; fd 1 itself is pointed at stderr so that prints
from native code cannot corrupt it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

from moetune.autotune.tuning.trial import Result, Task

# ---- parent side ---------------------------------------------------------------------------------------------------


READY = '{"ready": true}'
STARTUP_TIMEOUT_S = 300.0  # imports only (torch, TVM); a loaded machine can take tens of seconds


class Worker:
    """A restartable worker subprocess; `run(task, timeout)` never raises for a candidate's failure."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def _start(self, startup_timeout: float = STARTUP_TIMEOUT_S) -> subprocess.Popen | None:
        """The running worker, or a fresh one that has finished its imports (they are not a trial's time)."""
        import selectors

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moetune.autotune.tuning.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=self.env,
                start_new_session=True,
            )
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                ready = sel.select(startup_timeout) and self.proc.stdout.readline().strip() == READY
            if not ready:
                self.kill()
                return None
        return self.proc

    def run(self, task: Task, timeout: float) -> Result:
        import selectors

        proc = self._start()
        started = time.monotonic()
        if proc is None:
            return Result(False, f"crashed: the worker did not start within {STARTUP_TIMEOUT_S:.0f} s", seconds=0.0)
        try:
            proc.stdin.write(json.dumps(asdict(task)) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            return self._died(started)
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.kill()
                return Result(False, f"timeout: no result within {timeout:.0f} s", seconds=timeout)
        line = proc.stdout.readline()
        if not line:
            return self._died(started)
        result = Result(**json.loads(line))
        result.seconds = time.monotonic() - started
        if result.details.get("restart"):  # the worker's CUDA context is lost: it exits, the next trial starts one
            self.close()
        return result

    def _died(self, started: float) -> Result:
        code = self.proc.wait() if self.proc is not None else None
        self.proc = None
        if code is not None and code < 0:
            reason = f"crashed: killed by {signal.Signals(-code).name}"
        else:
            reason = f"crashed: worker exited with code {code}"
        return Result(False, reason, seconds=time.monotonic() - started)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


# ---- worker side ---------------------------------------------------------------------------------------------------


def serve() -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # native prints go to stderr, never into the protocol
    from moetune.autotune.tuning.evaluate import evaluate

    proto.write(READY + "\n")
    proto.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        raw = json.loads(line)
        task = Task(**{**raw, "imports": tuple(raw.get("imports", ()))})
        try:
            result = evaluate(task)
        except Exception as exc:  # a candidate's Python-level failure is a failed trial, not a dead worker
            result = Result(False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
            if sticky_device_error(exc):
                result.error += " (the worker's CUDA context is lost: a fresh worker takes the next trial)"
                result.details["restart"] = True
        proto.write(json.dumps(asdict(result)) + "\n")
        proto.flush()
        if result.details.get("restart"):
            return


# CUDA errors after which every later call in the process fails (the context is corrupted), as CUDA reports them
_STICKY = ("illegal memory access", "unspecified launch failure", "misaligned address", "device-side assert",
           "illegal instruction", "an illegal", "cudaErrorLaunchFailure", "CUDA_ERROR_ILLEGAL_ADDRESS")  # fmt: skip


def sticky_device_error(exc: BaseException) -> bool:
    """A GPU error that poisons the process's CUDA context: the worker must end, not run the next candidate."""
    text = f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ == "AcceleratorError" or any(s in text for s in _STICKY)


if __name__ == "__main__":
    serve()
