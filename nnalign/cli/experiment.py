"""``nnalign_experiment``: plan, run, watch and cancel a grid of trainings, evaluations and a report described by a
TOML SPEC (or a shipped preset), on this machine or on a Slurm cluster."""
from __future__ import annotations

import argparse
import signal
import sys
import time

from nnalign.cli.parsing import CommandParser, positive_int
from nnalign.errors import NnalignError, cli_entry

PROG = "nnalign_experiment"
STATE_ORDER = ("done", "running", "queued", "failed", "cancelled", "blocked", "missing")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Turn an experiment SPEC (a TOML file, or a preset: paper-table-I, paper-table-III, "
                    "paper-table-IV, paper-all, each also as NAME-recipe with the paper's training recipe, "
                    "cpu-evidence, demo) into its runs: convert and preprocess, teachers, their "
                    "students, evaluation of the held-out cases, the report; run them in dependency order on this "
                    "machine or on Slurm, resumably. Runs whose result exists are reused, whoever made them. State "
                    "lives in {nnUNet_results}/DATASET/nnalign_experiments/NAME (documentation/experiments.md).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name, text in (("plan", "list every run, its dependencies and state, and an estimate of GPU-hours"),
                       ("status", "a table of the runs: state, epoch reached, job id, log"),
                       ("cancel", "stop a local run of this experiment; cancel its runs that are queued or running")):
        sub.add_parser(name, help=text, description=text).add_argument("spec", metavar="SPEC",
                                                                         help="a SPEC file or a preset name")
    run = sub.add_parser("run", help="run or submit what is missing, failed or cancelled, in dependency order",
                         description="Run (local) or submit (slurm) every run that is not done, queued or running.")
    run.add_argument("spec", metavar="SPEC", help="a SPEC file or a preset name")
    run.add_argument("--executor", choices=("local", "slurm"), default="local",
                     help="local: on this machine until all are done; slurm: one job per run (default: %(default)s)")
    run.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                     help="local: runs at once (one per GPU, GPU i for the i-th, with a cuda SPEC) (default: 1)")
    run.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, with a progress bar")
    run.add_argument("--poll", type=positive_int, default=10, metavar="S",
                     help="slurm --wait: seconds between looks at the queue (default: %(default)s)")
    slurm = run.add_argument_group("Slurm (override the SPEC's [slurm] table)")
    slurm.add_argument("--partition")
    slurm.add_argument("--gpus", type=int, metavar="N", help="GPUs per job (default: 1)")
    slurm.add_argument("--cpus", type=positive_int, metavar="N", help="CPUs per job")
    slurm.add_argument("--mem-gb", type=float, metavar="GB", help="memory per job")
    slurm.add_argument("--time-min", type=positive_int, metavar="MIN",
                       help="time limit per job; a job at its limit is requeued and continues (default: 1440)")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--sbatch", action="append", metavar="--OPTION[=VALUE]",
                       help="an extra #SBATCH line, e.g. --sbatch=--constraint=a100 (repeatable)")
    slurm.add_argument("--setup", action="append", metavar="COMMAND",
                       help="a shell command run before each job, e.g. 'module load cuda' (repeatable)")
    return p


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` as ``1-3, 5``."""
    parts: list[list[int]] = []
    for n in numbers:
        if parts and n == parts[-1][-1] + 1:
            parts[-1].append(n)
        else:
            parts.append([n])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 2 else ", ".join(map(str, p)) for p in parts) or "-"


def _summary(states: dict) -> str:
    from nnalign.experiments.state import counts

    found = counts(states)
    return f"{len(states)} runs: " + ", ".join(f"{found.get(s, 0)} {s}" for s in STATE_ORDER if found.get(s)
                                               or s in ("done", "missing"))


def _load(spec: str):
    from nnalign.experiments.grid import build_grid
    from nnalign.experiments.slurm import alive_checker
    from nnalign.experiments.spec import read_spec
    from nnalign.experiments.state import StateStore, resolve_states

    grid = build_grid(read_spec(spec))
    store = StateStore(grid.state_dir)
    return grid, store, resolve_states(grid, store, alive_checker())


def recipe(grid) -> str:
    """The configuration (training recipe) every run of ``grid`` uses, with its patch, batch and optimizer from the
    plans once the dataset is planned."""
    from pathlib import Path

    from nnalign.planning.status import configuration_value, read_plans

    name = grid.spec.configuration
    plans = read_plans(Path(grid.folders["nnUNet_preprocessed"]) / grid.dataset, name)
    if plans is None:
        return f"recipe of every run: {name} (its patch, batch and optimizer once {grid.dataset} is planned)"
    patch, batch = (configuration_value(plans, name, key) for key in ("patch_size", "batch_size"))
    # the plans' key of nnalign's optimizer settings (training/common.py PLANS_TRAINING_KEY, which loads torch)
    training = configuration_value(plans, name, "nnalign_training")
    optimizer = (f"{training.get('optimizer', 'adam')} lr {training.get('initial_lr')} to {training.get('final_lr')}"
                 if isinstance(training, dict) else "nnU-Net's SGD")
    shape = "x".join(map(str, patch)) if isinstance(patch, list) else patch
    return f"recipe of every run: {name}, patch {shape}, batch {batch}, {optimizer}"


def _heading(grid) -> str:
    spec = grid.spec
    return (f"experiment {spec.name} ({spec.source}): {grid.dataset}, {spec.configuration}, folds "
            f"{', '.join(map(str, spec.folds))}\n{recipe(grid)}\nstate: {grid.state_dir}")


def plan(spec: str) -> int:
    from nnalign.experiments.grid import iteration_times

    grid, _, states = _load(spec)
    index = {key: i for i, key in enumerate(grid.steps, 1)}
    rows = []
    for key, step in grid.steps.items():
        needs = _ranges([index[d] for d in step.deps])
        hours = "" if step.gpu_hours is None else f"{step.gpu_hours:.1f}"
        rows.append([str(index[key]), step.title, needs, states[key].state, hours])
    print(_heading(grid))
    print(_table(["#", "run", "needs", "state", "GPU-h"], rows))
    print(_summary(states))
    todo = [r for k, r in grid.steps.items() if r.kind == "train" and states[k].state != "done"]
    if any(r.gpu_hours is None for r in todo):
        print(f"estimate: unknown until {grid.dataset} is planned ({len(todo)} trainings to run)")
    else:
        print(f"estimate: {sum(r.gpu_hours for r in todo):.1f} GPU-hours for the {len(todo)} trainings not done "
              f"(basis: {iteration_times().basis()})")
    return 0


def status(spec: str) -> int:
    grid, _, states = _load(spec)
    rows, problems = [], []
    for key, step in grid.steps.items():
        s = states[key]
        log = str(s.log) if s.log and s.state != "done" else ""
        rows.append([step.title, s.state, "" if s.epoch is None else str(s.epoch), s.job_id or "", log])
        if s.state in ("failed", "cancelled", "blocked"):
            problems.append(f"{s.state}: {step.title}: {s.detail or 'see its log'}" + (f" (log: {s.log})" if log else ""))
    print(_heading(grid))
    print(_table(["run", "state", "epoch", "job", "log"], rows))
    print("\n".join(problems + [_summary(states)]))
    return 0


def _progress(states: dict, width: int = 30) -> str:
    from nnalign.experiments.state import counts

    found, total = counts(states), len(states)
    filled = round(width * found.get("done", 0) / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] " + _summary(states)


def _wait(spec: str, poll: int) -> list[str]:
    """Wait until no run is queued or running, showing progress; returns the runs not done."""
    last = ""
    while True:
        grid, _, states = _load(spec)
        line = _progress(states)
        if line != last:
            print(("\r" if sys.stdout.isatty() else "") + line, end="" if sys.stdout.isatty() else "\n", flush=True)
            last = line
        if not any(s.state in ("queued", "running") for s in states.values()):
            print("" if not sys.stdout.isatty() else "\n", end="")
            return [grid.steps[k].title for k, s in states.items() if s.state != "done"]
        time.sleep(poll)


def _cancelled(signum, frame) -> None:
    raise NnalignError("cancelled (nnalign_experiment cancel, or SIGTERM); run starts again what was not done")


def run(args) -> int:
    from nnalign.atomic import check_writable
    from nnalign.experiments.grid import build_grid
    from nnalign.experiments.spec import read_spec
    from nnalign.experiments.state import StateStore

    grid = build_grid(read_spec(args.spec))
    check_writable(grid.state_dir, "the experiment's state")  # a read-only or unreachable results folder: one line
    store = StateStore(grid.state_dir)
    print(_heading(grid))
    signal.signal(signal.SIGTERM, _cancelled)  # nnalign_experiment cancel: stop here, and the local runs with us
    if args.executor == "local":
        from nnalign.experiments.local import run_local
        from nnalign.experiments.slurm import alive_checker

        failed = run_local(grid, store, args.jobs, alive_checker)
        if failed:
            first = grid.steps[failed[0]]
            raise NnalignError(f"{len(failed)} run(s) failed, first {first.title} (log: {store.log(first.key)}); "
                               f"nnalign_experiment status {args.spec} lists them, run retries them")
        print(f"all {len(grid.steps)} runs done")
        return 0
    from nnalign.experiments.slurm import merge_options, require_slurm, submit_slurm

    require_slurm()
    options = merge_options(grid.spec.slurm, partition=args.partition, gpus=args.gpus, cpus=args.cpus,
                            mem_gb=args.mem_gb, time_min=args.time_min, account=args.account, qos=args.qos,
                            sbatch=args.sbatch, setup=args.setup)
    submitted = submit_slurm(grid, store, options)
    print(f"{len(submitted)} job(s) submitted")
    if args.wait:
        left = _wait(args.spec, args.poll)
        if left:
            raise NnalignError(f"{len(left)} run(s) not done, first {left[0]}: nnalign_experiment status {args.spec} "
                               f"says why, run retries them")
    return 0


def cancel(spec: str) -> int:
    from nnalign.experiments.local import stop_process, stop_process_group
    from nnalign.experiments.slurm import cancel_jobs

    grid, store, states = _load(spec)
    active = {k: store.read(k) for k, s in states.items() if s.state in ("queued", "running")}
    runner = store.runner_pid()
    if runner is not None:  # a `run` on this machine: stop it first, so that it starts nothing more
        stop_process(runner)
    cancel_jobs([str(r["job_id"]) for r in active.values() if r.get("executor") == "slurm" and r.get("job_id")])
    for record in active.values():
        if record.get("executor") == "local" and record.get("pid"):
            stop_process_group(int(record["pid"]))
    time.sleep(1.0 if active else 0)  # let the jobs record that they stopped before marking them cancelled
    for key in active:
        store.update(key, status="cancelled", error="cancelled by nnalign_experiment cancel")
    print(f"cancelled {len(active)} run(s)" + (": " + ", ".join(grid.steps[k].title for k in active) if active else ""))
    return 0


@cli_entry(PROG)
def main() -> int:
    args = build_parser().parse_args()
    if args.command == "run":
        return run(args)
    return {"plan": plan, "status": status, "cancel": cancel}[args.command](args.spec)


if __name__ == "__main__":
    main()
