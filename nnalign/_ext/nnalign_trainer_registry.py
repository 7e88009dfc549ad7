"""nnalign's trainers for nnU-Net's ``nnUNet_extTrainer`` discovery (the only module in this folder).

``nnalign.paths.setup_env`` puts this folder on ``nnUNet_extTrainer``. nnU-Net then imports this module by its bare
name and asks it for a trainer by name (``--c``, ``--val``, DDP ranks, ``nnUNetPredictor``). Teacher names such as
``nnAlignTeacher_modalityT1ce_w0p5`` and student names such as ``nnAlignStudent_T1ce_protokd_Teacher-mixture`` are
read by :func:`nnalign.runs.parse_trainer_name` and their classes synthesised on demand (PEP 562) by
:func:`nnalign.training.teacher_trainer.teacher_trainer_class` and
:func:`nnalign.training.student_trainer.student_trainer_class`, which cache them, so a name always gives the same
class even though nnU-Net drops this module from ``sys.modules`` after each lookup.
"""
from nnalign.runs import StudentSpec, parse_trainer_name
from nnalign.training.student_trainer import nnAlignStudentTrainer, student_trainer_class
from nnalign.training.teacher_trainer import nnAlignTeacherTrainer, teacher_trainer_class

__all__ = ["nnAlignTeacherTrainer", "nnAlignStudentTrainer"]


def __getattr__(name: str):
    try:
        spec = parse_trainer_name(name)
    except ValueError:
        spec = None
    if spec is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return student_trainer_class(spec) if isinstance(spec, StudentSpec) else teacher_trainer_class(spec)
