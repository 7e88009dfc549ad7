"""The experiment SPEC: a TOML file (or a shipped preset) describing a grid of teachers, students, evaluations and a
report, read into an :class:`ExperimentSpec` with every key checked (an unknown key, anchor, KD method, modality or
preset is a one-line :class:`~nnalign.errors.NnalignError` naming where it is).

Layout (every table but ``[dataset]`` is optional; ``documentation/experiments.md`` lists every key)::

    name = "my-grid"                 # default: the file's stem
    extends = "paper-table-I"        # a preset whose tables this file's keys override, key by key
    [dataset]      id, name, configuration, folds, preprocess, processes, convert, split
    [folders]      raw, preprocessed, results          (default: nnU-Net's variables, as every nnalign command)
    [training]     device, epochs, student_epochs, iters_per_epoch, data_workers
    [[teachers]]   name, anchor, align_weight, separate_encoders, latent_level, modality_dropout, subset_sampling,
                   stop_gradient, align_distance
    [[students]]   modalities, kd, teachers
    [evaluate]     held_out, teacher_subsets, images, labels, label_convention, tta
    [report]       enabled, tsne, tsne_cases, kd
    [slurm]        partition, gpus, cpus, mem_gb, time_min, account, qos, sbatch, setup, signal_delay_s

Subsets (``modalities``, ``teacher_subsets``) are lists of ``"T1ce"``, ``"T1,T2"`` or the words ``all-single`` (the
four single modalities), ``all`` (the 15 non-empty subsets) and ``full`` (all four together).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from nnalign.errors import NnalignError
from nnalign.losses.kd.registry import KD
from nnalign.modalities import BRATS_MODALITIES, all_subsets, parse_modalities
from nnalign.networks.anchor_registry import DEFAULT_ANCHOR
from nnalign.runs import TEACHER_SETTINGS, AnyTeacher, Setting, TrainingLength, teacher_spec

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
SUBSET_WORDS: dict[str, Callable[[], list[tuple[str, ...]]]] = {
    "all-single": lambda: [(m,) for m in BRATS_MODALITIES],
    "all": lambda: all_subsets(BRATS_MODALITIES),
    "full": lambda: [BRATS_MODALITIES],
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Teacher:
    """A teacher of the grid: the label students use to name it, and its run description."""

    label: str
    spec: AnyTeacher


@dataclass(frozen=True)
class Students:
    """One ``[[students]]`` block: every subset x KD method x teacher label."""

    subsets: tuple[tuple[str, ...], ...]
    kd: tuple[str, ...]
    teachers: tuple[str, ...]


@dataclass(frozen=True)
class EvaluateOptions:
    """Prediction and scoring of held-out cases (``[evaluate]``); ``images``/``labels`` None: the raw dataset's
    ``imagesTs``/``labelsTs``."""

    held_out: bool = True
    teacher_subsets: tuple[tuple[str, ...], ...] = (BRATS_MODALITIES,)
    images: Path | None = None
    labels: Path | None = None
    label_convention: str = "nnunet"
    tta: bool = False


@dataclass(frozen=True)
class ReportOptions:
    """``nnalign_report`` at the end (``[report]``); ``tsne_cases`` None: nnalign_report's default."""

    enabled: bool = True
    tsne: bool = True
    tsne_cases: int | None = None
    kd: str | None = None


@dataclass(frozen=True)
class SlurmOptions:
    """Resources and set-up of each Slurm job (``[slurm]``; the command line overrides them)."""

    partition: str | None = None
    gpus: int = 1
    cpus: int | None = None
    mem_gb: float | None = None
    time_min: int = 24 * 60
    account: str | None = None
    qos: str | None = None
    sbatch: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    signal_delay_s: int = 120


@dataclass(frozen=True)
class ExperimentSpec:
    """A checked SPEC. ``source`` is the file (or ``preset:NAME``) it was read from."""

    name: str
    source: str
    dataset_id: int
    dataset_name: str | None
    configuration: str
    folds: tuple[int | str, ...]
    preprocess: bool
    processes: int
    convert: Path | None
    split: str
    folders: dict[str, Path]
    device: str
    teacher_length: TrainingLength
    student_length: TrainingLength
    data_workers: int | None
    teachers: tuple[Teacher, ...]
    students: tuple[Students, ...]
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)
    report: ReportOptions = field(default_factory=ReportOptions)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


