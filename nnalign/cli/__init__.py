"""Console entry points. Each parses its arguments before importing torch or nnunetv2, so ``--help`` is instant."""
