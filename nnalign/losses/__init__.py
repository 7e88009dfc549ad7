"""Losses: the teacher's anchor alignment (``anchors``) and the student's knowledge distillation (``kd``)."""
