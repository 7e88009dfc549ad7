"""nnalign: self-configuring missing-modality brain tumour segmentation on nnU-Net v2.

Importing the package is cheap: torch and nnunetv2 are imported only by the modules that need them, and
``nnalign.Segmenter`` (``nnalign.inference.predict.Segmenter``) only when it is first used.
"""
__version__ = "0.2.0"
__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str):
    if name == "Segmenter":
        from nnalign.inference.predict import Segmenter

        return Segmenter
    raise AttributeError(f"module 'nnalign' has no attribute {name!r}")
