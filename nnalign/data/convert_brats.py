"""Convert a BraTS release folder into an nnU-Net raw dataset (channels T1, T1ce, T2, FLAIR; nnU-Net BraTS labels).

The result is interchangeable with nnU-Net's own ``Dataset137_BraTS21``-style conversion. Every case is checked
(all four modalities present and readable, one geometry across modalities and segmentation, BraTS label values;
with ``allow_missing`` a case may lack some modalities' files, recorded in dataset.json by
:mod:`nnalign.data.missing`)
and the dataset is built in a staging folder that replaces the target in one rename, so a failed conversion
leaves nothing behind. The label convention is the release's, detected from all its segmentations together
(:func:`nnalign.data.labels.detect_convention`) unless given; a BraTS 2024+ release with the resection cavity trains
it as a fourth region, RC.
"""
from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nnalign.data.brats_layout import NAMING_2023, BratsCase, find_cases
from nnalign.data.case_checks import check_case_images, check_written
from nnalign.data.labels import (BRATS_CONVENTIONS, CAVITY, CONVENTIONS, brats_to_nnunet, check_brats_values,
                                 detect_convention, label_values)
from nnalign.data.raw_dataset import FILE_ENDING, build_dataset_folder, image_filename, write_dataset_json
from nnalign.data.splits import protokd_split, write_splits_file
from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES
from nnalign.paths import dataset_name

SPLITS = ("5fold", "protokd")
LABEL_CHOICES = ("auto", *BRATS_CONVENTIONS)
CITATION = ("Menze et al., IEEE TMI 2015; Bakas et al., Sci Data 2017; Bakas et al., arXiv:1811.02629; "
            "Baid et al., arXiv:2107.02314")


class NothingConverted(NnalignError):
    """With ``skip_bad``, every case was bad; ``skipped`` maps each case ID to its one-line reason."""

    def __init__(self, message: str, skipped: dict[str, str]) -> None:
        super().__init__(message)
        self.skipped = skipped

    def __reduce__(self):
        return type(self), (str(self), self.skipped)


@dataclass
class CaseResult:
    """What converting one case produced: its source label counts and the modalities it has no file for."""

    case_id: str
    labelled: bool
    source_label_counts: dict[int, int] = field(default_factory=dict)
    missing: tuple[str, ...] = ()


@dataclass
class ConversionReport:
    """Summary of a conversion, for printing and for tests."""

    dataset_folder: Path
    num_training: int
    num_test: int
    label_convention: str
    skipped: dict[str, str] = field(default_factory=dict)
    split_notes: list[str] = field(default_factory=list)
    cases: dict[str, CaseResult] = field(default_factory=dict)

    @property
    def missing(self) -> dict[str, tuple[str, ...]]:
        """``{case: modalities without a file}`` of the converted cases that lack some."""
        return {cid: res.missing for cid, res in self.cases.items() if res.missing}


