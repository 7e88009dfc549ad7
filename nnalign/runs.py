"""One description of a run: what a teacher or a student is, its trainer name, and where each setting travels.

nnU-Net names a run's folder after the trainer class (``{Trainer}__{plans}__{configuration}/fold_{f}``) and rebuilds
the trainer, and so the network, from that name alone (``--c``, ``--val``, DDP ranks, the predictor). Hence:

- **In the name**: everything that makes a model what it is. A teacher's :class:`TeacherSpec` (anchor, alignment
  weight, encoders, latent level, modality dropout, stop-gradient, alignment distance); a student's
  :class:`StudentSpec` (modality subset, KD method, teacher, teacher fold, and a hash of its loss-setting overrides).
- **In the settings record** (``nnalign_settings.json`` in the fold folder, :data:`TRAINING_ONLY`): what only changes
  how long or how a run trains. ``nnalign_train`` writes it before training starts; the trainer reads it in every DDP
  rank and on ``--c``, and rewrites the record as the run goes. The overrides' values travel there too, checked
  against their hash in the name.

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

from nnalign.errors import NnalignError
from nnalign.losses.kd.registry import KD
from nnalign.modalities import BRATS_MODALITIES, parse_modalities, subset_tag
from nnalign.networks.anchor_registry import ALIGN_DISTANCES, ANCHORS, MIXTURE_ANCHORS, canonical_anchor

TEACHER_ANCHORS: tuple[str, ...] = (*ANCHORS.names, "original")
"""A teacher run's anchor kinds: the network anchors, and ``original`` (plain nnU-Net on the stacked modalities)."""
DEFAULT_ALIGN_WEIGHTS: dict[str, float] = {"none": 0.0, "normal": 0.1, "modality": 0.1, "mixture": 0.1,
                                           "mixture-scaled": 0.1, "original": 0.0}
"""lambda per anchor kind when none is given (documentation/training.md, "Alignment weights", says how they were
chosen); the anchors without an alignment loss have 0."""
DEFAULT_MODALITY_DROPOUT: dict[str, float] = {"none": 0.0, "normal": 0.0, "modality": 0.0, "mixture": 0.5,
                                              "mixture-scaled": 0.0, "original": 0.0}
"""The modality dropout per anchor kind when none is given. P*'s weights learn only through the fill of missing
modalities (and the alignment term, which alone keeps them uniform), so P* trains with missing modalities by default
(0.5, the demo's); ``mixture-scaled`` learns its weights through the scaling instead. The name always spells a dropout
above 0 (``_drop0p5``), so a name means what it meant before this default existed."""
DISTANCE_ANCHORS: tuple[str, ...] = ("modality", *MIXTURE_ANCHORS)
"""The anchor kinds whose loss is a squared distance between latents (the ones ``align_distance`` applies to)."""
SUBSET_SAMPLINGS: tuple[str, ...] = ("independent", "balanced")
"""How modality dropout draws a training sample's modalities (:func:`nnalign.training.presence.sample_presence`);
the first is the default."""
TEACHER_PREFIX = "nnAlignTeacher"
ORIGINAL_PREFIX = "nnAlignOriginal"
STUDENT_PREFIX = "nnAlignStudent"
TRAINING_ONLY: tuple[str, ...] = ("epochs", "iters_per_epoch", "kd_overrides")
"""The settings record's keys that ``nnalign_train`` writes before training and the trainer reads: not in the name."""

_NNALIGN = "nnAlign"
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_TEACHER_TOKEN_ORDER = ("w", "sep", "lvl", "drop", "bal", "nosg", "rel")
_ANCHOR_TOKENS = {kind.replace("-", ""): kind for kind in ANCHORS.names if kind != "modality"}
"""The trainer-name token of each anchor kind but ``modality`` (``mixture-scaled`` -> ``mixturescaled``: a name
holds letters, digits and ``_``, and a student's name writes its teacher's ``_`` as ``-``)."""


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


