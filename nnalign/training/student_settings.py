"""Student settings and the trainer class name that encodes them.

A student's output folder must say which modality subset it sees, which distillation method it used and which teacher
it learned from, so that a whole grid of students lives side by side::

    nnAlignStudent_T1ce_protokd_Teacher-mixture                  T1ce student, ProtoKD, from the P* teacher
    nnAlignStudent_T1-T2_none_Teacher-mixture                    T1+T2 subset baseline (no distillation)
    nnAlignStudent_FLAIR_kdnet_Teacher-modalityT1ce-w0p5_tf1_x1a2b3c4d
                                                                 teacher fold 1, non-default loss settings (hashed)

The teacher part is the teacher's trainer name without ``nnAlign`` and with ``-`` for ``_``; the teacher's plans and
configuration are the student's own, so the name locates the teacher folder. Loss weights and temperatures that
differ from the method's defaults are hashed into ``x<8 hex>`` and written out in full in the run's settings record.
Only the subset matters for the network, so the predictor rebuilds a student from its name alone.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES, parse_modalities, subset_tag

STUDENT_PREFIX = "nnAlignStudent"
_TEACHER_NAME_PREFIX = "nnAlign"


def _teacher_token(teacher_trainer: str) -> str:
    if not teacher_trainer.startswith(_TEACHER_NAME_PREFIX):
        raise NnalignError(f"'{teacher_trainer}' is not an nnalign teacher (its trainer name starts with nnAlign)")
    return teacher_trainer[len(_TEACHER_NAME_PREFIX):].replace("_", "-")


def overrides_hash(overrides: dict) -> str:
    """Eight hex digits identifying a set of loss-setting overrides (order-independent)."""
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class StudentSettings:
    """How a student is distilled: its modalities, the KD method, the teacher and the loss-setting overrides.

    ``teacher_fold`` None means the student's own fold.
    """

    modalities: tuple[str, ...]
    kd: str
    teacher_trainer: str
    teacher_fold: str | None = None
    overrides: dict = field(default_factory=dict)

    def trainer_name(self) -> str:
        """``nnAlignStudent_<subset>_<kd>_<teacher>[_tf<F>][_x<hash>]``."""
        parts = [STUDENT_PREFIX, subset_tag(self.modalities), self.kd, _teacher_token(self.teacher_trainer)]
        if self.teacher_fold is not None:
            parts.append(f"tf{self.teacher_fold}")
        if self.overrides:
            parts.append(f"x{overrides_hash(self.overrides)}")
        return "_".join(parts)

    @staticmethod
    def subset_from_trainer_name(name: str) -> tuple[str, ...]:
        """The modality subset a student trainer name encodes; ValueError for other names."""
        parts = name.split("_")
        if len(parts) < 4 or parts[0] != STUDENT_PREFIX:
            raise ValueError(f"{name!r} is not an nnalign student trainer name")
        try:
            subset = parse_modalities(parts[1].split("-"), BRATS_MODALITIES)
        except NnalignError as e:
            raise ValueError(f"{name!r}: {e}") from None
        if subset_tag(subset) != parts[1]:
            raise ValueError(f"{name!r}: subset {parts[1]!r} is not in channel order")
        return subset

    @staticmethod
    def teacher_from_trainer_name(name: str) -> tuple[str, str | None]:
        """(teacher trainer name, teacher fold or None) a student trainer name encodes."""
        parts = name.split("_")
        if len(parts) < 4 or parts[0] != STUDENT_PREFIX:
            raise ValueError(f"{name!r} is not an nnalign student trainer name")
        fold = next((p[2:] for p in parts[4:] if re.fullmatch(r"tf(\d+|all)", p)), None)
        return _TEACHER_NAME_PREFIX + parts[3].replace("-", "_"), fold


def is_student_trainer_name(name: str) -> bool:
    """Whether ``name`` is a student trainer name."""
    try:
        StudentSettings.subset_from_trainer_name(name)
    except ValueError:
        return False
    return True
