"""Training: nnU-Net's own loop wired to nnalign's networks and losses (teacher now, students later).

``settings`` (light) holds the teacher settings and the trainer names that encode them; ``teacher_trainer`` (imports
nnU-Net's trainer, slow) holds the trainer. nnU-Net finds the trainers by name through ``nnalign/_ext``.
"""
