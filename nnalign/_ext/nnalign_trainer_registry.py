"""nnalign's trainers for nnU-Net's ``nnUNet_extTrainer`` discovery (the only module in this folder).

``nnalign.paths.setup_env`` puts this folder on ``nnUNet_extTrainer``. nnU-Net then imports this module by its bare
name and asks it for a trainer by name (``--c``, ``--val``, DDP ranks, ``nnUNetPredictor``). Teacher names such as
``nnAlignTeacher_modalityT1ce_w0p5`` are synthesised on demand (PEP 562) by
:func:`nnalign.training.teacher_trainer.teacher_trainer_class`, which caches them, so a name always gives the same
class even though nnU-Net drops this module from ``sys.modules`` after each lookup.
"""
from nnalign.training.teacher_trainer import nnAlignTeacherTrainer, teacher_trainer_class

__all__ = ["nnAlignTeacherTrainer"]


def __getattr__(name: str):
    try:
        return teacher_trainer_class(name)
    except ValueError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
