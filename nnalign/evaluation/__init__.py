"""Evaluation: per-case Dice and HD95 on WT, TC and ET with the BraTS conventions (``nnalign_evaluate``)."""
