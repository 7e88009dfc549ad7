"""The Slurm executor: one job per run through submitit (Slurm's own ``sbatch``), each after the jobs of the runs it
needs (``--dependency=afterok:...``, ``--kill-on-invalid-dep=yes``), so the cluster, not a process of ours, holds the
order. A job that gets Slurm's warning signal before its time limit or on preemption (``--signal=USR2@S``, set by
submitit) is requeued under the same job id by submitit's checkpoint protocol, and its training continues with
nnU-Net's ``--c`` (:func:`nnalign.experiments.job.with_continue`).
"""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from nnalign.errors import NnalignError
from nnalign.experiments.grid import Grid
from nnalign.experiments.job import execute
from nnalign.experiments.local import run_env
from nnalign.experiments.spec import SlurmOptions
from nnalign.experiments.state import StateStore, local_alive, new_record, resolve_states

SLURM_ACTIVE = {"PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued",
                "REQUEUE_FED": "queued", "RESIZING": "running", "RUNNING": "running", "COMPLETING": "running",
                "SUSPENDED": "running", "STOPPED": "running", "SIGNALING": "running", "STAGE_OUT": "running"}
"""squeue's job states of a job that is not over, as run states."""


@dataclass(frozen=True)
class SlurmJob:
    """What a Slurm job runs: one run of an experiment, from its state file."""

    state_dir: str
    key: str

    def __call__(self) -> None:
        import submitit

        execute(Path(self.state_dir), self.key, str(submitit.JobEnvironment().job_id))

    def checkpoint(self):
        """Requeue this run (time limit or preemption): the next attempt continues its training with ``--c``."""
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmJob(self.state_dir, self.key))


def require_slurm(what: str = "--executor slurm") -> None:
    """One-line error naming the Slurm command that is missing."""
    for command in ("sbatch", "squeue", "scancel"):
        if shutil.which(command) is None:
            raise NnalignError(f"{what}: {command} is not on PATH (no Slurm client here); use --executor local, or "
                               f"run on a Slurm login node")


def queue() -> dict[str, str]:
    """``{job id: run state}`` of this user's jobs that Slurm has not finished."""
    try:
        out = subprocess.run(["squeue", "--me", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NnalignError(f"squeue failed ({e}); the state of Slurm jobs is unknown") from None
    if out.returncode != 0:
        raise NnalignError(f"squeue failed: {' '.join(out.stderr.split()) or out.returncode}")
    jobs = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        if state in SLURM_ACTIVE:
            jobs[job] = SLURM_ACTIVE[state]
    return jobs


def alive_checker() -> Callable[[dict], str | None]:
    """A check of whether a run's job is alive (a local process, or a Slurm job, asking ``squeue`` once)."""
    jobs: dict[str, str] | None = None

    def alive(record: dict) -> str | None:
        nonlocal jobs
        if record.get("executor") != "slurm":
            return local_alive(record)
        if record.get("job_id") is None:  # being submitted right now
            return "queued"
        if jobs is None:
            require_slurm("the state of Slurm jobs")
            jobs = queue()
        return jobs.get(str(record["job_id"]))

    return alive


def merge_options(spec: SlurmOptions, **given) -> SlurmOptions:
    """The SPEC's ``[slurm]`` with the command line's options (those not None) over it; list options add up."""
    changes = {k: v for k, v in given.items() if v is not None and k not in ("sbatch", "setup")}
    return replace(spec, **changes, sbatch=spec.sbatch + tuple(given.get("sbatch") or ()),
                   setup=spec.setup + tuple(given.get("setup") or ()))


def sbatch_parameters(options: SlurmOptions, device: str) -> dict:
    """submitit's ``update_parameters`` arguments for every job of the experiment."""
    params: dict = {"time": options.time_min, "signal_delay_s": options.signal_delay_s, "setup": list(options.setup),
                    "stderr_to_stdout": True}
    if options.partition:
        params["partition"] = options.partition
    if options.gpus and device == "cuda":
        params["gpus_per_node"] = options.gpus
    if options.cpus:
        params["cpus_per_task"] = options.cpus
    if options.mem_gb:
        params["mem"] = options.mem_gb
    if options.account:
        params["account"] = options.account
    if options.qos:
        params["qos"] = options.qos
    return params


def extra_lines(options: SlurmOptions) -> dict:
    """The SPEC's extra ``#SBATCH`` lines (``--option[=value]``) as submitit's additional parameters."""
    extra = {}
    for line in options.sbatch:
        key, sep, value = line[2:].partition("=")
        extra[key] = value if sep else True
    return extra


def submit_slurm(grid: Grid, store: StateStore, options: SlurmOptions, say: Callable[[str], None] = print) -> list[str]:
    """Submit every missing, failed or cancelled run (and what needs it) as one Slurm job each, in dependency
    order; returns the keys submitted. Runs queued or running in Slurm are left as they are."""
    import submitit

    require_slurm()
    with store.lock():
        states = resolve_states(grid, store, alive_checker())
        executor = submitit.SlurmExecutor(folder=store.folder / "slurm" / "%j", max_num_timeout=10)
        executor.update_parameters(**sbatch_parameters(options, grid.spec.device))
        job_ids: dict[str, str] = {}
        submitted = []
        for key, step in grid.steps.items():
            state = states[key]
            if state.state == "done":
                continue
            record = store.read(key) or {}
            if state.state in ("queued", "running"):
                if record.get("executor") != "slurm":
                    raise NnalignError(f"{step.title} is {state.state} under the local executor (pid "
                                       f"{record.get('pid')}); wait for it, or nnalign_experiment cancel")
                job_ids[key] = str(record["job_id"])
                continue
            waits = [job_ids[d] for d in step.deps if d in job_ids]
            extra = {**extra_lines(options), "requeue": True, "kill-on-invalid-dep": "yes"}
            if waits:
                extra["dependency"] = "afterok:" + ":".join(waits)
            executor.update_parameters(job_name=f"nnalign.{grid.spec.name}.{key}"[:200], additional_parameters=extra)
            store.write(key, {**new_record(grid, store, step, "slurm", run_env(grid)), "status": "submitted"})
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's errors; they go in ours
                    job = executor.submit(SlurmJob(str(store.folder), key))
            except Exception as e:  # submitit raises its own errors with sbatch's message
                store.update(key, status="failed", error=f"sbatch refused it: {' '.join(str(e).split())[:200]}")
                raise NnalignError(f"sbatch refused {step.title}: {' '.join(str(e).split())}") from None
            store.update(key, job_id=str(job.job_id))
            job_ids[key] = str(job.job_id)
            submitted.append(key)
            say(f"submitted {step.title}: job {job.job_id}" + (f" after {', '.join(waits)}" if waits else ""))
    return submitted


def cancel_jobs(job_ids: list[str]) -> None:
    """``scancel`` the given Slurm jobs."""
    if job_ids:
        require_slurm("cancel")
        subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=120)