def _positive_int_or_none(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < 1:
        raise NnalignError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher (or the ``original`` nnU-Net baseline): every setting here is in its trainer name.

    - ``anchor``: ``none | normal | modality:NAME | mixture | mixture-scaled | original`` (``modality`` alone means
      ``modality:T1ce``; spellings are made canonical, ``modality:t1c`` -> ``modality:T1ce``).
    - ``align_weight``: lambda, the weight of the anchor loss added to nnU-Net's segmentation loss; None (the default)
      means the anchor's own (:data:`DEFAULT_ALIGN_WEIGHTS`).
    - ``shared_encoder``: one latent encoder for all modalities (True) or one per modality.
    - ``modality_dropout``: each modality of each training sample is dropped with this probability (never all); None
      (the default) means the anchor's own (:data:`DEFAULT_MODALITY_DROPOUT`).
    - ``subset_sampling``: ``independent`` (as above) or ``balanced``: with probability ``modality_dropout`` a
      sample keeps a uniformly drawn proper subset of its modalities, else all of them.
    - ``stop_gradient``: detach the anchor modality in its loss (``modality:NAME`` only).
    - ``latent_level``: the U-Net stage at which the latents Z_j are taken; None means the plans' ``latent_level``.
    - ``align_distance``: ``mse`` (the paper's plain MSE, the default) or ``relative`` (nnalign's: over the latents'
      centred energy), for the distance anchors (:data:`DISTANCE_ANCHORS`).
    """

    anchor: str = "mixture"
    align_weight: float | None = None
    shared_encoder: bool = True
    modality_dropout: float | None = None
    stop_gradient: bool = True
    latent_level: int | None = None
    subset_sampling: str = SUBSET_SAMPLINGS[0]
    align_distance: str = ALIGN_DISTANCES[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor", canonical_anchor(self.anchor, TEACHER_ANCHORS))
        kind = self.anchor_kind
        if self.align_weight is not None and float(self.align_weight) != 0 and kind in ("none", "original"):
            raise NnalignError(f"anchor '{kind}' has no alignment loss, so an alignment weight has no effect")
        weight = DEFAULT_ALIGN_WEIGHTS[kind] if self.align_weight is None else self.align_weight
        object.__setattr__(self, "align_weight", float(weight))
        dropout = DEFAULT_MODALITY_DROPOUT[kind] if self.modality_dropout is None else self.modality_dropout
        object.__setattr__(self, "modality_dropout", float(dropout))
        if not math.isfinite(self.align_weight) or self.align_weight < 0:
            raise NnalignError(f"the alignment weight must be a finite number >= 0, got {self.align_weight}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise NnalignError(f"the modality dropout must be in [0, 1), got {self.modality_dropout}")
        if self.subset_sampling not in SUBSET_SAMPLINGS:
            raise NnalignError(f"unknown subset sampling {self.subset_sampling!r} (one of {', '.join(SUBSET_SAMPLINGS)})")
        if self.subset_sampling != SUBSET_SAMPLINGS[0] and self.modality_dropout == 0.0:
            raise NnalignError(f"subset sampling {self.subset_sampling!r} needs a modality dropout above 0")
        if self.align_distance not in ALIGN_DISTANCES:
            raise NnalignError(f"unknown alignment distance {self.align_distance!r} (one of "
                               f"{', '.join(ALIGN_DISTANCES)})")
        if self.align_distance != ALIGN_DISTANCES[0] and kind not in DISTANCE_ANCHORS:
            raise NnalignError(f"anchor '{kind}' has no distance loss, so the alignment distance has no effect")
        if not self.stop_gradient and kind != "modality":
            raise NnalignError(f"stop-gradient only applies to the modality anchor, not to anchor '{self.anchor}'")
        if not self.shared_encoder and kind == "original":
            raise NnalignError("anchor 'original' has no modality encoders, so separate encoders have no effect")
        if self.latent_level is not None:
            if int(self.latent_level) != self.latent_level or self.latent_level < 0:
                raise NnalignError(f"the latent level must be a whole number >= 0, got {self.latent_level}")
            object.__setattr__(self, "latent_level", int(self.latent_level))
            if kind == "original":
                raise NnalignError("anchor 'original' has no latents, so a latent level has no effect")

    @property
    def anchor_kind(self) -> str:
        """``none``, ``normal``, ``modality``, ``mixture``, ``mixture-scaled`` or ``original``."""
        return self.anchor.partition(":")[0]

    @property
    def anchor_modality(self) -> str | None:
        """The anchor modality's canonical name for ``modality:NAME``, else None."""
        return self.anchor.partition(":")[2] or None

    @property
    def is_original(self) -> bool:
        """Plain nnU-Net on the stacked modalities: no latent encoders, no alignment."""
        return self.anchor_kind == "original"

    def model_settings(self) -> dict:
        """Every setting, as the settings record stores them."""
        return asdict(self)

    def latent_level_for(self, arch_kwargs: dict) -> int:
        """The latent level a network of these settings has: this run's, else the plans' (``arch_kwargs``), else 0."""
        return self.latent_level if self.latent_level is not None else int(arch_kwargs.get("latent_level", 0))

    def variant_tokens(self) -> list[str]:
        """The name's tokens after the anchor, one per non-default setting, in this order: ``w<lambda>`` (not the
        anchor's default), ``sep`` (one encoder per modality), ``lvl<L>``, ``drop<p>`` (not 0), ``bal`` (balanced subset
        sampling), ``nosg``, ``rel`` (the relative alignment distance)."""
        tokens = []
        if self.align_weight != DEFAULT_ALIGN_WEIGHTS[self.anchor_kind]:
            tokens.append(f"w{_encode_float(self.align_weight)}")
        if not self.shared_encoder:
            tokens.append("sep")
        if self.latent_level is not None:
            tokens.append(f"lvl{self.latent_level}")
        if self.modality_dropout != 0.0:
            tokens.append(f"drop{_encode_float(self.modality_dropout)}")
        if self.subset_sampling == "balanced":
            tokens.append("bal")
        if not self.stop_gradient:
            tokens.append("nosg")
        if self.align_distance != ALIGN_DISTANCES[0]:
            tokens.append("rel")
        return tokens

    def train_flags(self) -> list[str]:
        """``nnalign_train`` flags that train this teacher (defaults left out)."""
        flags = ["--anchor", self.anchor]
        if self.align_weight != DEFAULT_ALIGN_WEIGHTS[self.anchor_kind]:
            flags += ["--align-weight", repr(self.align_weight)]
        if not self.shared_encoder:
            flags.append("--separate-encoders")
        if self.latent_level is not None:
            flags += ["--latent-level", str(self.latent_level)]
        if self.modality_dropout != DEFAULT_MODALITY_DROPOUT[self.anchor_kind]:
            flags += ["--modality-dropout", repr(self.modality_dropout)]
        if self.subset_sampling != SUBSET_SAMPLINGS[0]:
            flags += ["--subset-sampling", self.subset_sampling]
        if not self.stop_gradient:
            flags.append("--no-stop-gradient")
        if self.align_distance != ALIGN_DISTANCES[0]:
            flags += ["--align-distance", self.align_distance]
        return flags

    @property
    def variant(self) -> str:
        """The non-default settings as the name writes them (``w0p5_sep``); empty for the standard teacher."""
        return "_".join(self.variant_tokens())

    def trainer_name(self) -> str:
        """``nnAlignTeacher_<anchor>[_<variant>]`` (``nnAlignOriginal[_<variant>]``); floats written exactly, ``.``
        as ``p`` and ``-`` as ``m``."""
        if self.is_original:
            head = [ORIGINAL_PREFIX]
        else:
            kind = self.anchor_kind
            head = [TEACHER_PREFIX, f"modality{self.anchor_modality}" if kind == "modality" else kind.replace("-", "")]
        name = "_".join(head + self.variant_tokens())
        if not _NAME_RE.fullmatch(name):
            raise NnalignError(f"cannot name a trainer for anchor {self.anchor!r}")
        return name

    @classmethod
    def parse(cls, name: str) -> "TeacherSpec":
        """Invert :meth:`trainer_name`; ValueError (one line) for a name it did not make."""
        parts = name.split("_")
        if parts[0] == ORIGINAL_PREFIX:
            anchor, tokens = "original", parts[1:]
        elif parts[0] == TEACHER_PREFIX and len(parts) > 1:
            token, tokens = parts[1], parts[2:]
            m = re.fullmatch(r"modality([A-Za-z0-9]+)", token)
            if m:
                anchor = f"modality:{m.group(1)}"
            elif token in _ANCHOR_TOKENS:
                anchor = _ANCHOR_TOKENS[token]
            else:
                raise ValueError(f"{name!r}: unknown anchor token {token!r}")
        else:
            raise ValueError(f"{name!r} is not an nnalign teacher trainer name")
        kwargs: dict = {"anchor": anchor, "modality_dropout": 0.0}  # no drop token: no dropout, whatever the default
        last = -1
        try:
            for token in tokens:
                if token == "sep":
                    key, kwargs["shared_encoder"] = "sep", False
                elif token == "nosg":
                    key, kwargs["stop_gradient"] = "nosg", False
                elif token == "rel":
                    key, kwargs["align_distance"] = "rel", "relative"
                elif token == "bal":
                    key, kwargs["subset_sampling"] = "bal", "balanced"
                elif re.fullmatch(r"lvl[0-9]+", token):
                    key, kwargs["latent_level"] = "lvl", int(token[3:])
                elif token.startswith("drop"):
                    key, kwargs["modality_dropout"] = "drop", _decode_float(token[4:])
                elif token.startswith("w"):
                    key, kwargs["align_weight"] = "w", _decode_float(token[1:])
                else:
                    raise ValueError(token)
                if _TEACHER_TOKEN_ORDER.index(key) <= last:
                    raise ValueError(token)
                last = _TEACHER_TOKEN_ORDER.index(key)
            spec = cls(**kwargs)
        except (ValueError, NnalignError) as e:
            raise ValueError(f"{name!r} is not an nnalign teacher trainer name ({e})") from None
        if spec.trainer_name() != name:  # e.g. a default written out ("w0p1"), or a non-canonical spelling
            raise ValueError(f"{name!r} is not canonical (the same settings are named {spec.trainer_name()!r})")
        return spec


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
    teacher: TeacherSpec
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
