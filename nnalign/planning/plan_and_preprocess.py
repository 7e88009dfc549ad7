"""Fingerprint -> plan -> preprocess through nnU-Net's API functions, with nnalign's extractor and planner."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from nnalign.atomic import check_writable
from nnalign.data.dataset_checks import check_raw_dataset, read_dataset_json
from nnalign.data.missing import missing_modalities
from nnalign.data.raw_dataset import find_dataset_folder
from nnalign.errors import NnalignError, one_line
from nnalign.paths import setup_env
from nnalign.planning.status import INCOMPLETE_MARKER

CONFIGURATIONS = ("2d", "3d_fullres", "3d_cpu", "paper")
DEFAULT_CONFIGURATIONS = ("3d_fullres", "3d_cpu")
MIN_CASES_FOR_5FOLD = 5




def raw_dataset_folder(dataset_id: int) -> Path:
    """The raw dataset folder for an ID, or a one-line error saying how to make one."""
    raw_root = Path(setup_env()["nnUNet_raw"])
    folder = find_dataset_folder(raw_root, dataset_id)
    if folder is None:
        raise NnalignError(f"no raw dataset with ID {dataset_id} in {raw_root} "
                           f"(make one with nnalign_convert_brats or nnalign_synth)")
    if not (folder / "dataset.json").is_file():
        raise NnalignError(f"{folder}: no dataset.json")
    return folder


def _training_ids(folder: Path, dataset_json: dict) -> list[str]:
    ending = dataset_json.get("file_ending", ".nii.gz")
    return sorted(p.name[: -len(ending)] for p in (folder / "labelsTr").glob(f"*{ending}"))


def ensure_small_dataset_split(raw_folder: Path, preprocessed_folder: Path, warn: Callable[[str], None]) -> None:
    """With fewer than 5 training cases, write a cross-validation split that fits, and say so."""
    ids = _training_ids(raw_folder, read_dataset_json(raw_folder))
    splits_file = preprocessed_folder / "splits_final.json"
    if len(ids) >= MIN_CASES_FOR_5FOLD or splits_file.exists():
        return
    if len(ids) < 2:
        warn(f"only {len(ids)} training case: train with fold 'all' (train and validate on all cases)")
        return
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnalign.data.splits import write_splits_file

    write_splits_file(splits_file, generate_crossval_split(ids, seed=12345, n_splits=len(ids)))
    warn(f"only {len(ids)} training cases: wrote a {len(ids)}-fold split (folds 0-{len(ids) - 1}); "
         f"fold 'all' trains on every case")


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
                        gpu_memory_gb: float = 8.0, num_processes: int = 2, verify: bool = False,
                        plan_only: bool = False, warn: Callable[[str], None] = print) -> dict:
    """Check the raw dataset, then fingerprint, plan (all configurations) and preprocess ``configurations``; return
    the plans.

    Every training case is checked first (:func:`nnalign.data.dataset_checks.check_raw_dataset`); ``verify`` also
    runs nnU-Net's own integrity check. The preprocessed dataset folder holds :data:`INCOMPLETE_MARKER` until the
    run has finished; a run that fails or is interrupted removes the folder if it made it, and leaves the marker in
    one that was there before. nnU-Net's verbose planner output goes to ``nnalign_planning.log`` in that folder.
    """
    unknown = [c for c in configurations if c not in CONFIGURATIONS]
    if unknown:
        raise NnalignError(f"unknown configuration '{unknown[0]}' (choose from {', '.join(CONFIGURATIONS)})")
    if gpu_memory_gb <= 0:
        raise NnalignError(f"--gpu-memory must be positive, got {gpu_memory_gb}")
    raw_folder = raw_dataset_folder(dataset_id)
    dataset_json = read_dataset_json(raw_folder)
    preprocessed_root = Path(os.environ["nnUNet_preprocessed"])
    check_writable(preprocessed_root, "preprocessed data")
    with workers_ignore_sigint():
        check_raw_dataset(raw_folder, dataset_json, num_processes)
    incomplete = missing_modalities(dataset_json)
    if verify and incomplete:
        warn(f"nnU-Net's integrity check (--verify) skipped: it needs every channel file, and {len(incomplete)} "
             f"cases lack some modalities (dataset.json); nnalign's checks of their files ran")
        verify = False
    os.environ.setdefault("nnUNet_n_proc_DA", str(num_processes))
    preprocessed = preprocessed_root / raw_folder.name
    with preprocessed_folder(preprocessed), tempfile.TemporaryFile("w+") as log:
        try:
            plans = _run_nnunet(int(dataset_id), raw_folder, preprocessed, configurations, gpu_memory_gb,
                                num_processes, verify, plan_only, warn, log)
        finally:
            log.seek(0)
            with contextlib.suppress(OSError):
                (preprocessed / "nnalign_planning.log").write_text(log.read())
    return plans


def _run_nnunet(dataset_id: int, raw_folder: Path, preprocessed: Path, configurations: Sequence[str],
                gpu_memory_gb: float, num_processes: int, verify: bool, plan_only: bool,
                warn: Callable[[str], None], log) -> dict:
    """nnU-Net's fingerprint, plan and preprocess steps, their printing (workers' too) into ``log``; progress bars
    on a terminal only, so that a failing run's stderr is its one error line."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)

    from nnalign.planning.fingerprint import nnAlignFingerprintExtractor
    from nnalign.planning.planner import nnAlignPlanner
    from nnalign.planning.preprocessor import nnAlignPreprocessor

    bars = sys.stderr.isatty()
    with workers_ignore_sigint():
        try:
            with captured_stdout(log):
                extract_fingerprint_dataset(dataset_id, nnAlignFingerprintExtractor, num_processes,
                                            check_dataset_integrity=verify, clean=True, verbose=False,
                                            show_progress_bar=bars)
        except (RuntimeError, AssertionError, ValueError) as e:
            log.seek(0)
            raise NnalignError(f"{raw_folder}: nnU-Net's integrity check failed: "
                               f"{_offending_line(log.read()) or one_line(e)}") from None
        with captured_stdout(log):
            plans, plans_id = plan_experiment_dataset(dataset_id, nnAlignPlanner,
                                                      gpu_memory_target_in_gb=gpu_memory_gb)
        ensure_small_dataset_split(raw_folder, preprocessed, warn)
        if not plan_only:
            with captured_stdout(log):
                # nnU-Net's preprocessing loop finds its preprocessor by name inside nnunetv2: nnalign's (zero
                # channels for absent modalities) runs each configuration, and nnU-Net's loop, given none, copies the
                # label maps into gt_segmentations.
                for configuration in (c for c in configurations if c in plans["configurations"]):
                    preprocessor = nnAlignPreprocessor(verbose=False)
                    preprocessor.show_progress_bar = bars
                    preprocessor.run(dataset_id, configuration, plans_id, num_processes)
                preprocess_dataset(dataset_id, plans_id, (), [], verbose=False, show_progress_bar=bars)
    return plans


