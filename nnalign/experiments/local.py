"""The local executor: runs an experiment's missing runs on this machine, ``jobs`` at a time, in dependency order
(one per GPU with ``CUDA_VISIBLE_DEVICES`` for a ``cuda`` SPEC, else ``jobs`` CPU runs), until none is left.

Each run is a child process ``python -m nnalign.experiments.job STATE_DIR KEY`` in its own process group, so that
``nnalign_experiment cancel`` (or Ctrl-C here) stops it with its commands; the state files say what happened.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

from nnalign.experiments.grid import Grid
from nnalign.experiments.state import RETRY, StateStore, new_record, resolve_states

POLL_S = 0.2
"""How often finished runs are looked for: the longest idle gap between one run ending and the next starting."""
EXTERNAL_POLL_S = 5.0
"""How often the runs of other processes (or Slurm) are looked at while waiting for them."""


def run_env(grid: Grid) -> dict[str, str]:
    """The environment every run of the grid gets: nnU-Net's folders (and data-loading workers) from the SPEC."""
    env = dict(grid.folders)
    if grid.spec.data_workers is not None:
        env["nnUNet_n_proc_DA"] = str(grid.spec.data_workers)
    return env


def stop_process_group(pid: int) -> None:
    """SIGTERM to a local run's process group (the job and its command), if it still exists."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM to process ``pid`` (a ``run`` of ours, which then stops its runs) and wait up to ``timeout_s`` for
    it to end."""
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(POLL_S)


def run_local(grid: Grid, store: StateStore, jobs: int, alive: Callable[[], Callable[[dict], str | None]],
              say: Callable[[str], None] = print, watch: Callable[[list[str]], None] | None = None) -> list[str]:
    """Run every missing, failed or cancelled run (and whatever depends on them), at most ``jobs`` at once; returns
    the keys of the runs that failed. Runs that another process (or Slurm) is running are waited for; ``alive()``
    gives a fresh check of whether their jobs are alive (:func:`nnalign.experiments.slurm.alive_checker`).
    ``watch(keys)``, at every look, gets the runs started here that are going on or just ended (to follow their
    logs: what a run wrote before it ended is in its log by then)."""
    with store.lock():
        states = resolve_states(grid, store, alive())
        status = {k: s.state for k, s in states.items()}
        todo = [k for k in grid.steps if status[k] in (*RETRY, "blocked")]
        status.update({k: "missing" for k in todo})  # to be run here; a failure now blocks what needs it
        active: dict[str, tuple[subprocess.Popen, int]] = {}
        failed: list[str] = []
        total, finished, checked = len(todo), 0, time.time()
        try:
            while todo or active or any(s in ("queued", "running") for s in status.values()):
                ended = [key for key, (proc, _) in active.items() if proc.poll() is not None]
                if watch is not None:
                    watch(list(active))
                for key in ended:
                    proc, _ = active.pop(key)
                    record = store.read(key) or {}
                    status[key] = ("done" if proc.returncode == 0 and record.get("status") == "done" else
                                   "cancelled" if record.get("status") == "cancelled" else "failed")
                    finished += 1
                    if status[key] == "cancelled":
                        say(f"[{finished}/{total}] cancelled: {grid.steps[key].title}")
                    elif status[key] == "failed":
                        failed.append(key)
                        say(f"[{finished}/{total}] failed: {grid.steps[key].title}: {record.get('error') or 'see log'} "
                            f"(log: {store.log(key)})")
                    else:
                        say(f"[{finished}/{total}] done: {grid.steps[key].title}")
                if time.time() - checked > EXTERNAL_POLL_S:
                    _refresh_external(grid, store, status, active, alive())
                    checked = time.time()
                for key in list(todo):
                    deps = [status[d] for d in grid.steps[key].deps]
                    if any(s in ("failed", "cancelled", "blocked") for s in deps):
                        status[key] = "blocked"
                        todo.remove(key)
                        finished += 1
                        say(f"[{finished}/{total}] not started: {grid.steps[key].title} (a run it needs failed or "
                            f"was cancelled)")
                    elif all(s == "done" for s in deps) and len(active) < jobs:
                        slot = min(set(range(jobs)) - {s for _, s in active.values()})
                        active[key] = (_start(grid, store, key, slot), slot)
                        status[key] = "running"
                        todo.remove(key)
                        say(f"[{finished}/{total}] started: {grid.steps[key].title} (log: {store.log(key)})")
                time.sleep(POLL_S)
        except BaseException:
            for proc, _ in active.values():
                stop_process_group(proc.pid)
            for proc, _ in active.values():
                proc.wait()
            raise
    return failed


def _refresh_external(grid: Grid, store: StateStore, status: dict[str, str], active: dict,
                      alive: Callable[[dict], str | None]) -> None:
    """Update the state of the runs another process or Slurm is running, once they have ended."""
    external = [k for k, s in status.items() if s in ("queued", "running") and k not in active]
    if external:
        states = resolve_states(grid, store, alive)
        status.update({k: states[k].state for k in external})


def _start(grid: Grid, store: StateStore, key: str, slot: int) -> subprocess.Popen:
    """Write the run's state and start its job process (``slot``: the GPU it may use)."""
    record = new_record(grid, store, grid.steps[key], "local", run_env(grid))
    store.write(key, record)
    env = dict(os.environ)
    if grid.spec.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(slot)
    store.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(store.log(key), "a") as log:
        return subprocess.Popen([sys.executable, "-m", "nnalign.experiments.job", str(store.folder), key], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