# ----------------------------------------------------------------------------------------------------------------------
# reading


def preset_names() -> list[str]:
    """The shipped presets, by name."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def _load_toml(path: Path, where: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise NnalignError(f"{where}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise NnalignError(f"{where}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise NnalignError(f"{where}: not UTF-8 text, as TOML must be (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise NnalignError(f"{where}: arrays or tables nested too deep to read") from None


def _preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.toml"
    if not _NAME_RE.fullmatch(name) or not path.is_file():
        raise NnalignError(f"unknown preset {name!r} (presets: {', '.join(preset_names())})")
    return path


def _merged(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s keys: tables merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_spec(spec: str, cwd: Path | None = None) -> ExperimentSpec:
    """The SPEC at path ``spec``, or the shipped preset named ``spec``; paths in a file are relative to its folder,
    in a preset to ``cwd`` (default: the current directory)."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    path = cwd / spec
    if spec.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise NnalignError(f"SPEC {spec}: no such file (presets: {', '.join(preset_names())})")
        data, base, source, default_name = _load_toml(path, spec), path.resolve().parent, str(path), path.stem
    else:
        preset = _preset_path(spec)
        data, base, source, default_name = _load_toml(preset, f"preset {spec}"), cwd, f"preset:{spec}", spec
    extends = data.pop("extends", None)
    if extends is not None:
        if not isinstance(extends, str):
            raise NnalignError(f"{source}: extends must be a preset name, got {extends!r}")
        parent = _load_toml(_preset_path(extends), f"preset {extends}")
        parent.pop("name", None)
        data = _merged(parent, data)
    return parse_spec(data, source, default_name, base)


# ----------------------------------------------------------------------------------------------------------------------
# checked values


class _Table:
    """A TOML table read key by key with one-line errors naming ``where``; :meth:`done` rejects unknown keys."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise NnalignError(f"{where}: expected a table, got {data!r}")
        self.data, self.where, self.known = data, where, []

    def get(self, key: str, kinds: type | tuple[type, ...], default: Any = None, what: str = "") -> Any:
        """The value of ``key`` (``default`` when absent), checked to be of ``kinds`` (bool is not a number)."""
        self.known.append(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            expected = what or " or ".join(k.__name__ for k in kinds)
            raise NnalignError(f"{self.where}: {key} must be {expected}, got {value!r}")
        return value

    def strings(self, key: str, default: Iterable[str] = ()) -> tuple[str, ...]:
        """A string or a list of strings, as a tuple."""
        value = self.get(key, (str, list), list(default), "a string or a list of strings")
        value = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) for v in value):
            raise NnalignError(f"{self.where}: {key} must be a string or a list of strings, got {value!r}")
        return tuple(value)

    def done(self) -> None:
        """One-line error for a key no getter asked for."""
        unknown = sorted(set(self.data) - set(self.known))
        if unknown:
            raise NnalignError(f"{self.where}: unknown key {unknown[0]!r} (known: {', '.join(self.known)})")

    def wrap(self, key: str, check: Callable[[], Any]) -> Any:
        """``check()``, its NnalignError prefixed with where and which key."""
        try:
            return check()
        except NnalignError as e:
            raise NnalignError(f"{self.where}: {key}: {e}") from None


def parse_subsets(items: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """``["all-single", "T1,T2"]`` as subsets in channel order, without repeats; NnalignError for an unknown
    modality or an empty list."""
    subsets: list[tuple[str, ...]] = []
    for item in items:
        found = SUBSET_WORDS[item.lower()]() if item.lower() in SUBSET_WORDS else [
            parse_modalities(item.replace("+", ","), BRATS_MODALITIES)]
        subsets += [s for s in found if s not in subsets]
    if not subsets:
        raise NnalignError(f"no modality subset (name modalities, or {', '.join(SUBSET_WORDS)})")
    return tuple(subsets)


def label_conventions() -> tuple[str, ...]:
    """The label conventions of ``[evaluate]``: those both nnalign_predict and nnalign_evaluate take (the held-out
    evaluation passes it to both)."""
    from nnalign.evaluation.metrics import LABEL_CHOICES
    from nnalign.inference.predict import LABEL_OPTIONS

    return tuple(c for c in LABEL_OPTIONS if c in LABEL_CHOICES)


def _folds(table: _Table) -> tuple[int | str, ...]:
    from nnalign.model_folders import parse_fold

    raw = table.get("folds", (list, int, str), [0])
    folds = tuple(dict.fromkeys(table.wrap("folds", lambda: parse_fold(f)) for f in
                                (raw if isinstance(raw, list) else [raw])))
    if not folds:
        raise NnalignError(f"{table.where}: folds is empty")
    return folds


def _path(value: str | None, base: Path) -> Path | None:
    return None if value is None else (base / Path(value).expanduser()).resolve()


def _positive(table: _Table, key: str, default: int | None = None) -> int | None:
    value = table.get(key, int, default)
    if value is not None and value < 1:
        raise NnalignError(f"{table.where}: {key} must be 1 or more, got {value}")
    return value


_SPEC_TYPES: dict[type, tuple[type, ...]] = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}
"""The TOML types a declared setting of each kind accepts."""


def teacher_setting_values(table: _Table, settings: tuple[Setting, ...] = TEACHER_SETTINGS) -> dict:
    """The declared settings' values of a ``[[teachers]]`` table (None: not given)."""
    values = {}
    for s in settings:
        value = table.get(s.key, _SPEC_TYPES[s.kind])
        values[s.name] = (not value) if s.spec_negates and value is not None else value
    return values


