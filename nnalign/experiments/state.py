"""An experiment's state, kept in the results folder beside the models: one JSON file per run (written atomically,
by the submitting command and by the run's job), a log per run, and a lock so that two ``run`` calls on the same
experiment never submit a run twice.

The state of a run is worked out from what is on disk first (a run whose result exists is ``done``, whoever made
it), then from its state file and whether its job is still alive (a local process, a Slurm job). States:

- ``done``; ``missing`` (never run, or its result was removed by hand since); ``queued``; ``running``;
- ``failed`` (the job failed, or ended without finishing), ``cancelled``: retried by the next ``run``;
- ``blocked``: a run it needs failed or was cancelled, so it was not started.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from nnalign.atomic import write_json_atomic
from nnalign.errors import NnalignError
from nnalign.experiments.grid import Grid, Step

ACTIVE = ("submitted", "running", "interrupted")
"""Statuses a state file holds while its job may still be alive (``interrupted``: requeued after a signal)."""
RETRY = ("failed", "cancelled", "missing")
"""States the next ``run`` starts again."""
LOCK_HOLDER = "pid {pid} on {host}"
"""What the lock file holds while a ``run`` holds the lock (read by ``cancel`` to stop a local run, shown to a second
``run``)."""
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "key": (str,), "kind": (str,), "title": (str,), "status": (str,), "executor": (str,), "host": (str,),
    "job_id": (str,), "log": (str,), "done_file": (str,), "folder": (str,), "error": (str,), "pid": (int,),
    "attempts": (int,), "updated": (int, float), "submitted": (int, float), "started": (int, float),
    "commands": (list,), "env": (dict,)}
"""The type of each field a state file may hold (or null); a field of another type makes it a one-line error."""
_EPOCH = re.compile(rb": Epoch (\d+)\s*$", re.MULTILINE)


@dataclass
class StepState:
    """What ``status`` shows of a run."""

    key: str
    state: str
    job_id: str | None = None
    log: Path | None = None
    detail: str = ""
    epoch: int | None = None


class StateStore:
    """The state folder of one experiment: ``runs/<key>.json``, ``logs/<key>.log``, ``lock``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.runs_dir, self.logs_dir = self.folder / "runs", self.folder / "logs"

    def path(self, key: str) -> Path:
        """The state file of run ``key``."""
        return self.runs_dir / f"{key}.json"

    def log(self, key: str) -> Path:
        """The log of run ``key`` (every attempt, appended)."""
        return self.logs_dir / f"{key}.log"

    def read(self, key: str) -> dict | None:
        """The state of run ``key``, None if it has none; one-line error for a file that is not a state file."""
        path = self.path(key)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise NnalignError(f"{path}: not a readable state file ({e}); delete it to forget this run's state") from None
        if not isinstance(record, dict) or not isinstance(record.get("status"), str):
            raise NnalignError(f"{path}: not a state file (no status); delete it to forget this run's state")
        for name, value in record.items():
            kinds = FIELD_TYPES.get(name)
            if kinds and value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                expected = " or ".join(k.__name__ for k in kinds)
                raise NnalignError(f"{path}: {name} must be {expected}, got {value!r:.60}; delete it to forget this "
                                   f"run's state")
        return record

    def read_all(self, keys) -> dict[str, dict]:
        """The state of every run of ``keys`` that has one."""
        try:
            found = {p.stem for p in self.runs_dir.glob("*.json")} if self.runs_dir.is_dir() else set()
        except OSError as e:
            raise NnalignError(f"{self.runs_dir}: cannot read the experiment's state ({e.strerror or e})") from None
        return {k: r for k in keys if k in found and (r := self.read(k)) is not None}

    def write(self, key: str, record: dict) -> None:
        """Replace run ``key``'s state (atomically), stamped with the time."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(key), {**record, "updated": time.time()})

    def update(self, key: str, **changes) -> dict:
        """Merge ``changes`` into run ``key``'s state; returns the new state."""
        record = {**(self.read(key) or {"key": key}), **changes}
        self.write(key, record)
        return record

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the experiment's submission lock; one-line error if another ``run`` holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise NnalignError(f"another nnalign_experiment run is submitting this experiment ({holder}; lock "
                                   f"{self.folder / 'lock'}); wait for it, or see nnalign_experiment status") from None
            f.truncate(0)
            f.write(LOCK_HOLDER.format(pid=os.getpid(), host=socket.gethostname()))
            f.flush()
            try:
                yield
            finally:
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)


    def runner_pid(self) -> int | None:
        """The process id of the ``run`` that holds the lock on this machine, None if none holds it (a lock left by
        a killed process is free: the kernel released it) or it is held from another machine."""
        path = self.folder / "lock"
        if not path.is_file():
            return None
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                here = LOCK_HOLDER.format(pid=r"(\d+)", host=re.escape(socket.gethostname()))
                match = re.fullmatch(here, f.read().strip())
                return int(match.group(1)) if match else None
            fcntl.flock(f, fcntl.LOCK_UN)
        return None


