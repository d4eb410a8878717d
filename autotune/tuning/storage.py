"""Optuna storages for the tuner's studies: a journal file (one host) or an RDB with heartbeats (many hosts),
study creation that tolerates racing workers, and settling a study before a worker leaves it."""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy


def mask_url(text: str) -> str:
    """Hide the password of every URL in a text (storage and DB URLs must never be printed with it)."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]+):[^@\s]*@", r"\1:***@", text)


def heartbeat() -> tuple[int, int]:
    """(interval, grace) seconds of the RDB heartbeat; MOETUNE_HEARTBEAT="interval,grace" overrides."""
    raw = os.environ.get("MOETUNE_HEARTBEAT", "10,40")
    interval, grace = (int(v) for v in raw.split(","))
    return interval, grace


def open_storage(storage: str | None, default_dir: Path):
    """None -> a journal file under the cache dir; a URL -> Optuna RDB with heartbeats; a path -> a journal.

    Journal files serve several processes on one host; an RDB URL (PostgreSQL) serves many hosts. With an
    RDB, every running trial sends a heartbeat: a worker killed mid-trial leaves a trial that the next
    worker marks FAIL once the grace period has passed, and re-enqueues once (RetryHeartbeatStaleTrialCallback).
    """
    if storage and "://" in storage:
        interval, grace = heartbeat()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
            return optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=retry,
                engine_kwargs={"pool_pre_ping": True},
            )
        except Exception as exc:
            raise ValueError(f"cannot open the Optuna storage: {mask_url(' '.join(str(exc).split()))[:300]}") from None
    path = Path(storage) if storage else default_dir / "studies.journal"
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if storage is None:  # only the default location is created; a given path's folder must exist
            path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        with path.open("ab"):  # writable (created empty if new: a journal file starts empty)
            pass
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise ValueError(f"cannot use {path} as the Optuna study journal: {exc.strerror or exc}") from None


def create_study(storage, name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """create-or-load, tolerating another worker creating the same study at the same moment."""
    for attempt in range(5):
        try:
            return optuna.create_study(
                study_name=name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
            )
        except (optuna.exceptions.DuplicatedStudyError, sqlalchemy.exc.IntegrityError):
            time.sleep(0.2 * (attempt + 1))
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def fail_orphans(study: optuna.Study) -> int:
    """Mark FAIL the RUNNING trials of processes on this host that no longer exist (a tuner killed with -9 on a
    journal storage, which has no heartbeat, leaves its trial RUNNING for ever). Trials of live processes and
    of other hosts are left alone. Returns how many were failed."""
    here, failed = socket.gethostname(), 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if host != here or not pid.isdigit() or _alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "error", f"process {pid} died during the trial")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        failed += 1
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def settle_study(study: optuna.Study, objective, on_trial, catch: tuple[type[Exception], ...]) -> None:
    """Before a worker leaves a study: wait (up to the heartbeat grace period) for running trials to finish or
    go stale, fail the stale ones (a dead worker's; RetryHeartbeatStaleTrialCallback re-enqueues them) and run what
    was re-enqueued, so no trial stays RUNNING and no enqueued work is left behind."""
    interval, grace = heartbeat()
    states = optuna.trial.TrialState
    deadline = time.monotonic() + grace + 2 * interval
    while time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if not study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            break
        time.sleep(interval)
    waiting = study.get_trials(deepcopy=False, states=(states.WAITING,))
    if waiting:
        study.optimize(objective, n_trials=len(waiting), callbacks=[on_trial], catch=catch)