def read_seg(case: BratsCase):
    """The case's segmentation as a SimpleITK image; NnalignError naming the case and file if it cannot be read."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(case.seg))
    except RuntimeError:
        raise NnalignError(f"{case.case_id}: {case.seg.name}: not a readable NIfTI image") from None


def seg_values(case: BratsCase) -> set[int]:
    """The label values of the case's segmentation; NnalignError naming the case and file for non-integer ones and
    values of no BraTS convention."""
    import SimpleITK as sitk

    try:
        values = label_values(sitk.GetArrayFromImage(read_seg(case)))
        check_brats_values(values)
        return values
    except ValueError as e:
        raise NnalignError(f"{case.case_id}: {case.seg.name}: {e}") from None


def convert_case(case: BratsCase, images_dir: Path, labels_dir: Path | None, convention: str,
                 allow_missing: bool = False) -> CaseResult:
    """Check one case and write it into nnU-Net naming, its labels read in ``convention``; raises NnalignError naming
    the case, file and problem. With ``allow_missing`` a case without some modalities' files is written without
    them (never without every one)."""
    import SimpleITK as sitk

    missing = tuple(case.missing_modalities())
    if len(missing) == len(BRATS_MODALITIES):
        raise NnalignError(f"{case.case_id}: no image file (expected e.g. {case.expected_file(missing[0])} in "
                           f"{case.folder})")
    if missing and not allow_missing:
        raise NnalignError(f"{case.case_id}: missing {missing[0]} file (expected {case.expected_file(missing[0])} "
                           f"in {case.folder}; --allow-missing keeps such cases)")
    present = [m for m in BRATS_MODALITIES if m not in missing]
    result = CaseResult(case.case_id, labelled=case.seg is not None and labels_dir is not None, missing=missing)
    check_case_images(case, present, seg=result.labelled, require_signal=True)
    if result.labelled:
        seg_image = read_seg(case)
        seg = sitk.GetArrayViewFromImage(seg_image)
        values, counts = np.unique(seg, return_counts=True)
        try:
            converted = brats_to_nnunet(seg, convention)
        except ValueError as e:
            raise NnalignError(f"{case.case_id}: {case.seg.name}: {e}") from None
        result.source_label_counts = {int(v): int(c) for v, c in zip(values, counts)}
        out = sitk.GetImageFromArray(converted)
        out.CopyInformation(seg_image)
        _write(lambda dst: write_image(out, dst), labels_dir / f"{case.case_id}{FILE_ENDING}")
    for channel, m in enumerate(BRATS_MODALITIES):
        if m in missing:
            continue
        src, dst = case.images[m], images_dir / image_filename(case.case_id, channel)
        if src.name.lower().endswith(".nii.gz"):
            _write(lambda target: shutil.copyfile(src, target), dst)
        else:
            try:
                image = sitk.ReadImage(str(src))
            except RuntimeError:
                raise NnalignError(f"{case.case_id}: {src.name}: not a readable NIfTI image") from None
            _write(lambda target: write_image(image, target), dst)
    return result


def write_image(image, path: Path) -> None:
    """Write a compressed NIfTI with SimpleITK and read it back (:func:`check_written`): OSError if it is not whole."""
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path), useCompression=True)
    check_written(path)


class WriteError(NnalignError):
    """The dataset cannot be written (a full disk, a read-only folder): it stops the conversion, never a case."""


def _write(write, dst: Path) -> None:
    """``write(dst)``; WriteError naming the dataset folder (SimpleITK raises RuntimeError, copies OSError)."""
    try:
        write(dst)
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[-160:]
        raise WriteError(f"cannot write {dst.name} into {dst.parent.parent.parent} ({reason}); nothing was "
                         f"converted") from None


def _convert_job(args: tuple) -> CaseResult | NnalignError:
    try:
        return convert_case(*args)
    except NnalignError as e:
        return e


def _values_job(case: BratsCase) -> set[int] | NnalignError:
    try:
        return seg_values(case)
    except NnalignError as e:
        return e


def _assign_protokd(cases: list[BratsCase], notes: list[str]) -> dict[str, str]:
    split = protokd_split()
    where = {cid: part for part in split for cid in split[part]}
    present = {c.case_id for c in cases}
    absent = {part: sum(cid not in present for cid in ids) for part, ids in split.items()}
    if any(absent.values()):
        notes.append(f"ProtoKD split: {sum(absent.values())} of {len(where)} listed cases are not in this release "
                     f"(train {absent['train']}, val {absent['val']}, test {absent['test']})")
    extra = sorted(present - set(where))
    if extra:
        notes.append(f"ProtoKD split: {len(extra)} cases of this release are not in the split and go to training "
                     f"(first: {extra[0]})")
    return {c.case_id: where.get(c.case_id, "train") for c in cases}


def convert_brats(source: Path, dataset_id: int, raw_root: Path, name: str | None = None, split: str = "5fold",
                  skip_bad: bool = False, overwrite: bool = False, num_processes: int = 2,
                  progress: bool = True, labels: str = "auto", allow_missing: bool = False) -> ConversionReport:
    """Convert the BraTS release at ``source`` into ``raw_root/DatasetXXX_name`` and return a report.

    Labelled cases go to ``imagesTr``/``labelsTr``; cases without a segmentation (validation releases) go to
    ``imagesTs``. With ``split='protokd'`` the ProtoKD BraTS 2018 split is written as ``splits_final.json`` (fold 0)
    and its test cases go to ``imagesTs``/``labelsTs``. With ``skip_bad`` a bad case is skipped and reported
    instead of stopping the conversion. ``labels``: the release's label convention (one of
    :data:`~nnalign.data.labels.BRATS_CONVENTIONS`), or ``auto`` to detect it from all segmentations together.
    With ``allow_missing`` a case without some modalities' files is kept and recorded in dataset.json
    (:mod:`nnalign.data.missing`); without, it is a bad case.
    """
    if split not in SPLITS:
        raise NnalignError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if labels not in LABEL_CHOICES:
        raise NnalignError(f"unknown label convention '{labels}' (choose from {', '.join(LABEL_CHOICES)})")
    source = Path(source)
    cases = find_cases(source)
    name = name or re.sub(r"[^A-Za-z0-9]+", "", source.resolve().name) or "BraTS"
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise NnalignError(f"dataset name '{name}' may only hold letters, digits, '_' and '-'")
    notes: list[str] = []
    assignment = _assign_protokd(cases, notes) if split == "protokd" else {c.case_id: "train" for c in cases}
    skipped: dict[str, str] = {}
    convention = _release_convention(source, cases, labels, skip_bad, skipped, num_processes, progress)
    cases = [c for c in cases if c.case_id not in skipped]
    with build_dataset_folder(Path(raw_root), dataset_id, name, overwrite=overwrite) as staging:
        dirs = {d: staging / d for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
        for d in dirs.values():
            d.mkdir()
        jobs = []
        for c in cases:
            test = assignment[c.case_id] == "test" or c.seg is None
            jobs.append((c, dirs["imagesTs" if test else "imagesTr"],
                         (dirs["labelsTs"] if test else dirs["labelsTr"]) if c.seg is not None else None, convention,
                         allow_missing))
        results = _run_jobs(_convert_job, jobs, num_processes, progress, "Converting cases")
        ok: dict[str, CaseResult] = {}
        for (case, *_), res in zip(jobs, results):
            if isinstance(res, NnalignError):
                if not skip_bad or isinstance(res, WriteError):
                    raise res
                skipped[case.case_id] = str(res)
                _remove_case_files(staging, case.case_id)
            else:
                ok[case.case_id] = res
        skipped = dict(sorted(skipped.items()))
        if not ok:
            raise NothingConverted(f"{source}: no case could be converted ({len(skipped)} skipped as bad)", skipped)
        train_ids = sorted(case.case_id for case, images_dir, *_ in jobs
                           if case.case_id in ok and images_dir == dirs["imagesTr"])
        for d in dirs.values():
            if not any(d.iterdir()):
                d.rmdir()
        write_dataset_json(staging, len(train_ids), name,
                           description=f"Converted by nnalign from {source.resolve().name}",
                           source_label_convention=convention, reference=CITATION,
                           cavity=CAVITY in CONVENTIONS[convention],
                           missing={cid: res.missing for cid, res in ok.items() if res.missing},
                           extra={"source_naming": sorted({c.naming for c in cases if c.case_id in ok})})
        if split == "protokd":
            folds = [{"train": [c for c in train_ids if assignment[c] == "train"],
                      "val": [c for c in train_ids if assignment[c] == "val"]}]
            if not folds[0]["val"] or not folds[0]["train"]:
                notes.append("ProtoKD split: no validation or no training case in this release; "
                             "splits_final.json not written")
            else:
                write_splits_file(staging / "splits_final.json", folds)
    final = Path(raw_root) / dataset_name(dataset_id, name)
    return ConversionReport(final, len(train_ids), len(ok) - len(train_ids), convention, skipped, notes, ok)


def _release_convention(source: Path, cases: list[BratsCase], labels: str, skip_bad: bool, skipped: dict[str, str],
                        num_processes: int, progress: bool) -> str:
    """``labels``, or the convention all labelled cases' values imply together (read first, in parallel); a case
    whose segmentation cannot be read or holds a value of no convention stops the conversion, or with ``skip_bad``
    goes into ``skipped``."""
    if labels != "auto":
        return labels
    labelled = [c for c in cases if c.seg is not None]
    values: dict[str, set[int]] = {}
    for case, res in zip(labelled, _run_jobs(_values_job, labelled, num_processes, progress, "Reading labels")):
        if isinstance(res, NnalignError):
            if not skip_bad:
                raise res
            skipped[case.case_id] = str(res)
        else:
            values[case.case_id] = res
    try:
        return detect_convention(values, any(c.naming == NAMING_2023 for c in cases))
    except ValueError as e:
        raise NnalignError(f"{source}: {e}") from None


def _run_jobs(function, jobs: list, num_processes: int, progress: bool, desc: str) -> list:
    from tqdm import tqdm

    # disable=None: a bar only on a terminal, so that a failing run's stderr is its one error line.
    bar = dict(total=len(jobs), desc=desc, unit="case", disable=None if progress else True)
    if num_processes <= 1 or len(jobs) <= 1:
        return [function(j) for j in tqdm(jobs, **bar)]
    with ProcessPoolExecutor(min(num_processes, len(jobs)), mp_context=get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        return list(tqdm(pool.map(function, jobs), **bar))


def exit_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """Worker initializer: end this process as soon as ``parent_pid`` is no longer its parent (the conversion was
    killed), instead of waiting forever for work."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _remove_case_files(staging: Path, case_id: str) -> None:
    pattern = re.compile(re.escape(case_id) + r"(_\d{4})?" + re.escape(FILE_ENDING) + "$")
    for path in staging.rglob(f"{case_id}*{FILE_ENDING}"):
        if pattern.fullmatch(path.name):
            path.unlink()