def _teacher(data: Any, index: int, source: str) -> Teacher:
    t = _Table(data, f"{source}: teachers[{index}]")
    anchor = t.get("anchor", str, DEFAULT_ANCHOR)
    values = teacher_setting_values(t)
    label = t.get("name", str, anchor)
    t.done()
    return Teacher(label, t.wrap("settings", lambda: teacher_spec(anchor, **values)))


def _students(data: Any, index: int, source: str, labels: list[str]) -> Students:
    s = _Table(data, f"{source}: students[{index}]")
    subsets = s.wrap("modalities", lambda: parse_subsets(s.strings("modalities")))
    kd_names = s.strings("kd", ["none"])
    kd_names = KD.names if [k.lower() for k in kd_names] == ["all"] else kd_names
    kd = tuple(dict.fromkeys(s.wrap("kd", lambda: KD.check(k)) for k in kd_names))
    teachers = s.strings("teachers", labels)
    s.done()
    for label in teachers:
        if label not in labels:
            raise NnalignError(f"{s.where}: teachers: no teacher named {label!r} (teachers: {', '.join(labels)})")
    if not kd:
        raise NnalignError(f"{s.where}: kd is empty (methods: {', '.join(KD.names)}, or all)")
    return Students(subsets, kd, tuple(dict.fromkeys(teachers)))


def _slurm(data: Any, source: str) -> SlurmOptions:
    s = _Table(data, f"{source}: [slurm]")
    options = SlurmOptions(partition=s.get("partition", str), gpus=s.get("gpus", int, 1), cpus=_positive(s, "cpus"),
                           mem_gb=s.get("mem_gb", (int, float)), time_min=_positive(s, "time_min", 24 * 60),
                           account=s.get("account", str), qos=s.get("qos", str), sbatch=s.strings("sbatch"),
                           setup=s.strings("setup"), signal_delay_s=_positive(s, "signal_delay_s", 120))
    s.done()
    if options.gpus < 0:
        raise NnalignError(f"{s.where}: gpus must be 0 or more, got {options.gpus}")
    for line in options.sbatch:
        if not re.fullmatch(r"--[a-z][a-z-]*(=.+)?", line):
            raise NnalignError(f"{s.where}: sbatch line {line!r} is not of the form --option or --option=value")
    return options


