"""One description of a run: what a teacher or a student is, its trainer name, and where each setting travels.

nnU-Net names a run's folder after the trainer class (``{Trainer}__{plans}__{configuration}/fold_{f}``) and rebuilds
the trainer, and so the network, from that name alone (``--c``, ``--val``, DDP ranks, the predictor). Hence:

- **In the name**: everything that makes a model what it is. A teacher's :class:`TeacherSpec` (its anchor and every
  setting of :data:`TEACHER_SETTINGS`), the baseline's :class:`BaselineSpec`, a student's :class:`StudentSpec`
  (modality subset, KD method, teacher, teacher fold, and a hash of its loss-setting overrides).
- **In the run's inputs** (``nnalign_inputs.json`` in the fold folder, :data:`TRAINING_ONLY`): what only changes
  how long or how a run trains. ``nnalign_train`` writes them before training starts; the trainer reads them in every
  DDP rank and on ``--c``. The overrides' values travel there too, checked against their hash in the name.

Each teacher setting is declared once, as a :class:`Setting`; the command line, the SPEC reader, the name codec and
the flags of a grid run are made from the declarations.

Names::

    nnAlignTeacher_mixture_drop0p5                      anchor P*, every other setting at its default
    nnAlignTeacher_mixture                              P* trained without modality dropout (its weights stay uniform)
    nnAlignTeacher_mixturescaled_rel                    nnalign's scaled P* (mixture-scaled), relative distance
    nnAlignTeacher_modalityT1ce_w0p5_sep_drop0p3_nosg   anchor T1ce, lambda 0.5, one encoder per modality,
                                                        modality dropout 0.3, no stop-gradient on the anchor
    nnAlignTeacher_normal_lvl2                          N(0, 1) anchor, latents at U-Net stage 2 (not the plans')
    nnAlignOriginal_drop0p25                            plain nnU-Net on all stacked modalities, dropout 0.25
    nnAlignTeacher_mixture_drop0p5_bal                  P*, half the samples keep a uniformly drawn proper subset
    nnAlignStudent_T1ce_protokd_Teacher-mixture         T1ce student, ProtoKD, from the P* teacher
    nnAlignStudent_T1-T2_none_Teacher-mixture           T1+T2 baseline without distillation
    nnAlignStudent_FLAIR_kdnet_Teacher-modalityT1ce-w0p5_tf1_x1a2b3c4d
                                                        teacher fold 1, loss settings other than KD-Net's defaults

:meth:`TeacherSpec.parse` and :meth:`StudentSpec.parse` invert ``trainer_name()`` exactly: a name they did not make
(a default written out, another order, an unknown anchor or method) is refused. Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from nnalign.errors import NnalignError
from nnalign.losses.kd.registry import KD
from nnalign.modalities import BRATS_MODALITIES, parse_modalities, subset_tag
from nnalign.networks.anchor_registry import (ALIGN_DISTANCES, ANCHOR_KINDS, DEFAULT_ANCHOR, AnchorKind,
                                              canonical_anchor)

BASELINE = "original"
"""How a command or a SPEC asks for the plain nnU-Net baseline (``--anchor original``), the paper's "Original"
teacher: nnU-Net on all modalities stacked, no latents, no anchor (:class:`BaselineSpec`)."""
TEACHER_ANCHORS: tuple[str, ...] = (*ANCHOR_KINDS, BASELINE)
"""What ``--anchor`` and a SPEC's ``anchor`` take: the anchor kinds, and the baseline."""
SUBSET_SAMPLINGS: tuple[str, ...] = ("independent", "balanced")
"""How modality dropout draws a training sample's modalities (:func:`nnalign.training.presence.sample_presence`);
the first is the default."""
TEACHER_PREFIX = "nnAlignTeacher"
ORIGINAL_PREFIX = "nnAlignOriginal"
STUDENT_PREFIX = "nnAlignStudent"
TRAINING_ONLY: tuple[str, ...] = ("epochs", "iters_per_epoch", "kd_overrides")
"""The training inputs that are not in the name (:func:`nnalign.training.record.write_training_inputs`)."""