@contextlib.contextmanager
def preprocessed_folder(folder: Path) -> Iterator[Path]:
    """Mark ``folder`` incomplete (:data:`INCOMPLETE_MARKER`, making the folder if need be) for the duration of the
    body and unmark it when the body succeeds.

    If the body raises (an error, Ctrl-C), a folder that this call made is removed; one that existed before keeps the
    marker. An OSError (a full disk) becomes a one-line NnalignError naming the folder.
    """
    existed = folder.exists()
    try:
        folder.mkdir(exist_ok=True)
        (folder / INCOMPLETE_MARKER).write_text("nnalign_plan_and_preprocess has not finished here: run it again\n")
    except OSError as e:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise NnalignError(f"{folder}: cannot write preprocessed data there ({e.strerror or e})") from None
    try:
        yield folder
        (folder / INCOMPLETE_MARKER).unlink()
    except BaseException as e:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, OSError):
            kept = "its preprocessing is incomplete" if existed else "nothing was kept"
            raise NnalignError(f"{folder}: cannot write preprocessed data there ({e.strerror or one_line(e)}); "
                               f"{kept}") from None
        raise


@contextlib.contextmanager
def workers_ignore_sigint() -> Iterator[None]:
    """Start the worker processes that the body starts (nnU-Net's multiprocessing pools) deaf to SIGINT, and end
    them if the body raises.

    Ctrl-C reaches every process of the terminal's group; this way only the main process stops (the pools end their
    workers), instead of every worker printing a KeyboardInterrupt traceback. Each worker is started with SIGINT
    blocked, a mask it keeps through the exec of a spawned process; a Ctrl-C that arrives meanwhile is held and
    raised in the main process once the worker has started, never lost. If the body raises (a Ctrl-C inside a pool's
    constructor, which ends no worker on KeyboardInterrupt), the workers it started and left running are terminated
    before the error goes on, so none outlives the main process and fails with a traceback of its own. Outside the
    main thread this does nothing.
    """
    import multiprocessing
    import multiprocessing.process
    import multiprocessing.resource_tracker
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    original = multiprocessing.process.BaseProcess.start

    def start(self) -> None:
        multiprocessing.resource_tracker.ensure_running()  # starting it later would unblock SIGINT mid-start
        in_main = threading.current_thread() is threading.main_thread()  # else a pool's thread replacing a worker
        held = []
        handler = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if in_main else None
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            original(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if in_main:
                signal.signal(signal.SIGINT, handler)
        if held:
            raise KeyboardInterrupt

    already_running = set(multiprocessing.active_children())
    multiprocessing.process.BaseProcess.start = start
    try:
        yield
    except BaseException:
        left = [p for p in multiprocessing.active_children() if p not in already_running]
        for process in left:
            process.terminate()
        for process in left:
            process.join(timeout=10)
        raise
    finally:
        multiprocessing.process.BaseProcess.start = original


@contextlib.contextmanager
def captured_stdout(stream) -> Iterator[None]:
    """Send file descriptor 1 (this process's and its workers' stdout) to ``stream`` for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(stream.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _offending_line(output: str) -> str | None:
    """The first line of nnU-Net's integrity-check output that says what is wrong with which file."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Error"):
            found = next((x for x in lines[i + 1:i + 4] if x.startswith("Found")), "")
            return f"{line.removeprefix('Error: ')} {found}".strip()
    return None


def configuration_table(plans: dict) -> str:
    """A Markdown table of the planned configurations: patch, batch, stages, features, spacing, memory."""
    rows = ["| configuration | patch | batch | stages | features | spacing (mm) | est. memory (GB) |",
            "|---|---|---|---|---|---|---|"]
    for name, cfg in plans["configurations"].items():
        if "architecture" not in cfg:
            continue
        kw = cfg["architecture"]["arch_kwargs"]
        rows.append(f"| {name} | {'x'.join(map(str, cfg['patch_size']))} | {cfg['batch_size']} | {kw['n_stages']} | "
                    f"{kw['features_per_stage'][0]}-{kw['features_per_stage'][-1]} | "
                    f"{'x'.join(f'{s:.2g}' for s in cfg['spacing'])} | {cfg.get('nnalign_estimated_memory_gb', '?')} |")
    return "\n".join(rows)
