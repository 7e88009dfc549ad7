"""``nnalign_predict``'s engine: per case, pick a model for the modalities present, zero-fill the absent channels,
predict with nnU-Net's predictor and write the segmentation, its report (``case_report``) and a log.

nnU-Net needs every trained input channel (issues #513, #1245), so a case's present modalities are read with
nnU-Net's own ``SimpleITKIO`` and placed at their channel indices in an all-zero array of the model's channel count.
A student reads only its own channels; a teacher is told which channels are real (``present_modalities``) and fills
the absent latents with its anchor. The segmentation comes back in the case's original geometry.

Sequences on different grids are resampled onto the grid most of them share (:mod:`nnalign.data.sequence_grid`),
and the report says so. A case that cannot be predicted (no image file, an unreadable or truncated file, a sequence
covering too little of the others' field of view, no model for its modalities, a failed prediction) is reported as
one line naming the case and the file, recorded as ``failed`` in the log, and the other cases still run.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from nnalign.atomic import check_writable, write_json_atomic, write_text_atomic
from nnalign.data.brats_layout import BratsCase, find_cases, parse_filename
from nnalign.errors import CaseError, NnalignError, one_line
from nnalign.evaluation.pairing import PREDICTION_LOG_STEM, logged_cases
from nnalign.inference.models import Model, ModelError, discover_models, select_model
from nnalign.modalities import BRATS_MODALITIES
from nnalign.model_folders import FINAL_CHECKPOINT

if TYPE_CHECKING:
    from nnalign.data.sequence_grid import SequenceGrid
    from nnalign.inference.case_report import ReportTable

LABEL_OPTIONS = ("source", "brats2018", "brats2023", "brats2024", "nnunet")
OUTPUT_ENDING = ".nii.gz"
LOG_COLUMNS = ("case", "status", "model", "folds", "modalities_present", "modalities_used", "labels", "message",
               "model_folder")
OK, SKIPPED, FAILED = "ok", "skipped", "failed"


class OutputError(NnalignError):
    """The output folder cannot be written (read-only, full): it stops the run, as every later case would fail."""


@dataclass
class CaseRecord:
    """One case's line in the log."""

    case: str
    status: str
    model: str = ""
    folds: list = field(default_factory=list)
    modalities_present: list[str] = field(default_factory=list)
    modalities_used: list[str] = field(default_factory=list)
    labels: str = ""
    message: str = ""
    model_folder: str = ""

    def csv_row(self) -> dict:
        row = asdict(self)
        for key in ("folds", "modalities_present", "modalities_used"):
            row[key] = ",".join(map(str, row[key]))
        return row


@dataclass
class PredictionReport:
    """What a run did: one record per case of this run, and the model folders that could not be used."""

    records: list[CaseRecord]
    model_problems: list[str]
    log_csv: Path
    log_json: Path

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def failed(self) -> list[CaseRecord]:
        return [r for r in self.records if r.status == FAILED]


# ----------------------------------------------------------------------------------------------------------------------
# input


def output_file(output: Path, case_id: str) -> Path:
    return Path(output) / f"{case_id}{OUTPUT_ENDING}"


def input_cases(source: Path, modalities: Sequence[str] | None = None, exclude: Path | None = None
                ) -> list[BratsCase]:
    """The cases in ``source``: a folder of case folders or of one case's files (any naming ``find_cases``
    understands; the folder ``exclude``, the output, is skipped), or a single image file.

    A single file whose name does not say its modality needs ``modalities`` to name exactly one. Segmentation files
    are kept on the case (``seg``) but never read.
    """
    source = Path(source)
    if source.is_dir():
        if exclude is not None and Path(exclude).resolve() == source.resolve():
            raise NnalignError(f"{source}: the output folder must not be the input folder")
        return find_cases(source, exclude)
    if not source.is_file():
        raise NnalignError(f"{source}: no such file or folder")
    name = source.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name.rsplit(".", 1)[0]
    parsed = parse_filename(name)
    if parsed is None:
        if modalities is None or len(modalities) != 1:
            raise NnalignError(f"{source}: cannot tell the modality from the file name (name it like "
                               f"<case>_t1ce.nii.gz, <case>-t1c.nii.gz or <case>_0001.nii.gz, or pass --modalities "
                               f"with that one modality)")
        return [BratsCase(stem, source.parent, "single file", images={modalities[0]: source})]
    case_id, kind, naming = parsed
    if kind == "seg":
        raise NnalignError(f"{source}: a segmentation, not an image (give an image file or a folder)")
    return [BratsCase(case_id, source.parent, naming, images={kind: source})]


