"""Reporting (``nnalign_report``): the paper's tables and figures from a results folder.

``collect`` finds and classifies the trained models and gathers their metrics (light: no torch); ``tables`` builds
Tables I, III, IV and V as Markdown and CSV; ``figures`` draws the latent t-SNE, the slice overlays and the training
curves; ``report`` writes them all with ``report.md``.
"""
