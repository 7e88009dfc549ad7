"""One run of an experiment, executed from its state file by every executor (a local process, a Slurm job): its
commands in order, each ``python -m <module> ...`` as a user would type it, output appended to the run's log.

A training whose fold folder already holds a checkpoint (an earlier attempt: a crash, a cancel, a Slurm time limit
or preemption that requeued the job) continues with nnU-Net's ``--c``; a run whose result exists is not run again.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nnalign.errors import NnalignError, cli_entry
from nnalign.experiments.state import StateStore
from nnalign.model_folders import CHECKPOINTS

PROG = "nnalign_experiment job"


def with_continue(command: list[str], record: dict) -> list[str]:
    """``command`` with ``--c`` when it is the training of a fold folder that holds an unfinished run's checkpoint."""
    folder = Path(record["folder"]) if record.get("kind") == "train" and record.get("folder") else None
    if folder is not None and any((folder / c).is_file() for c in CHECKPOINTS):
        return [*command, "--c"]
    return command


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def execute(state_dir: Path, key: str, job_id: str | None = None) -> None:
    """Run ``key``'s commands and record the outcome (done, failed with the log's last line, or interrupted)."""
    store = StateStore(state_dir)
    record = store.read(key)
    if record is None:
        raise NnalignError(f"{store.path(key)}: no state for run {key}")
    attempt = record.get("attempts", 0) + 1
    record = store.update(key, status="running", attempts=attempt, host=socket.gethostname(), pid=os.getpid(),
                          job_id=job_id or record.get("job_id"), started=time.time(), error=None)
    log = Path(record["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    if record.get("done_file") and Path(record["done_file"]).is_file():
        store.update(key, status="done")
        return
    env = {**os.environ, **record["env"], "PYTHONUNBUFFERED": "1"}
    try:
        with open(log, "a") as f:
            f.write(f"== attempt {attempt} on {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            for command in record["commands"]:
                command = with_continue(command, record)
                f.write(f"$ python -m {shlex.join(command)}\n")
                f.flush()
                code = subprocess.run([sys.executable, "-m", *command], stdout=f, stderr=subprocess.STDOUT,
                                      env=env).returncode
                if code != 0:
                    error = f"{command[0].rsplit('.', 1)[-1]} exited with {code}: {_last_line(log)}"
                    store.update(key, status="failed", error=error)
                    raise NnalignError(f"{record['title']} failed: {error} (log: {log})")
    except (KeyboardInterrupt, SystemExit):
        store.update(key, status="interrupted")
        raise
    store.update(key, status="done")


def _terminate(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@cli_entry(PROG)
def main() -> int:
    """``python -m nnalign.experiments.job STATE_DIR KEY`` (the local executor starts runs this way)."""
    if len(sys.argv) != 3:
        raise NnalignError("usage: python -m nnalign.experiments.job STATE_DIR KEY")
    signal.signal(signal.SIGTERM, _terminate)  # nnalign_experiment cancel: stop the command, record it, exit
    execute(Path(sys.argv[1]), sys.argv[2])
    return 0


if __name__ == "__main__":
    main()