# ----------------------------------------------------------------------------------------------------------------------
# the log


class PredictionLog:
    """``nnalign_predict_log.csv`` and ``.json`` in the output folder, merged with an earlier run's and rewritten
    (atomically) after every case."""

    def __init__(self, output: Path) -> None:
        self.csv_path = Path(output) / f"{PREDICTION_LOG_STEM}.csv"
        self.json_path = Path(output) / f"{PREDICTION_LOG_STEM}.json"
        self.records: dict[str, CaseRecord] = {}
        for entry in logged_cases(output):  # an earlier run's; none, or one that cannot be read: start afresh
            try:
                record = CaseRecord(**{k: v for k, v in entry.items() if k in LOG_COLUMNS})
            except TypeError:  # an entry without the required fields
                continue
            self.records[record.case] = record

    def earlier(self, case_id: str) -> CaseRecord | None:
        return self.records.get(case_id)

    def update(self, record: CaseRecord) -> None:
        self.records[record.case] = record
        self.write()

    def write(self) -> None:
        from nnalign import __version__

        records = [self.records[k] for k in sorted(self.records)]
        payload = {"nnalign_version": __version__, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "cases": [asdict(r) for r in records]}
        write_text_atomic(self.json_path, json.dumps(payload, indent=2))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.csv_row() for r in records)
        write_text_atomic(self.csv_path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------------
# nnU-Net's predictor, one per model


class Predictors:
    """One initialised ``nnUNetPredictor`` per model folder (all its folds), made on first use; with ``backend``
    ``openvino`` its network runs in OpenVINO (``openvino_backend``; ``note`` gets its one-line notes)."""

    def __init__(self, device: str = "cpu", disable_tta: bool = False, backend: str = "torch",
                 note: Callable[[str], None] = lambda message: None) -> None:
        self.device = device
        self.disable_tta = disable_tta
        self.backend = backend
        self.note = note
        self._cache: dict[Path, object] = {}

    def get(self, model: Model):
        """The predictor of ``model``; ModelError (one line) if nnU-Net cannot load it."""
        cached = self._cache.get(model.folder)
        if isinstance(cached, ModelError):
            raise cached
        if cached is not None:
            return cached
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from nnalign.checkpoints import CheckpointError, safe_torch_load

        try:
            # nnU-Net's chatter about devices and folds, and timm's FutureWarning when nnU-Net's trainer lookup
            # imports every trainer module (primus -> timm -> torch.jit.interface); the checkpoints are loaded
            # weights-only (nnalign.checkpoints)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), safe_torch_load():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface", category=FutureWarning)
                predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not self.disable_tta,
                                            perform_everything_on_device=self.device == "cuda",
                                            device=torch.device(self.device), verbose=False,
                                            verbose_preprocessing=False, allow_tqdm=False)
                predictor.initialize_from_trained_model_folder(str(model.folder), model.folds, model.checkpoint)
            if self.backend == "openvino":
                from nnalign.inference.openvino_backend import openvino_network

                predictor.network = openvino_network(predictor, model, self.note)
        except CheckpointError as e:
            error = ModelError(f"model {model.name} could not be loaded: {e}")
            self._cache[model.folder] = error
            raise error from None
        except Exception as e:  # noqa: BLE001 - whatever nnU-Net or torch.load raise, the model is unusable
            if os.environ.get("NNALIGN_DEBUG"):
                raise
            error = ModelError(f"model {model.name} could not be loaded: {one_line(e)}")
            self._cache[model.folder] = error
            raise error from None
        self._cache[model.folder] = predictor
        return predictor


