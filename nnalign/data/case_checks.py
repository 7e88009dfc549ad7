"""Checks on the image files of one case, shared by the BraTS converter and nnalign_predict.

Each check reads only the NIfTI header (plus, for completeness, the raw bytes) and raises :class:`NnalignError` with
one line naming the case, the file and the problem.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnalign.data.brats_layout import BratsCase
from nnalign.errors import NnalignError


def read_header(case: BratsCase, path: Path):
    """A SimpleITK ``ImageFileReader`` that has read ``path``'s header; one-line error if it cannot."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise NnalignError(f"{case.case_id}: {path.name}: not a readable NIfTI image") from None
    return reader


def image_geometry(reader) -> tuple:
    """(size, spacing, origin, direction) of a header reader (sizes and spacings in SimpleITK's x, y, z order)."""
    return (tuple(reader.GetSize()), np.array(reader.GetSpacing()), np.array(reader.GetOrigin()),
            np.array(reader.GetDirection()))


def check_complete(case: BratsCase, path: Path, reader) -> None:
    """Raise if ``path`` holds fewer bytes than its NIfTI header promises (a truncated or corrupt download).

    SimpleITK reads such a file without complaint and returns the missing voxels as zeros, so the check is on the
    bytes: the (decompressed) file must reach ``vox_offset + voxels * bitpix / 8``.
    """
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        voxels = int(np.prod([int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]))
        needed = int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError):
        return  # no NIfTI header fields to check against
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                have = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 22), b""))
        except (OSError, EOFError, zlib.error):
            raise NnalignError(f"{case.case_id}: {path.name}: truncated or corrupt gzip data") from None
    else:
        have = path.stat().st_size
    if have < needed:
        raise NnalignError(f"{case.case_id}: {path.name}: truncated file ({have} of {needed} bytes)")


def check_geometry(case: BratsCase, reference_name: str, reference: tuple, path: Path, reader) -> None:
    """Raise unless ``path`` has the shape, spacing, origin and direction of ``reference`` (an
    :func:`image_geometry`)."""
    size, spacing, origin, direction = image_geometry(reader)
    checks = (("shape", reference[0] == size, reference[0], size),
              ("spacing", np.allclose(reference[1], spacing), reference[1], spacing),
              ("origin", np.allclose(reference[2], origin, atol=1e-3), reference[2], origin),
              ("direction", np.allclose(reference[3], direction, atol=1e-4), reference[3], direction))
    for what, ok, ref, got in checks:
        if not ok:
            fmt = (lambda v: tuple(np.round(np.asarray(v, dtype=float), 4).tolist()))
            raise NnalignError(f"{case.case_id}: {path.name}: {what} {fmt(got)} differs from "
                               f"{reference_name} {fmt(ref)}")


def check_case_images(case: BratsCase, modalities: Sequence[str], reference_name: str | None = None) -> Mapping:
    """Check the images of ``modalities`` of a case and return their header readers by modality.

    Every file must be a readable, complete 3D scalar image with the geometry of ``reference_name`` (default: the
    last of ``modalities``). Raises NnalignError naming the case and the first bad file.
    """
    readers = {m: read_header(case, case.images[m]) for m in modalities}
    reference_name = reference_name or modalities[-1]
    reference = image_geometry(readers[reference_name])
    for m in modalities:
        check_geometry(case, reference_name, reference, case.images[m], readers[m])
        if readers[m].GetNumberOfComponents() != 1 or len(reference[0]) != 3:
            raise NnalignError(f"{case.case_id}: {case.images[m].name}: expected a 3D scalar image")
        check_complete(case, case.images[m], readers[m])
    return readers
