"""``nnalign_experiment run --executor slurm`` on a real Slurm: munged, slurmctld and slurmd (Debian's ``slurm-wlm`` and
``munge``) configured for this one machine and started here (as root, in the foreground, so that they are stopped by
their own process ids at the end), as ``../shared/reference/slurm_local.md`` describes. Skipped, with what is missing,
where they are not installed (``.ci/run`` installs them) or not root.

The end-to-end test submits a teacher and a dependent student (``3d_cpu``, 2 epochs), sends the teacher's job
Slurm's warning signal mid-training, as at a time limit or on preemption, and checks that submitit requeued it,
that it continued with ``--c``, and that both models, their evaluations and the report exist.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nnalign.runs import StudentSpec, TeacherSpec

DATASET = "Dataset983_SyntheticBraTS"
"""``tiny_data``'s dataset (conftest.py)."""
TEACHER = TeacherSpec("mixture").trainer_name()
STUDENT = StudentSpec(("T1ce",), "none", TeacherSpec("mixture")).trainer_name()
"""The grid's teacher (``write_spec``) and its T1ce student without distillation."""
SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
SLURM_CONF = Path("/etc/slurm/slurm.conf")


def _conf(host: str) -> str:
    return "\n".join([
        "ClusterName=local", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        "StateSaveLocation=/var/spool/slurmctld", "SlurmdSpoolDir=/var/spool/slurmd",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "ReturnToService=2",
        "SlurmctldLogFile=/var/log/slurm/slurmctld.log", "SlurmdLogFile=/var/log/slurm/slurmd.log",
        "SlurmctldPidFile=/run/slurmctld.pid", "SlurmdPidFile=/run/slurmd.pid", "DefMemPerCPU=1000",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def _missing() -> list[str]:
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    return missing + [name for name, path in DAEMONS.items() if shutil.which(name) is None and not Path(path).exists()]


def _node_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and "idle" in out.stdout


def _munge_key() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for folder in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node Slurm (started here and stopped at the end, unless one was already running)."""
    missing = _missing()
    if missing:
        pytest.skip(f"no local Slurm: {', '.join(missing)} not found "
                    "(apt-get install slurm-wlm munge, as .ci/run does)")
    if shutil.which("sinfo") and _node_idle():
        yield None  # a cluster that is already up: use it, start and stop nothing
        return
    if os.geteuid() != 0:
        pytest.skip("starting munged, slurmctld and slurmd needs root")
    _munge_key()
    for folder in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(_conf(socket.gethostname()))
    logs = tmp_path_factory.mktemp("slurm_daemons")
    started: list[subprocess.Popen] = []
    commands = ([DAEMONS["munged"], "--foreground", "--force"], [DAEMONS["slurmctld"], "-D", "-c"],
                [DAEMONS["slurmd"], "-D"])
    try:
        for command in commands:
            log = open(logs / f"{Path(command[0]).name}.log", "w")
            started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(1.0)
        deadline = time.time() + 60
        while not _node_idle():
            if time.time() > deadline or any(p.poll() is not None for p in started):
                pytest.fail(f"the local Slurm did not come up (daemon logs in {logs}, /var/log/slurm)")
            time.sleep(1.0)
        yield started
    finally:
        for proc in reversed(started):  # by their own process ids
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _record(results: Path, key: str) -> dict:
    path = results / DATASET / "nnalign_experiments" / "tiny" / "runs" / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.mark.slow
def test_slurm_grid_with_a_requeued_teacher(slurm_cluster, tiny_data, tmp_path, folders_env, experiment, write_spec):
    env = folders_env(tiny_data, tmp_path / "results")
    spec = write_spec(tmp_path, tiny_data)
    spec.write_text(spec.read_text().replace('kd = ["kdnet"]', 'kd = ["none"]') + "[slurm]\ncpus = 1\ntime_min = 60\n")
    proc = experiment("run", str(spec), "--executor", "slurm", env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("submitted ") == 5 and "after" in proc.stdout, proc.stdout
    results = tmp_path / "results"
    teacher_key = f"train.{TEACHER}.fold_0"
    fold = results / DATASET / f"{TEACHER}__nnAlignPlans__3d_cpu" / "fold_0"
    job = _record(results, teacher_key)["job_id"]
    twice = experiment("run", str(spec), "--executor", "slurm", env=env, timeout=120)
    assert twice.returncode == 0 and "0 job(s) submitted" in twice.stdout, twice.stdout  # nothing submitted twice

    deadline = time.time() + 900
    while not (fold / "checkpoint_best.pth").is_file() or (fold / "checkpoint_final.pth").is_file():
        assert time.time() < deadline and not (fold / "checkpoint_final.pth").is_file(), \
            "the teacher finished before it could be interrupted"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # Slurm's warning before a time limit/preemption

    while True:
        status = experiment("status", str(spec), env=env)
        if "5 runs: 5 done" in status.stdout or "failed" in status.stdout or time.time() > deadline:
            break
        time.sleep(5)
    assert "5 runs: 5 done, 0 missing" in status.stdout, status.stdout + status.stderr
    record = _record(results, teacher_key)
    assert record["attempts"] == 2 and record["job_id"] == job, record  # requeued under the same job id
    log = Path(record["log"]).read_text()
    assert log.count("== attempt") == 2 and "--c" in log.split("== attempt 2")[1], log[-3000:]
    assert (fold / "checkpoint_final.pth").is_file()
    student = results / DATASET / f"{STUDENT}__nnAlignPlans__3d_cpu" / "fold_0"
    assert (student / "checkpoint_final.pth").is_file()
    for model, tag in ((TEACHER, "T1-T1ce-T2-FLAIR"), (STUDENT, "T1ce")):
        assert (results / DATASET / "nnalign_evaluations" / f"{model}__nnAlignPlans__3d_cpu" / tag /
                "metrics.json").is_file()
    assert (results / DATASET / "nnalign_experiments" / "tiny" / "report" / "report.md").is_file()


@pytest.mark.slow
def test_cancel_stops_the_submitted_jobs(slurm_cluster, tiny_data, tmp_path, folders_env, experiment, write_spec):
    env = folders_env(tiny_data, tmp_path / "results")
    spec = write_spec(tmp_path, tiny_data)
    spec.write_text(spec.read_text().replace("epochs = 2", "epochs = 50"))
    assert experiment("run", str(spec), "--executor", "slurm", env=env, timeout=120).returncode == 0
    cancelled = experiment("cancel", str(spec), env=env)
    assert cancelled.returncode == 0 and "cancelled 5 run(s)" in cancelled.stdout, cancelled.stdout
    time.sleep(3)
    status = experiment("status", str(spec), env=env)
    assert "running" not in status.stdout and "queued" not in status.stdout, status.stdout
    queue = subprocess.run(["squeue", "--me", "-h"], capture_output=True, text=True).stdout
    assert not any(_record(tmp_path / "results", f"train.{TEACHER}.fold_0").get("job_id") == line.split()[0]
                   for line in queue.splitlines())


def test_slurm_failure_before_submission_is_one_line(slurm_cluster, tmp_path, fake_dataset, folders_env, experiment,
                                                    assert_one_line_error):
    fake_dataset(tmp_path)
    proc = experiment("run", "paper-table-IV", "--executor", "slurm", "--sbatch=--partition-nonsense=1",
                      env=folders_env(tmp_path), timeout=120)
    assert_one_line_error(proc, "sbatch refused teacher original, fold 0", prog="nnalign_experiment")