@contextlib.contextmanager
def present_channels(predictor, indices: Sequence[int]):
    """Tell a teacher network which input channels are real for the duration of one prediction.

    The attribute lives on the network object, which the predictor keeps and reloads each fold's weights into, so
    one assignment covers every fold; it is reset afterwards. Networks without it (students, plain U-Nets) are left
    alone.
    """
    net = predictor.network
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    if not hasattr(net, "present_modalities"):
        yield
        return
    before = net.present_modalities
    net.present_modalities = tuple(indices)
    try:
        yield
    finally:
        net.present_modalities = before


def predict_array(predictor, model: Model, case: BratsCase, used: Sequence[str], grid: SequenceGrid, readers: Mapping):
    """nnU-Net-labelled segmentation (z, y, x) of one case from the files of ``used`` on the grid of
    ``grid.reference`` (the others resampled onto it), absent channels zero, and the images read
    (``len(used)``, z, y, x)."""
    import numpy as np
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnalign.data.sequence_grid import resample_onto

    indices = model.channel_indices(used)
    channels = [model.modalities[i] for i in indices]
    files = {m: str(case.images[m]) for m in channels}
    on_grid = [m for m in channels if m not in grid.resampled]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            read, props = SimpleITKIO().read_images([files[m] for m in on_grid])
        moved = {m: resample_onto(files[m], readers[grid.reference]) for m in grid.resampled}
    except RuntimeError as e:
        raise CaseError(f"{case.case_id}: cannot read {', '.join(Path(f).name for f in files.values())}: "
                        f"{one_line(e)}") from None
    data = np.stack([read[on_grid.index(m)] if m in on_grid else moved[m] for m in channels])
    data = data.astype(np.float32, copy=False)
    check_signal(case.case_id, data, list(files.values()))
    full = np.zeros((len(model.modalities), *data.shape[1:]), dtype=np.float32)
    full[list(indices)] = data
    with present_channels(predictor, indices):
        return predictor.predict_single_npy_array(full, props, None, None, False), data


def check_signal(case_id: str, data, files: Sequence[str]) -> None:
    """CaseError for a channel of ``data`` (C, *S; read from ``files``) without signal (every voxel the same): the
    network would segment nothing, or noise, and say ``ok``. (NaN and infinite voxels are refused earlier, by
    ``check_case_images``, as SimpleITK reads them as zeros.)"""
    for channel, file in zip(data, files):
        low, high = channel.min(), channel.max()
        if low == high:
            raise CaseError(f"{case_id}: no signal in {Path(file).name} (every voxel is {float(low):g})")


def convert_labels(seg, convention: str):
    """Map an nnU-Net-labelled segmentation to ``convention`` (``nnunet`` leaves it as it is); uint8. CaseError for
    a resection cavity (RC) that ``convention`` has no label for."""
    import numpy as np

    from nnalign.data.labels import nnunet_to_brats

    seg = np.asarray(seg)
    try:
        return seg.astype(np.uint8) if convention == "nnunet" else nnunet_to_brats(seg, convention)
    except ValueError as e:
        raise CaseError(f"cannot write the prediction with --labels {convention}: {e}") from None


