"""nnalign: self-configuring missing-modality brain tumour segmentation on nnU-Net v2.

Importing the package is cheap: torch and nnunetv2 are imported only by the modules that need them.
"""
__version__ = "0.2.0"
