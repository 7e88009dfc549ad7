"""Evaluation: per-case Dice and HD95 on WT, TC, ET (and RC) with the BraTS conventions (``nnalign_evaluate``), and
the official package's lesion-wise scores (``--lesionwise``)."""