def label_image(seg, reference_reader):
    """``seg`` (z, y, x) as a SimpleITK image with the geometry of ``reference_reader`` (a header reader of one of
    the case's images)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(seg)
    image.SetSpacing(reference_reader.GetSpacing())
    image.SetOrigin(reference_reader.GetOrigin())
    image.SetDirection(reference_reader.GetDirection())
    return image


def write_segmentation(seg, reference_reader, target: Path) -> None:
    """Write ``seg`` with the geometry of ``reference_reader`` (a header reader of one of the case's images),
    through a hidden temporary file renamed over ``target``."""
    import SimpleITK as sitk

    from nnalign.data.case_checks import check_written

    image = label_image(seg, reference_reader)
    tmp = target.parent / f".{target.name[: -len(OUTPUT_ENDING)]}.tmp{OUTPUT_ENDING}"
    try:
        sitk.WriteImage(image, str(tmp), True)
        check_written(tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:  # SimpleITK raises RuntimeError for a file it cannot write
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{target}: cannot write the segmentation ({_write_reason(e)})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)


# ----------------------------------------------------------------------------------------------------------------------
# one case, all cases


@dataclass
class Choice:
    """How a case is segmented: the modalities it has and those used, their header readers, the model, why it was
    chosen, and the label convention of the output."""

    present: list[str]
    used: list[str]
    readers: dict
    grid: SequenceGrid
    model: Model
    reason: str
    convention: str


@dataclass
class Segmentation:
    """One segmented case: the label map (z, y, x) in the output convention, the header reader whose geometry it
    has, the case's report (``case_report``) and the images it was segmented from (modality -> (z, y, x))."""

    labels: object
    reference: object
    report: dict
    images: dict


class Segmenter:
    """Segment cases in Python, one at a time, with the models under ``models`` (one model folder or a dataset
    results folder; options as ``nnalign_predict``'s): ``Segmenter(models, device="cpu").segment({"T1ce": path,
    "FLAIR": image})`` returns the label map and the case's report and writes nothing.

    ``nnalign_predict`` runs every case through the same :meth:`choose` and :meth:`run`. Raises NnalignError (one
    line) for options or models that cannot be used; :attr:`problems` lists the model folders left out.
    """

    def __init__(self, models: Path, device: str = "cuda", folds: Sequence[int | str] | None = None,
                 checkpoint: str = FINAL_CHECKPOINT, disable_tta: bool = False, backend: str = "torch",
                 labels: str = "source", on_note: Callable[[str], None] | None = None) -> None:
        from nnalign.device import setup_device
        from nnalign.inference import BACKENDS
        from nnalign.paths import setup_env

        if labels not in LABEL_OPTIONS:
            raise NnalignError(f"unknown label convention '{labels}' (choose from {', '.join(LABEL_OPTIONS)})")
        if backend not in BACKENDS:
            raise NnalignError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
        on_note = on_note or (lambda message: None)
        if backend == "openvino":
            from nnalign.inference.openvino_backend import PRECISION, openvino_version

            if device != "cpu":
                raise NnalignError(f"--backend openvino runs on the CPU, not -device {device} (use -device cpu)")
            on_note(f"backend openvino: OpenVINO {openvino_version()}, {PRECISION} precision")
        setup_device(device)
        setup_env()  # registers nnalign's trainer shim, so nnU-Net's predictor finds nnalign's trainers by name
        found = discover_models(Path(models), folds, checkpoint)
        self.models, self.problems = found.models, found.problems
        self.labels = labels
        self.predictors = Predictors(device, disable_tta, backend, on_note)

    def choose(self, case: BratsCase, modalities: Sequence[str] | None = None) -> Choice:
        """Check the case's files and choose its model; NnalignError (one line naming the case) if it cannot be
        segmented."""
        from nnalign.data.case_checks import check_case_images
        from nnalign.data.sequence_grid import sequence_grid

        present = [m for m in BRATS_MODALITIES if m in case.images]
        if not present:
            found = f" (only the segmentation {case.seg.name})" if case.seg is not None else ""
            raise CaseError(f"{case.case_id}: no image file{found} in {case.folder}")
        used = list(present)
        if modalities is not None:
            absent = [m for m in modalities if m not in case.images]
            if absent:
                raise CaseError(f"{case.case_id}: --modalities names {absent[0]}, but the case has no {absent[0]} "
                                f"file (it has {', '.join(present)})")
            used = [m for m in present if m in modalities]
        readers = check_case_images(case, used, one_geometry=False)
        grid = sequence_grid(case.case_id, {m: case.images[m] for m in used}, readers)
        model, why = select_model(self.models, used)
        convention = model.source_label_convention if self.labels == "source" else self.labels
        return Choice(present, used, readers, grid, model, why, convention)

    def run(self, case: BratsCase, choice: Choice) -> Segmentation:
        """Segment the case as chosen and write its report; NnalignError for a model that cannot be loaded or a
        file that cannot be read, whatever the prediction raises otherwise."""
        from nnalign.inference.case_report import case_report

        predictor = self.predictors.get(choice.model)
        seg, data = predict_array(predictor, choice.model, case, choice.used, choice.grid, choice.readers)
        reference = choice.readers[choice.grid.reference]
        report = case_report(case.case_id, choice.present, choice.used, choice.model, choice.reason,
                             choice.convention, seg, reference.GetSpacing(), list(choice.grid.resampled.values()))
        channels = [choice.model.modalities[i] for i in choice.model.channel_indices(choice.used)]
        return Segmentation(convert_labels(seg, choice.convention), reference, report, dict(zip(channels, data)))

    def segment(self, images: Mapping[str, str | os.PathLike | object], case_id: str = "case",
                modalities: Sequence[str] | None = None) -> tuple[object, dict]:
        """Segment one case: ``images`` maps modality names (any spelling ``nnalign_predict`` reads: ``T1ce``,
        ``t1c``, ...) to NIfTI paths or SimpleITK images (on other grids they are resampled onto the reference's,
        :mod:`nnalign.data.sequence_grid`). Returns the label map as a SimpleITK image in the reference's geometry
        (in the Segmenter's label convention) and the report (``case_report``). NnalignError (one line naming the
        case and the image) for input that cannot be segmented.

        SimpleITK images are written to a temporary folder and read back, so that they pass the checks and the
        reading of files; the label map takes the geometry of the given image itself.
        """
        import tempfile

        import SimpleITK as sitk

        from nnalign.modalities import canonical_modality

        given: dict[str, object] = {}
        for name, value in images.items():
            try:
                modality = canonical_modality(str(name))
            except NnalignError as e:
                raise NnalignError(f"{case_id}: {e}") from None
            if modality in given:
                raise NnalignError(f"{case_id}: {name}: {modality} is given twice")
            if not isinstance(value, (str, os.PathLike, sitk.Image)):
                raise NnalignError(f"{case_id}: {name}: expected a file path or a SimpleITK image, got "
                                   f"{type(value).__name__}")
            given[modality] = value
        with tempfile.TemporaryDirectory(prefix="nnalign_segment_") as tmp:
            files = {}
            for modality, value in given.items():
                if isinstance(value, sitk.Image):
                    files[modality] = Path(tmp) / f"{case_id}_{modality}.nii"
                    sitk.WriteImage(value, str(files[modality]))
                else:
                    files[modality] = Path(value)
            case = BratsCase(case_id, Path(tmp), "Segmenter", images=files)
            choice = self.choose(case, modalities)
            result = self.run(case, choice)
        reference = given[choice.grid.reference]
        return label_image(result.labels, reference if isinstance(reference, sitk.Image) else result.reference), \
            result.report


def predict_case(case: BratsCase, output: Path, segmenter: Segmenter, modalities: Sequence[str] | None,
                 overwrite: bool, log: PredictionLog, table: ReportTable, qc_images: bool = False) -> CaseRecord:
    """Predict one case (or skip it if its output exists), write its segmentation and report (``OUT/<case>.json``,
    a row of the report table; with ``qc_images`` the picture ``OUT/<case>.png``) and return its log record; never
    raises for bad input."""
    present = [m for m in BRATS_MODALITIES if m in case.images]
    record = CaseRecord(case.case_id, FAILED, modalities_present=present)
    target = output_file(output, case.case_id)
    if target.exists() and not overwrite:
        earlier = log.earlier(case.case_id)
        if earlier is not None and earlier.status in (OK, SKIPPED):
            record = CaseRecord(**{**asdict(earlier), "modalities_present": present})
        record.status = SKIPPED
        record.message = "output exists (use --overwrite to predict it again)"
        return record
    try:
        choice = segmenter.choose(case, modalities)
        record.modalities_used = choice.used
        model = choice.model
        record.model, record.model_folder, record.folds = model.name, str(model.folder.resolve()), list(model.folds)
        record.labels = choice.convention
        result = segmenter.run(case, choice)
        # the report first: a case is finished once its segmentation exists, and a rerun skips it
        _write_output(report_file(output, case.case_id), lambda path: write_json_atomic(path, result.report))
        if qc_images:
            _write_output(output / f"{case.case_id}.png", lambda path: _write_qc(path, result))
        write_segmentation(result.labels, result.reference, target)
        _write_output(table.path, lambda path: table.update(result.report))
    except OutputError:
        raise
    except NnalignError as e:  # the case's files, no model for it, a model that cannot be loaded
        msg = str(e)
        record.message = msg if msg.startswith(f"{case.case_id}:") else f"{case.case_id}: {msg}"
        return record
    except Exception as e:  # noqa: BLE001 - a failed prediction (e.g. out of memory) fails this case only
        if os.environ.get("NNALIGN_DEBUG"):
            raise
        record.message = f"{case.case_id}: prediction failed: {type(e).__name__}: {one_line(e)}"
        return record
    record.status, record.message = OK, f"chosen: {choice.reason}"
    return record


def report_file(output: Path, case_id: str) -> Path:
    return Path(output) / f"{case_id}.json"


def _write_qc(path: Path, result: Segmentation) -> None:
    from nnalign.inference.qc_image import write_qc_image

    write_qc_image(path, result.images, result.labels, result.report["labels"], result.reference.GetSpacing(),
                   f"{result.report['case']}: {result.report['model']}")


def _write_output(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)``; OutputError (one line naming the file) if it cannot be written."""
    try:
        write(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({_write_reason(e)})") from None


def _write_log(log: PredictionLog, record: CaseRecord | None = None) -> None:
    """Add ``record`` to the log and write it; OutputError (one line) if it cannot be written."""
    try:
        if record is None:
            log.write()
        else:
            log.update(record)
    except OSError as e:
        raise OutputError(f"{log.json_path.parent}: cannot write the log ({_write_reason(e)})") from None


def predict(source: Path, output: Path, models: Path, folds: Sequence[int | str] | None = None,
            checkpoint: str = FINAL_CHECKPOINT, device: str = "cpu", disable_tta: bool = False,
            modalities: Sequence[str] | None = None, labels: str = "source", overwrite: bool = False,
            on_error: Callable[[str], None] | None = None, progress: bool = True, backend: str = "torch",
            on_note: Callable[[str], None] | None = None, qc_images: bool = False) -> PredictionReport:
    """Predict every case of ``source`` into ``output/<case>.nii.gz`` with its report ``output/<case>.json`` (and
    with ``qc_images`` its picture ``output/<case>.png``) and write the log; see the module docstring.

    ``on_error`` gets each unusable model folder's and each failed case's one-line message as it happens, ``on_note``
    the backend's notes (OpenVINO's version and precision, a cache it cannot write). Raises NnalignError only for
    problems that stop the whole run (no input, no usable model, a backend that cannot run).
    """
    from tqdm import tqdm

    from nnalign.inference.case_report import ReportTable

    segmenter = Segmenter(models, device, folds, checkpoint, disable_tta, backend, labels, on_note)
    on_error = on_error or (lambda message: None)
    output = Path(output)
    cases = input_cases(Path(source), modalities, exclude=output)
    for problem in segmenter.problems:
        on_error(problem)
    if output.exists() and not output.is_dir():
        raise NnalignError(f"{output}: exists and is not a folder")
    check_writable(output, "predictions")
    log = PredictionLog(output)
    table = ReportTable(output)
    records = []
    # disable=None: a bar only on a terminal, so that a failing run's stderr is its error lines.
    for case in tqdm(cases, desc="Predicting", unit="case", disable=None if progress else True):
        record = predict_case(case, output, segmenter, modalities, overwrite, log, table, qc_images)
        _write_log(log, record)
        records.append(record)
        if record.status == FAILED:
            on_error(record.message)
    if not records:
        _write_log(log)
    return PredictionReport(records, segmenter.problems, log.csv_path, log.json_path)
