"""Networks: the aligned multi-modal teacher and the subset student, both built from nnU-Net's plans."""