def new_record(grid: Grid, store: StateStore, step: Step, executor: str, env: dict[str, str]) -> dict:
    """The state a run starts with: everything its job needs (commands, environment, files), status submitted."""
    previous = store.read(step.key) or {}
    return {"key": step.key, "kind": step.kind, "title": step.title, "commands": [list(c) for c in step.commands],
            "env": env, "log": str(store.log(step.key)), "done_file": str(step.done_file) if step.done_file else None,
            "folder": str(step.folder) if step.folder else None, "executor": executor, "status": "submitted",
            "job_id": None, "attempts": previous.get("attempts", 0), "submitted": time.time()}


def local_alive(record: dict) -> str | None:
    """``running`` if a local run's job process is alive on this host, ``queued`` just after submission, None if
    it is gone; ``running`` when it runs on another host (it cannot be checked from here)."""
    pid = record.get("pid")
    if record.get("host") not in (None, socket.gethostname()):
        return "running"
    if pid is None:
        return "queued" if time.time() - record.get("updated", 0) < 60 else None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return "running" if b"nnalign.experiments.job" in cmdline and record.get("status") == "running" else None


def last_epoch(folder: Path | None) -> int | None:
    """The last epoch nnU-Net's newest training log in a fold folder started (1-based), None without a log."""
    logs = sorted(folder.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime) if folder and folder.is_dir() \
        else []
    if not logs:
        return None
    epochs = _EPOCH.findall(logs[-1].read_bytes())
    return int(epochs[-1]) + 1 if epochs else None


def resolve_states(grid: Grid, store: StateStore, alive: Callable[[dict], str | None]) -> dict[str, StepState]:
    """The state of every run of the grid, in its order. ``alive(record)`` says whether the job of a state file in
    an active status is ``queued``, ``running`` or gone (None)."""
    records = store.read_all(grid.steps)
    states: dict[str, StepState] = {}
    for key, step in grid.steps.items():
        record = records.get(key, {})
        status = record.get("status")
        out = StepState(key, "missing", record.get("job_id"), Path(record["log"]) if record.get("log") else None)
        stuck = [d for d in step.deps if states[d].state in ("failed", "cancelled", "blocked")]
        done = step.is_done()
        if done if done is not None else _report_current(grid, step, record, states):
            out.state = "done"
        elif status in ACTIVE and (live := alive(record)):
            out.state = live
        elif stuck:
            out.state, out.detail = "blocked", f"needs {stuck[0]} ({states[stuck[0]].state})"
        elif status in ACTIVE:
            who = record.get("job_id") or record.get("pid")
            out.state, out.detail = "failed", f"its job{f' {who}' if who else ''} ended without finishing"
        elif status in ("failed", "cancelled"):
            out.state, out.detail = status, record.get("error", "")
        elif status == "done":
            out.detail = "done before, but its result is gone (removed by hand?): it runs again"
        if step.kind == "train" and out.state != "done" and status is not None:
            out.epoch = last_epoch(step.folder)
        states[key] = out
    return states


def _report_current(grid: Grid, step: Step, record: dict, states: dict[str, StepState]) -> bool:
    """The report was made (by this experiment) after every result it reads."""
    if record.get("status") != "done" or not grid.report_md.is_file():
        return False
    if any(states[d].state != "done" for d in step.deps):
        return False
    made = record.get("updated", 0)
    return all(grid.steps[d].done_file.stat().st_mtime <= made for d in step.deps if grid.steps[d].done_file)


def counts(states: dict[str, StepState]) -> dict[str, int]:
    """How many runs are in each state."""
    found: dict[str, int] = {}
    for s in states.values():
        found[s.state] = found.get(s.state, 0) + 1
    return found
