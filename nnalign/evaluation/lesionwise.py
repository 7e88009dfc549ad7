"""Lesion-wise Dice and HD95 of the BraTS challenges, computed by the official package ``brats-evaluation`` (optional:
``pip install 'nnalign[lesionwise]'``), never by nnalign's own code.

What brats-evaluation 0.0.10 computes, read from its source (``brats_evaluation/evaluation.py``,
``metrics_parser.py`` and ``configs/config_gli.yaml``; its engine is Panoptica, github.com/BrainLesion/panoptica):

- Each case is scored by ``evaluate_single_exam`` with the bundled ``gli`` config, whose label groups are NETC 1,
  SNFH 2, ET 3, RC 4, TC = 1 + 3 and WT = 1 + 2 + 3 (the BraTS 2023+ values; nnalign relabels both files into them).
  Lesions are connected components (``ConnectedComponentsInstanceApproximator``) matched one to one by maximum
  bipartite matching on Dice above 1e-6, i.e. any overlap. Distances are in voxels: ``evaluate_single_exam`` passes
  no spacing and Panoptica 2.1.7 does not take it from the file (a one-voxel shift along a 3 mm axis scores HD95 1),
  so they are mm only on a 1 mm grid such as BraTS's; :attr:`LesionwiseScorer.not_1mm` lists the other cases.
- ``parse_seg_results``, the parser the package prescribes for every task but metastases, writes per case and group
  the lesion-wise Dice and HD95 as Panoptica's segmentation quality: the mean over the *matched* lesion pairs
  (``sq_dsc``, ``sq_hd95``). Missed and false-positive lesions count in the detection columns it also writes (tp, fp,
  fn, precision, recall, F1), not in these means. With no lesion in either mask they are NaN; with lesions in only
  one, Dice 0 and HD95 infinite. Its global (whole-image) Dice and HD95 write an infinite HD95 as 373. A reference
  without prediction is a row of 0 and 373. Its mean, std and median rows leave NaN out (pandas).
- Not in 0.0.10: the BraTS 2023 lesion-wise rules of ``rachitsaluja/BraTS-2023-Metrics`` (ground truth dilated before
  matching, lesions under 50 voxels dropped, every missed or false-positive lesion scored Dice 0 and HD95 374 mm in
  the mean). nnalign reports what the official package computes and does not reimplement either.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import warnings
from pathlib import Path

from nnalign.data.labels import REGION_NAMES, RC, relabel
from nnalign.errors import CaseError, NnalignError, one_line

PACKAGE = "brats-evaluation"
CONFIG = "gli"
LABELS = "brats2024"  # the values of the gli config's label groups
INSTALL = "pip install 'nnalign[lesionwise]'"
AGGREGATE_ROWS = ("mean", "std", "median")


def package_version() -> str:
    """The installed brats-evaluation's version; NnalignError saying how to install it if it is not there."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import brats_evaluation  # noqa: F401
        return version(PACKAGE)
    except (ImportError, PackageNotFoundError):
        raise NnalignError(f"--lesionwise needs the official BraTS evaluation package {PACKAGE}: {INSTALL}") from None


class LesionwiseScorer:
    """Scores one case at a time with brats-evaluation through two NIfTI files in ``workdir`` (the caller's
    temporary folder), and turns all of them into the package's own CSV."""

    def __init__(self, workdir: Path) -> None:
        self.version = package_version()
        import brats_evaluation
        from panoptica import Panoptica_Evaluator

        with contextlib.redirect_stdout(io.StringIO()):
            self.evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path(CONFIG)))
        self.workdir = Path(workdir)
        self.results: list[dict] = []
        self.not_1mm: list[str] = []  # cases whose HD95 the package measures in voxels of another size

    def score(self, case_id: str, ref_image, ref_arr, pred_arr, convention: str) -> None:
        """Score one case: reference and prediction are label maps in ``convention`` on ``ref_image``'s grid."""
        import SimpleITK as sitk
        from brats_evaluation import evaluate_single_exam

        if any(abs(s - 1.0) > 1e-3 for s in ref_image.GetSpacing()):
            self.not_1mm.append(case_id)
        files = {}
        for what, arr in (("reference", ref_arr), ("prediction", pred_arr)):
            image = sitk.GetImageFromArray(relabel(arr, convention, LABELS))
            image.CopyInformation(ref_image)
            files[what] = self.workdir / f"{what}.nii"
            sitk.WriteImage(image, str(files[what]))
        # the package prints its errors, Panoptica a banner and a warning about its NSD threshold
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = evaluate_single_exam(str(files["prediction"]), str(files["reference"]), case_id,
                                          self.evaluator)
        if "error" in result:
            raise CaseError(f"{PACKAGE} could not score it: {one_line(Exception(result['error']))}")
        self.results.append(result)

    def table(self, missing: list[str]) -> str:
        """The package's CSV (``parse_seg_results``) of every case scored and of the ``missing`` predictions."""
        from brats_evaluation import parse_seg_results

        summary, table = self.workdir / "summary.json", self.workdir / "lesionwise.csv"
        summary.write_text(json.dumps({"metrics": self.results, "missings": list(missing)}))
        with contextlib.redirect_stdout(io.StringIO()):
            parse_seg_results(str(summary), str(table))
        return table.read_text()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def lesionwise_scores(table: str, rc: bool) -> dict[str, dict[str, float]]:
    """``{case or mean/std/median: {Dice_<region>: ..., HD95_<region>: ...}}``: the lesion-wise columns of the
    package's CSV for WT, TC, ET (and RC with ``rc``)."""
    regions = [*REGION_NAMES, *([RC] if rc else [])]
    out = {}
    for row in csv.DictReader(io.StringIO(table)):
        out[row["subject_id"]] = {f"{m}_{r}": _number(row.get(f"lesionwise_{key}_mean_{r.lower()}", ""))
                                  for m, key in (("Dice", "dsc"), ("HD95", "hd95")) for r in regions}
    return out