def parse_spec(data: dict, source: str, default_name: str, base: Path) -> ExperimentSpec:
    """Check a SPEC's parsed TOML (``data``) and return it as an :class:`ExperimentSpec`."""
    top = _Table(data, source)
    name = top.get("name", str, default_name)
    if not _NAME_RE.fullmatch(name):
        raise NnalignError(f"{source}: name {name!r} must be letters, digits, '.', '_' or '-'")
    d = _Table(top.get("dataset", dict, None, "a table") or {}, f"{source}: [dataset]")
    if "id" not in d.data:
        raise NnalignError(f"{source}: [dataset] needs id (the nnU-Net dataset ID)")
    dataset_id = d.get("id", int)
    dataset_name = d.get("name", str)
    configuration = d.get("configuration", str, "3d_fullres")
    folds = _folds(d)
    preprocess = d.get("preprocess", bool, False)
    processes = _positive(d, "processes", 4)
    convert = _path(d.get("convert", str), base)
    split = d.get("split", str, "protokd")
    d.done()
    if split not in ("protokd", "5fold"):
        raise NnalignError(f"{d.where}: split must be protokd or 5fold, got {split!r}")
    if convert is not None and dataset_name is None:
        raise NnalignError(f"{d.where}: convert needs name (the converted dataset's name)")

    f = _Table(top.get("folders", dict, {}, "a table"), f"{source}: [folders]")
    folders = {var: _path(f.get(key, str), base) for key, var in
               (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"), ("results", "nnUNet_results"))}
    f.done()

    t = _Table(top.get("training", dict, {}, "a table"), f"{source}: [training]")
    device = t.get("device", str, "cuda")
    epochs, student_epochs = _positive(t, "epochs"), _positive(t, "student_epochs")
    iters = _positive(t, "iters_per_epoch")
    data_workers = t.get("data_workers", int)
    t.done()
    if device not in ("cpu", "cuda", "mps"):
        raise NnalignError(f"{t.where}: device must be cpu, cuda or mps, got {device!r}")

    teacher_list = top.get("teachers", list, [], "an array of tables ([[teachers]])")
    teachers = tuple(_teacher(x, i, source) for i, x in enumerate(teacher_list))
    labels = [x.label for x in teachers]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise NnalignError(f"{source}: two teachers are named {repeated[0]!r} (give each a distinct name)")
    student_list = top.get("students", list, [], "an array of tables ([[students]])")
    students = tuple(_students(x, i, source, labels) for i, x in enumerate(student_list))
    if not teachers:
        raise NnalignError(f"{source}: no [[teachers]]: an experiment needs at least one teacher")

    e = _Table(top.get("evaluate", dict, {}, "a table"), f"{source}: [evaluate]")
    evaluate = EvaluateOptions(held_out=e.get("held_out", bool, True),
                               teacher_subsets=e.wrap("teacher_subsets",
                                                      lambda: parse_subsets(e.strings("teacher_subsets", ["full"]))),
                               images=_path(e.get("images", str), base), labels=_path(e.get("labels", str), base),
                               label_convention=e.get("label_convention", str, "nnunet"), tta=e.get("tta", bool, False))
    e.done()
    conventions = label_conventions()
    if evaluate.label_convention not in conventions:
        raise NnalignError(f"{e.where}: label_convention must be one of {', '.join(conventions)}, got "
                           f"{evaluate.label_convention!r}")
    r = _Table(top.get("report", dict, {}, "a table"), f"{source}: [report]")
    kd_report = r.get("kd", str)
    report = ReportOptions(enabled=r.get("enabled", bool, True), tsne=r.get("tsne", bool, True),
                           tsne_cases=_positive(r, "tsne_cases"),
                           kd=None if kd_report is None else r.wrap("kd", lambda: KD.check(kd_report)))
    r.done()
    slurm = _slurm(top.get("slurm", dict, {}, "a table"), source)
    top.done()
    return ExperimentSpec(name, source, dataset_id, dataset_name, configuration, folds, preprocess, processes, convert,
                          split, folders, device, TrainingLength(epochs, iters),
                          TrainingLength(student_epochs or epochs, iters), data_workers, teachers, students, evaluate,
                          report, slurm)
