"""Teacher settings and the trainer class name that encodes them.

nnU-Net names a run's output folder after the trainer class (``{Trainer}__{plans}__{configuration}/fold_{f}``) and
finds the trainer again by that name (``--c``, ``--val``, DDP ranks, the predictor). So every setting that changes
the trained model is encoded in the class name, and the name alone rebuilds the settings
(:meth:`TeacherSettings.from_trainer_name`)::

    nnAlignTeacher_mixture                              anchor mixture, every other setting at its default
    nnAlignTeacher_modalityT1ce_w0p5_sep_drop0p3_nosg   modality anchor on T1ce, lambda 0.5, one encoder per modality,
                                                        modality dropout 0.3, no stop-gradient on the anchor
    nnAlignTeacher_normal_lvl2                          N(0, 1) anchor, latents at U-Net stage 2 (not the plans' level)
    nnAlignOriginal_drop0p25                            plain nnU-Net on all stacked modalities, dropout 0.25

Training length (``epochs``, ``iters_per_epoch``) is *not* in the name: a longer run continues the same folder
(``--c --epochs N``). It is passed to the trainer through :data:`ENV_EPOCHS` / :data:`ENV_ITERS` (inherited by DDP
ranks) and written into the run's settings record.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace

from nnalign.errors import NnalignError
from nnalign.modalities import canonical_modality

ANCHORS: tuple[str, ...] = ("none", "normal", "modality", "mixture", "original")
"""Anchor kinds; ``modality`` takes ``:NAME``; ``original`` is plain nnU-Net on the stacked modalities."""
DEFAULT_ALIGN_WEIGHTS: dict[str, float] = {"none": 0.0, "normal": 0.1, "modality": 0.1, "mixture": 0.1, "original": 0.0}
"""lambda per anchor kind when none is given (documentation/training.md, "Alignment weights", says how they were
chosen); the anchors without an alignment loss have 0."""
DEFAULT_ANCHOR_MODALITY = "T1ce"
TEACHER_PREFIX = "nnAlignTeacher"
ORIGINAL_PREFIX = "nnAlignOriginal"
ENV_EPOCHS = "NNALIGN_EPOCHS"
ENV_ITERS = "NNALIGN_ITERS_PER_EPOCH"

_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_MODALITY_TOKEN_RE = re.compile(r"modality([A-Za-z0-9]+)")


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


def _canonical_anchor(anchor: str) -> str:
    kind, sep, arg = str(anchor).strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind not in ANCHORS:
        raise NnalignError(f"unknown anchor {anchor!r} (choose from none, normal, modality:NAME, mixture, original)")
    if kind != "modality":
        if sep:
            raise NnalignError(f"anchor {anchor!r}: '{kind}' takes no ':' argument")
        return kind
    if sep and not arg:
        raise NnalignError(f"anchor {anchor!r} names no modality: use modality:NAME, e.g. modality:T1ce")
    try:
        name = canonical_modality(arg) if arg else DEFAULT_ANCHOR_MODALITY
    except NnalignError as e:
        raise NnalignError(f"anchor {anchor!r}: {e}") from None
    return f"modality:{name}"


@dataclass(frozen=True)
class TeacherSettings:
    """How a teacher (or the ``original`` nnU-Net baseline) is trained.

    - ``anchor``: ``none | normal | modality:NAME | mixture | original`` (``modality`` alone means ``modality:T1ce``;
      modality spellings are made canonical, ``modality:t1c`` -> ``modality:T1ce``).
    - ``align_weight``: lambda, the weight of the anchor loss added to nnU-Net's segmentation loss; None (the default)
      means the anchor's own default (:data:`DEFAULT_ALIGN_WEIGHTS`).
    - ``shared_encoder``: one latent encoder for all modalities (True) or one per modality.
    - ``modality_dropout``: each modality of each training sample is dropped with this probability (never all).
    - ``stop_gradient``: detach the anchor modality in its loss (``modality:NAME`` only).
    - ``latent_level``: the U-Net stage at which the latents Z_j are taken; None means the plans' ``latent_level``.
    - ``epochs`` / ``iters_per_epoch``: override nnU-Net's 1000 x 250 (not part of the trainer name).
    """

    anchor: str = "mixture"
    align_weight: float | None = None
    shared_encoder: bool = True
    modality_dropout: float = 0.0
    stop_gradient: bool = True
    latent_level: int | None = None
    epochs: int | None = None
    iters_per_epoch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor", _canonical_anchor(self.anchor))
        kind = self.anchor_kind
        if self.align_weight is not None and float(self.align_weight) != 0 and kind in ("none", "original"):
            raise NnalignError(f"anchor '{kind}' has no alignment loss, so an alignment weight has no effect")
        weight = DEFAULT_ALIGN_WEIGHTS[kind] if self.align_weight is None else self.align_weight
        object.__setattr__(self, "align_weight", float(weight))
        object.__setattr__(self, "modality_dropout", float(self.modality_dropout))
        if not math.isfinite(self.align_weight) or self.align_weight < 0:
            raise NnalignError(f"the alignment weight must be a finite number >= 0, got {self.align_weight}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise NnalignError(f"the modality dropout must be in [0, 1), got {self.modality_dropout}")
        for name in ("epochs", "iters_per_epoch"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or int(value) < 1):
                raise NnalignError(f"{name.replace('_', ' ')} must be a positive integer, got {value}")
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

    # ------------------------------------------------------------------------------------------------------------------

    @property
    def anchor_kind(self) -> str:
        """``none``, ``normal``, ``modality``, ``mixture`` or ``original``."""
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
        """The settings that change the trained model (everything but the training length)."""
        return {"anchor": self.anchor, "align_weight": self.align_weight, "shared_encoder": self.shared_encoder,
                "latent_level": self.latent_level, "modality_dropout": self.modality_dropout,
                "stop_gradient": self.stop_gradient}

    def latent_level_for(self, arch_kwargs: dict) -> int:
        """The latent level a network of these settings has: this run's, else the plans' (``arch_kwargs``), else 0."""
        return self.latent_level if self.latent_level is not None else int(arch_kwargs.get("latent_level", 0))

    def as_dict(self) -> dict:
        return asdict(self)

    def with_length(self, epochs: int | None, iters_per_epoch: int | None) -> "TeacherSettings":
        return replace(self, epochs=epochs, iters_per_epoch=iters_per_epoch)

    @classmethod
    def length_from_env(cls, environ=os.environ) -> tuple[int | None, int | None]:
        """(epochs, iters_per_epoch) set by ``nnalign_train`` for the trainer (None where unset)."""
        def read(var: str) -> int | None:
            value = environ.get(var, "").strip()
            return int(value) if value else None
        return read(ENV_EPOCHS), read(ENV_ITERS)

    # ------------------------------------------------------------------------------------------------------------------

    def trainer_name(self) -> str:
        """The trainer class name: a prefix, the anchor, then one token per non-default model setting.

        Tokens, in this order: ``w<lambda>`` (not the anchor's default), ``sep`` (one encoder per modality),
        ``lvl<L>`` (a latent level other than the plans'), ``drop<p>`` (not 0), ``nosg`` (no stop-gradient). Floats
        are written exactly, ``.`` as ``p`` and ``-`` as ``m``.
        """
        if self.is_original:
            parts = [ORIGINAL_PREFIX]
        else:
            kind = self.anchor_kind
            parts = [TEACHER_PREFIX, f"modality{self.anchor_modality}" if kind == "modality" else kind]
        default = TeacherSettings()
        if self.align_weight != DEFAULT_ALIGN_WEIGHTS[self.anchor_kind]:
            parts.append(f"w{_encode_float(self.align_weight)}")
        if not self.shared_encoder:
            parts.append("sep")
        if self.latent_level is not None:
            parts.append(f"lvl{self.latent_level}")
        if self.modality_dropout != default.modality_dropout:
            parts.append(f"drop{_encode_float(self.modality_dropout)}")
        if not self.stop_gradient:
            parts.append("nosg")
        name = "_".join(parts)
        if not _NAME_RE.fullmatch(name):
            raise NnalignError(f"cannot name a trainer for anchor {self.anchor!r}")
        return name

    @classmethod
    def from_trainer_name(cls, name: str) -> "TeacherSettings":
        """Invert :meth:`trainer_name` (training length left unset); ValueError for a name it did not make."""
        parts = name.split("_")
        if parts[0] == ORIGINAL_PREFIX:
            anchor, tokens = "original", parts[1:]
        elif parts[0] == TEACHER_PREFIX and len(parts) > 1:
            token, tokens = parts[1], parts[2:]
            m = _MODALITY_TOKEN_RE.fullmatch(token)
            if m:
                anchor = f"modality:{m.group(1)}"
            elif token in ("none", "normal", "mixture"):
                anchor = token
            else:
                raise ValueError(f"{name!r}: unknown anchor token {token!r}")
        else:
            raise ValueError(f"{name!r} is not an nnalign teacher trainer name")
        kwargs: dict = {"anchor": anchor}
        order = ("w", "sep", "lvl", "drop", "nosg")
        last = -1
        try:
            for token in tokens:
                if token == "sep":
                    key, kwargs["shared_encoder"] = "sep", False
                elif token == "nosg":
                    key, kwargs["stop_gradient"] = "nosg", False
                elif re.fullmatch(r"lvl[0-9]+", token):
                    key, kwargs["latent_level"] = "lvl", int(token[3:])
                elif token.startswith("drop"):
                    key, kwargs["modality_dropout"] = "drop", _decode_float(token[4:])
                elif token.startswith("w"):
                    key, kwargs["align_weight"] = "w", _decode_float(token[1:])
                else:
                    raise ValueError(token)
                if order.index(key) <= last:
                    raise ValueError(token)
                last = order.index(key)
            settings = cls(**kwargs)
        except (ValueError, NnalignError) as e:
            raise ValueError(f"{name!r} is not an nnalign teacher trainer name ({e})") from None
        if settings.trainer_name() != name:  # e.g. a default written out ("w0p1"), or a non-canonical spelling
            raise ValueError(f"{name!r} is not canonical (the same settings are named {settings.trainer_name()!r})")
        return settings


def is_teacher_trainer_name(name: str) -> bool:
    """Whether ``name`` is a trainer name :meth:`TeacherSettings.trainer_name` makes."""
    try:
        TeacherSettings.from_trainer_name(name)
    except ValueError:
        return False
    return True