_NNALIGN = "nnAlign"
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


def _encode_float(x: float) -> str:
    """Exact, class-name-safe float: ``0.5`` -> ``0p5``, ``1e-05`` -> ``1em05``, ``2.0`` -> ``2``."""
    s = repr(float(x))
    if s.endswith(".0"):
        s = s[:-2]
    return s.replace(".", "p").replace("-", "m").replace("+", "")


def _decode_float(s: str) -> float:
    if not re.fullmatch(r"[0-9]+(p[0-9]+)?(em?[0-9]+)?", s):
        raise ValueError(s)
    return float(s.replace("p", ".").replace("m", "-"))


def _decode_int(s: str) -> int:
    if not re.fullmatch(r"[0-9]+", s):
        raise ValueError(s)
    return int(s)


def _positive_int_or_none(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < 1:
        raise NnalignError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------------
# the settings of a teacher, each declared once


@dataclass(frozen=True)
class Setting:
    """One setting of a teacher run, declared once: its type, default, command-line flag, SPEC key, trainer-name
    token, help text and checks. ``nnalign_train``'s options, the SPEC's ``[[teachers]]`` reader, the trainer-name
    codec, the flags a grid run passes and the settings record are all made from :data:`TEACHER_SETTINGS`.

    - ``name``: the spec's field and the settings record's key; ``kind``: ``float``, ``int``, ``bool`` or ``str``.
    - ``default``: the value when none is given. With ``anchor_default`` an anchor's own default (the
      :class:`~nnalign.networks.anchor_registry.AnchorKind` field of the same name) replaces it.
    - ``flag`` (``--...``) and ``help``; a ``bool`` flag switches the setting away from its default. ``choices``
      for a ``str``.
    - ``spec_key``: the SPEC's key (default ``name``); ``spec_negates``: its ``true`` means ``not default``.
    - The name: ``tokens`` maps a value to a fixed token (``{False: "sep"}``); ``prefix`` writes the value after a
      prefix (``drop0p5``). A name without the token means ``unnamed`` (None: the default, the anchor's where it
      has one).
    - ``needs``: the :class:`AnchorKind` fact without which the setting has no effect (``lacks`` says what is then
      missing, for the one-line error); ``baseline``: the plain nnU-Net baseline has it too.
    - ``check``: a one-line error for a bad value (it receives the value and returns nothing).
    """

    name: str
    kind: type
    flag: str
    help: str
    default: Any = None
    anchor_default: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    spec_key: str | None = None
    spec_negates: bool = False
    tokens: dict[Any, str] = field(default_factory=dict)
    prefix: str | None = None
    unnamed: Any = None
    needs: str | None = None
    lacks: str = ""
    baseline: bool = False
    check: Callable[[Any], None] | None = None

    @property
    def key(self) -> str:
        """The SPEC's key."""
        return self.spec_key or self.name

    @property
    def dest(self) -> str:
        """The argparse destination of :attr:`flag`."""
        return self.flag.lstrip("-").replace("-", "_")

    def default_for(self, anchor: AnchorKind | None) -> Any:
        """The value when none is given, for a teacher of ``anchor`` (None: the baseline)."""
        return getattr(anchor, self.name) if self.anchor_default and anchor is not None else self.default

    def name_value(self, anchor: AnchorKind | None) -> Any:
        """The value a trainer name without this setting's token means."""
        return self.default_for(anchor) if self.unnamed is None else self.unnamed

    def encode(self, value: Any) -> str:
        """The token of ``value``."""
        if value in self.tokens:
            return self.tokens[value]
        return self.prefix + (_encode_float(value) if self.kind is float else str(value))

    def decode(self, token: str) -> tuple[bool, Any]:
        """(whether ``token`` is this setting's, the value it means)."""
        for value, word in self.tokens.items():
            if token == word:
                return True, value
        if self.prefix is not None and token.startswith(self.prefix):
            try:
                return True, (_decode_float if self.kind is float else _decode_int)(token[len(self.prefix):])
            except ValueError:
                return False, None
        return False, None


def _check_weight(value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise NnalignError(f"the alignment weight must be a finite number >= 0, got {value}")


def _check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise NnalignError(f"the modality dropout must be in [0, 1), got {value}")


def _check_level(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
        raise NnalignError(f"the latent level must be a whole number >= 0, got {value}")


def _one_of(what: str, choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise NnalignError(f"unknown {what} {value!r} (one of {', '.join(choices)})")
    return check


TEACHER_SETTINGS: tuple[Setting, ...] = (
    Setting("align_weight", float, "--align-weight", metavar="LAMBDA", anchor_default=True, default=0.0, prefix="w", needs="has_loss", lacks="alignment loss", check=_check_weight,
            help="weight of the alignment loss (default: the anchor's, "
                 + ", ".join(f"{k.name} {k.align_weight}" for k in ANCHOR_KINDS.values() if k.align_weight) + ")"),
    Setting("shared_encoder", bool, "--separate-encoders", default=True, spec_key="separate_encoders",
            spec_negates=True, tokens={False: "sep"}, lacks="modality encoders",
            help="one latent encoder per modality instead of one shared encoder"),
    Setting("latent_level", int, "--latent-level", metavar="L", prefix="lvl", lacks="latents", check=_check_level,
            help="U-Net stage at which the per-modality latents are taken and aligned, 0 (the input resolution) to "
                 "the plans' last stage (default: the plans' latent_level, 0)"),
    Setting("modality_dropout", float, "--modality-dropout", metavar="P", anchor_default=True, default=0.0,
            unnamed=0.0, prefix="drop", baseline=True, check=_check_dropout,
            help="drop each modality of each training sample with probability P, never all (default: the anchor's, "
                 + ", ".join(f"{k.name} {k.modality_dropout}" for k in ANCHOR_KINDS.values() if k.modality_dropout)
                 + ", else 0)"),
    Setting("subset_sampling", str, "--subset-sampling", default=SUBSET_SAMPLINGS[0], choices=SUBSET_SAMPLINGS,
            tokens={"balanced": "bal"}, baseline=True, check=_one_of("subset sampling", SUBSET_SAMPLINGS),
            help="with --modality-dropout: independent (each modality dropped with probability P) or balanced (with "
                 "probability P a uniformly drawn proper subset, else every modality) (default: %(default)s)"),
    Setting("stop_gradient", bool, "--no-stop-gradient", default=True, tokens={False: "nosg"},
            needs="takes_modality", lacks="anchor modality",
            help="modality anchor: let the alignment loss pull the anchor modality too"),
    Setting("align_distance", str, "--align-distance", default=ALIGN_DISTANCES[0], choices=ALIGN_DISTANCES,
            tokens={"relative": "rel"}, needs="distance", lacks="distance loss",
            check=_one_of("alignment distance", ALIGN_DISTANCES),
            help="modality and mixture anchors: mse (the paper's plain MSE) or relative (nnalign's: over the latents' "
                 "centred energy, which neither shrinking nor a common offset can lower) (default: %(default)s)"),
)
"""Every setting of a teacher but its anchor, in the order of their trainer-name tokens."""
BASELINE_SETTINGS: tuple[Setting, ...] = tuple(s for s in TEACHER_SETTINGS if s.baseline)
"""The settings the plain nnU-Net baseline has."""


def resolve_settings(settings: tuple[Setting, ...], given: dict, anchor: AnchorKind | None, what: str) -> dict:
    """Every setting's value for a run of ``anchor`` (None: the baseline): ``given`` (None or absent: the default),
    each checked; one-line NnalignError for a bad value or a setting this kind of run does not have."""
    unknown = sorted(set(given) - {s.name for s in settings})
    if unknown:
        raise NnalignError(f"{what} has no setting {unknown[0]!r}")
    values = {}
    for s in settings:
        value = given.get(s.name)
        value = s.default_for(anchor) if value is None else value
        if s.kind is float and not isinstance(value, bool) and isinstance(value, (int, float)):
            value = float(value)
        if s.check is not None:
            s.check(value)
        if s.kind is int and value is not None:
            value = int(value)
        values[s.name] = value
    return values


def encode_settings(settings: tuple[Setting, ...], values: dict, anchor: AnchorKind | None) -> list[str]:
    """The trainer-name tokens of the settings whose value the name does not mean without them, in order."""
    return [s.encode(values[s.name]) for s in settings if values[s.name] != s.name_value(anchor)]


def decode_settings(settings: tuple[Setting, ...], tokens: list[str], anchor: AnchorKind | None) -> dict:
    """The values a name's tokens (after its head) give; a setting without its token gets the value a name without
    it means. ValueError for an unknown token or one out of order."""
    values, last = {}, -1
    for token in tokens:
        for index, s in enumerate(settings):
            matched, value = s.decode(token)
            if matched:
                break
        else:
            raise ValueError(token)
        if index <= last:
            raise ValueError(token)
        values[s.name], last = value, index
    return {s.name: values.get(s.name, s.name_value(anchor)) for s in settings}


def settings_flags(settings: tuple[Setting, ...], values: dict, anchor: AnchorKind | None) -> list[str]:
    """``nnalign_train`` flags for the settings that differ from what the command assumes without them."""
    flags = []
    for s in settings:
        value = values[s.name]
        if value == s.default_for(anchor):
            continue
        if s.kind is bool:
            flags.append(s.flag)
        else:
            flags += [s.flag, repr(value) if s.kind is float else str(value)]
    return flags


def _check_sampling(values: dict) -> None:
    if values["subset_sampling"] != SUBSET_SAMPLINGS[0] and values["modality_dropout"] == 0.0:
        raise NnalignError(f"subset sampling {values['subset_sampling']!r} needs a modality dropout above 0")


@dataclass(frozen=True)
class TeacherSpec:
    """An aligned teacher: its anchor and every :data:`TEACHER_SETTINGS` value, all of them in its trainer name.

    - ``anchor``: ``none | normal | modality:NAME | mixture | mixture-scaled`` (``modality`` alone means
      ``modality:T1ce``; spellings are made canonical, ``modality:t1c`` -> ``modality:T1ce``).
    - ``align_weight``: lambda, the weight of the anchor loss added to nnU-Net's segmentation loss (None: the
      anchor's); ``shared_encoder``: one latent encoder for all modalities, or one per modality;
      ``modality_dropout``: each modality of each training sample is dropped with this probability, never all (None:
      the anchor's); ``subset_sampling``: ``independent`` (as above) or ``balanced`` (with probability
      ``modality_dropout`` a sample keeps a uniformly drawn proper subset, else all); ``stop_gradient``: detach the
      anchor modality in its loss (``modality:NAME`` only); ``latent_level``: the U-Net stage of the latents (None:
      the plans'); ``align_distance``: ``mse`` (the paper's) or ``relative`` (nnalign's) for the distance anchors.

    The plain nnU-Net baseline is :class:`BaselineSpec`; :func:`teacher_spec` makes either from an anchor word.
    """

    anchor: str = DEFAULT_ANCHOR
    align_weight: float | None = None
    shared_encoder: bool = True
    modality_dropout: float | None = None
    stop_gradient: bool = True
    latent_level: int | None = None
    subset_sampling: str = SUBSET_SAMPLINGS[0]
    align_distance: str = ALIGN_DISTANCES[0]

    is_original = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor", canonical_anchor(self.anchor))
        given = {s.name: getattr(self, s.name) for s in TEACHER_SETTINGS}
        values = resolve_settings(TEACHER_SETTINGS, given, self.kind, "a teacher")
        for s in TEACHER_SETTINGS:
            if s.needs and not getattr(self.kind, s.needs) and values[s.name] != s.default_for(self.kind):
                raise NnalignError(f"anchor '{self.anchor_kind}' has no {s.lacks}, so {s.flag} has no effect")
            object.__setattr__(self, s.name, values[s.name])
        _check_sampling(values)

    @property
    def kind(self) -> AnchorKind:
        """The anchor's facts."""
        return ANCHOR_KINDS[self.anchor_kind]

    @property
    def anchor_kind(self) -> str:
        """``none``, ``normal``, ``modality``, ``mixture`` or ``mixture-scaled``."""
        return self.anchor.partition(":")[0]

    @property
    def anchor_modality(self) -> str | None:
        """The anchor modality's canonical name for ``modality:NAME``, else None."""
        return self.anchor.partition(":")[2] or None

    def settings(self) -> dict:
        """Every :data:`TEACHER_SETTINGS` value."""
        return {s.name: getattr(self, s.name) for s in TEACHER_SETTINGS}

    def model_settings(self) -> dict:
        """Every setting, as the settings record stores them."""
        return asdict(self)

    def latent_level_for(self, arch_kwargs: dict) -> int:
        """The latent level a network of these settings has: this run's, else the plans' (``arch_kwargs``), else 0."""
        return self.latent_level if self.latent_level is not None else int(arch_kwargs.get("latent_level", 0))

    def variant_tokens(self) -> list[str]:
        """The name's tokens after the anchor, one per setting the name does not mean without it, in
        :data:`TEACHER_SETTINGS` order: ``w<lambda>``, ``sep``, ``lvl<L>``, ``drop<p>``, ``bal``, ``nosg``, ``rel``."""
        return encode_settings(TEACHER_SETTINGS, self.settings(), self.kind)

    def train_flags(self) -> list[str]:
        """``nnalign_train`` flags that train this teacher (defaults left out)."""
        return ["--anchor", self.anchor, *settings_flags(TEACHER_SETTINGS, self.settings(), self.kind)]

    @property
    def variant(self) -> str:
        """The non-default settings as the name writes them (``w0p5_sep``); empty for the standard teacher."""
        return "_".join(self.variant_tokens())

    def trainer_name(self) -> str:
        """``nnAlignTeacher_<anchor>[_<variant>]``; floats written exactly, ``.`` as ``p`` and ``-`` as ``m``."""
        token = self.kind.token + (self.anchor_modality or "")
        name = "_".join([TEACHER_PREFIX, token, *self.variant_tokens()])
        if not _NAME_RE.fullmatch(name):
            raise NnalignError(f"cannot name a trainer for anchor {self.anchor!r}")
        return name

    @classmethod
    def parse(cls, name: str) -> "TeacherSpec | BaselineSpec":
        """Invert :meth:`trainer_name` (and :meth:`BaselineSpec.trainer_name`); ValueError (one line) for a name it
        did not make."""
        parts = name.split("_")
        if parts[0] == ORIGINAL_PREFIX:
            return BaselineSpec.parse(name)
        if parts[0] != TEACHER_PREFIX or len(parts) < 2:
            raise ValueError(f"{name!r} is not an nnalign teacher trainer name")
        token, tokens = parts[1], parts[2:]
        kind = next((k for k in ANCHOR_KINDS.values() if token == k.token
                     or k.takes_modality and re.fullmatch(f"{k.token}[A-Za-z0-9]+", token)), None)
        if kind is None:
            raise ValueError(f"{name!r}: unknown anchor token {token!r}")
        anchor = f"{kind.name}:{token[len(kind.token):]}" if kind.takes_modality else kind.name
        try:
            spec = cls(anchor, **decode_settings(TEACHER_SETTINGS, tokens, kind))
        except (ValueError, NnalignError) as e:
            raise ValueError(f"{name!r} is not an nnalign teacher trainer name ({e})") from None
        if spec.trainer_name() != name:  # e.g. a default written out ("w0p1"), or a non-canonical spelling
            raise ValueError(f"{name!r} is not canonical (the same settings are named {spec.trainer_name()!r})")
        return spec


@dataclass(frozen=True)
class BaselineSpec:
    """The plain nnU-Net baseline (the paper's "Original" teacher): nnU-Net's U-Net on all modalities stacked, trained
    with the :data:`BASELINE_SETTINGS` (modality dropout zeroes dropped channels), named ``nnAlignOriginal[_...]``."""

    modality_dropout: float | None = None
    subset_sampling: str = SUBSET_SAMPLINGS[0]

    is_original = True
    anchor = BASELINE
    anchor_kind = BASELINE
    anchor_modality = None

    def __post_init__(self) -> None:
        given = {s.name: getattr(self, s.name) for s in BASELINE_SETTINGS}
        values = resolve_settings(BASELINE_SETTINGS, given, None, "the baseline")
        for key, value in values.items():
            object.__setattr__(self, key, value)
        _check_sampling(values)

    def settings(self) -> dict:
        """Every :data:`BASELINE_SETTINGS` value."""
        return {s.name: getattr(self, s.name) for s in BASELINE_SETTINGS}

    def model_settings(self) -> dict:
        """Every setting, as the settings record stores them (with ``anchor``: ``original``)."""
        return {"anchor": BASELINE, **asdict(self)}

    def variant_tokens(self) -> list[str]:
        """The name's tokens after ``nnAlignOriginal``: ``drop<p>``, ``bal``."""
        return encode_settings(BASELINE_SETTINGS, self.settings(), None)

    @property
    def variant(self) -> str:
        return "_".join(self.variant_tokens())

    def train_flags(self) -> list[str]:
        """``nnalign_train`` flags that train this baseline (defaults left out)."""
        return ["--anchor", BASELINE, *settings_flags(BASELINE_SETTINGS, self.settings(), None)]

    def trainer_name(self) -> str:
        """``nnAlignOriginal[_<variant>]``."""
        return "_".join([ORIGINAL_PREFIX, *self.variant_tokens()])

    @classmethod
    def parse(cls, name: str) -> "BaselineSpec":
        """Invert :meth:`trainer_name`; ValueError (one line) for a name it did not make."""
        parts = name.split("_")
        if parts[0] != ORIGINAL_PREFIX:
            raise ValueError(f"{name!r} is not an nnalign baseline trainer name")
        try:
            spec = cls(**decode_settings(BASELINE_SETTINGS, parts[1:], None))
        except (ValueError, NnalignError) as e:
            raise ValueError(f"{name!r} is not an nnalign teacher trainer name ({e})") from None
        if spec.trainer_name() != name:
            raise ValueError(f"{name!r} is not canonical (the same settings are named {spec.trainer_name()!r})")
        return spec


AnyTeacher = TeacherSpec | BaselineSpec
"""What a student learns from: an aligned teacher or the plain baseline."""


def teacher_spec(anchor: str = DEFAULT_ANCHOR, **settings) -> AnyTeacher:
    """The teacher an anchor word and settings describe (None values: defaults): a :class:`TeacherSpec`, or for
    ``original`` a :class:`BaselineSpec`; one-line NnalignError for a setting the baseline does not have."""
    if str(anchor).strip().lower() != BASELINE:
        canonical_anchor(anchor, TEACHER_ANCHORS)  # lists the baseline among the choices of an unknown word
        return TeacherSpec(anchor, **settings)
    own = {s.name for s in BASELINE_SETTINGS}
    for s in TEACHER_SETTINGS:
        if s.name not in own and settings.get(s.name) is not None and settings[s.name] != s.default:
            raise NnalignError(f"anchor '{BASELINE}' has no {s.lacks}, so {s.flag} has no effect")
    return BaselineSpec(**{k: v for k, v in settings.items() if k in own})


def overrides_hash(overrides: dict) -> str:
    """Eight hex digits identifying a set of loss-setting overrides (order-independent)."""
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class StudentSpec:
    """A student: its modality subset, KD method, teacher, teacher fold (None: the student's own fold) and the
    loss-setting overrides of its method.

    The name holds the overrides' hash (``overrides_digest``) only; a spec parsed from a name has ``overrides`` None
    until :meth:`with_overrides` supplies the values from the settings record, checked against the hash.
    """

    modalities: tuple[str, ...]
    kd: str
    teacher: AnyTeacher
    teacher_fold: str | None = None
    overrides: dict | None = field(default_factory=dict)
    overrides_digest: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", parse_modalities(self.modalities, BRATS_MODALITIES))
        object.__setattr__(self, "kd", KD.check(self.kd))
        if self.teacher_fold is not None:
            object.__setattr__(self, "teacher_fold", str(self.teacher_fold))
        if self.overrides is not None:
            digest = overrides_hash(self.overrides) if self.overrides else None
            if self.overrides_digest is not None and digest != self.overrides_digest:
                raise NnalignError(f"the loss settings {self.overrides} hash to {digest or 'nothing'}, but the run's "
                                   f"name says x{self.overrides_digest}")
            object.__setattr__(self, "overrides_digest", digest)

    def with_overrides(self, overrides: dict) -> "StudentSpec":
        """This spec with the overrides' values (from the settings record); NnalignError if they do not hash to the
        name's ``x<hash>``."""
        digest = overrides_hash(overrides) if overrides else None
        if digest != self.overrides_digest:
            named = f"x{self.overrides_digest}" if self.overrides_digest else "none"
            raise NnalignError(f"the loss settings {overrides} hash to {'x' + digest if digest else 'nothing'}, but "
                               f"the run's name says {named}")
        return replace(self, overrides=dict(overrides))

    @property
    def teacher_trainer(self) -> str:
        """The teacher's trainer name."""
        return self.teacher.trainer_name()

    def trainer_name(self) -> str:
        """``nnAlignStudent_<subset>_<kd>_<Teacher-name>[_tf<F>][_x<hash>]``: the teacher's trainer name without
        ``nnAlign`` and with ``-`` for ``_`` (the teacher's plans and configuration are the student's own)."""
        parts = [STUDENT_PREFIX, subset_tag(self.modalities), self.kd,
                 self.teacher_trainer[len(_NNALIGN):].replace("_", "-")]
        if self.teacher_fold is not None:
            parts.append(f"tf{self.teacher_fold}")
        if self.overrides_digest is not None:
            parts.append(f"x{self.overrides_digest}")
        return "_".join(parts)

    @classmethod
    def parse(cls, name: str) -> "StudentSpec":
        """Invert :meth:`trainer_name` (``overrides`` None); ValueError (one line) for a name it did not make."""
        parts = name.split("_")
        if len(parts) < 4 or parts[0] != STUDENT_PREFIX:
            raise ValueError(f"{name!r} is not an nnalign student trainer name")
        fold = digest = None
        for token in parts[4:]:
            if fold is None and digest is None and re.fullmatch(r"tf(\d+|all)", token):
                fold = token[2:]
            elif digest is None and re.fullmatch(r"x[0-9a-f]{8}", token):
                digest = token[1:]
            else:
                raise ValueError(f"{name!r}: unexpected part {token!r}")
        try:
            teacher = TeacherSpec.parse(_NNALIGN + parts[3].replace("-", "_"))
            spec = cls(tuple(parts[1].split("-")), parts[2], teacher, fold, None, digest)
        except (ValueError, NnalignError) as e:
            raise ValueError(f"{name!r} is not an nnalign student trainer name ({e})") from None
        if spec.trainer_name() != name:
            raise ValueError(f"{name!r} is not canonical (the same student is named {spec.trainer_name()!r})")
        return spec


def parse_trainer_name(name: str) -> TeacherSpec | StudentSpec | None:
    """The spec an nnalign trainer name describes; None for a name that is not nnalign's (another nnU-Net trainer);
    ValueError for one that starts like nnalign's but is not one of its names."""
    if name.split("_")[0] == STUDENT_PREFIX:
        return StudentSpec.parse(name)
    if name.startswith(_NNALIGN):
        return TeacherSpec.parse(name)
    return None


@dataclass(frozen=True)
class TrainingLength:
    """Epochs and iterations per epoch (None: nnU-Net's 1000 and 250): not in the name, so a longer run continues
    the same folder (``--c --epochs N``)."""

    epochs: int | None = None
    iters_per_epoch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", _positive_int_or_none("epochs", self.epochs))
        object.__setattr__(self, "iters_per_epoch", _positive_int_or_none("iters_per_epoch", self.iters_per_epoch))

    @classmethod
    def from_record(cls, record: dict | None) -> "TrainingLength":
        """The length a settings record holds (unset where it has none)."""
        record = record or {}
        return cls(record.get("epochs"), record.get("iters_per_epoch"))
