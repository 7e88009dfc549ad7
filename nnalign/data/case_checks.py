"""Checks on the image files of one case, shared by the BraTS converter and nnalign_predict.

Each check reads only the NIfTI header (plus, for completeness and finite values, the raw bytes) and raises
:class:`NnalignError` with one line naming the case, the file and the problem. :func:`voxel_problem` serves files
that belong to no case too (``nnalign_evaluate``'s label maps).
"""
from __future__ import annotations

import errno
import gzip
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnalign.data.brats_layout import BratsCase
from nnalign.errors import NnalignError


def read_header(case_id: str, path: Path):
    """A SimpleITK ``ImageFileReader`` that has read ``path``'s header; one-line error if it cannot."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise NnalignError(f"{case_id}: {path.name}: not a readable NIfTI image") from None
    return reader


def image_geometry(reader) -> tuple:
    """(size, spacing, origin, direction) of a header reader (sizes and spacings in SimpleITK's x, y, z order)."""
    return (tuple(int(n) for n in reader.GetSize()), np.array(reader.GetSpacing()), np.array(reader.GetOrigin()),
            np.array(reader.GetDirection()))


#: NIfTI datatype codes of scalar voxels and their numpy types.
NIFTI_DATATYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                   1280: "u8"}


def header_scaling(reader) -> tuple[float, float] | None:
    """(scl_slope, scl_inter) that SimpleITK applies to the voxels of a header reader, or None when it applies none
    (a slope of 0, 1 with intercept 0, or not finite)."""
    try:
        slope, inter = float(reader.GetMetaData("scl_slope")), float(reader.GetMetaData("scl_inter"))
    except (RuntimeError, ValueError):
        return None
    inter = inter if np.isfinite(inter) else 0.0
    if not np.isfinite(slope) or slope == 0 or (slope == 1 and inter == 0):
        return None
    return slope, inter


def voxel_problem(path: Path, reader, blank: bool = False) -> str | None:
    """Why the voxel data of ``path`` cannot be used, or None: fewer bytes than its NIfTI header promises (a
    truncated or corrupt download), or NaN or infinite values as SimpleITK reads them, that is after the header's
    scale factor (``scl_slope`` 1e38 makes int16 voxels overflow float32). With ``blank``, also every voxel the same
    (an image without signal).

    SimpleITK reads missing voxels and NaNs as zeros, so the check is on the bytes: the (decompressed) file must reach
    ``vox_offset + voxels * bitpix / 8``, and the (scaled) voxels must be finite. Unscaled integer data in an
    uncompressed file is checked by its size alone, unless ``blank``.
    """
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        voxels = int(np.prod([int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]))
        offset = int(float(reader.GetMetaData("vox_offset")))
        needed = offset + voxels * int(reader.GetMetaData("bitpix")) // 8
        dtype = NIFTI_DATATYPES.get(int(reader.GetMetaData("datatype")))
    except (RuntimeError, ValueError):
        return None  # no NIfTI header fields to check against
    scaling = header_scaling(reader) if dtype is not None else None
    if dtype is not None and dtype[0] != "f" and scaling is None and not blank:
        dtype = None  # integers are finite: only the size to check
    gz = path.name.lower().endswith(".gz")
    if not gz and dtype is None:
        have = path.stat().st_size
        return f"truncated file ({have} of {needed} bytes)" if have < needed else None
    # SimpleITK scales into float32 (float64 data stays float64)
    scaled_type = (np.float64 if dtype == "f8" else np.float32) if scaling else None
    have, bad, carry, order, low, high = 0, 0, b"", "<", np.inf, -np.inf
    try:
        with (gzip.open if gz else open)(path, "rb") as f, np.errstate(over="ignore", invalid="ignore"):
            for chunk in iter(lambda: f.read(1 << 22), b""):
                if have == 0:  # sizeof_hdr, 348 (NIfTI-1) or 540 (NIfTI-2), tells the byte order
                    order = "<" if int.from_bytes(chunk[:4], "little") in (348, 540) else ">"
                start, have = have, have + len(chunk)
                if dtype is not None and max(offset, start) < min(needed, have):
                    data = carry + chunk[max(offset - start, 0): min(needed, have) - start]
                    whole = len(data) - len(data) % int(dtype[1])
                    values = np.frombuffer(data[:whole], order + dtype)
                    if scaling:
                        values = (values * scaling[0] + scaling[1]).astype(scaled_type)
                    finite = np.isfinite(values) if values.dtype.kind == "f" else None
                    if finite is not None:
                        bad += int(values.size - np.count_nonzero(finite))
                    if blank and values.size:
                        kept = values if finite is None else values[finite]
                        if kept.size:
                            low, high = min(low, float(kept.min())), max(high, float(kept.max()))
                    carry = data[whole:]
    except (OSError, EOFError, zlib.error):
        return "truncated or corrupt gzip data"
    if have < needed:
        return f"truncated file ({have} of {needed} bytes)"
    if bad:
        scaled = f" after the header's scaling (scl_slope {scaling[0]:g}, scl_inter {scaling[1]:g})" if scaling else ""
        return f"{bad} NaN or infinite voxel{'s' if bad != 1 else ''}{scaled}"
    if blank and low == high:
        return f"no signal (every voxel is {low:g})"
    return None


def check_written(path: Path) -> None:
    """Raise OSError unless ``path``, just written by SimpleITK, is a whole image: its NIfTI writer does not report
    a full disk, and leaves a truncated file."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise OSError(errno.EIO, "the image written cannot be read back: is the disk full?", str(path)) from None
    problem = voxel_problem(path, reader)
    if problem:
        raise OSError(errno.EIO, f"the image written is incomplete, {problem}: is the disk full?", str(path))


def check_voxels(case_id: str, path: Path, reader, blank: bool = False) -> None:
    """Raise if ``path`` is truncated, corrupt, or holds NaN or infinite voxels (with ``blank``: or has no signal,
    every voxel the same) (:func:`voxel_problem`)."""
    reason = voxel_problem(path, reader, blank)
    if reason:
        raise NnalignError(f"{case_id}: {path.name}: {reason}")


def _fmt(what: str, value) -> tuple:
    if what == "shape":
        return tuple(int(v) for v in value)
    return tuple(np.round(np.asarray(value, dtype=float), 4).tolist())


def geometry_difference(a: tuple, b: tuple) -> tuple[str, tuple, tuple] | None:
    """(property, a's value, b's value) of the first of shape, spacing, origin, direction in which two
    :func:`image_geometry` differ, or None if they agree."""
    checks = (("shape", a[0] == b[0]), ("spacing", np.allclose(a[1], b[1])),
              ("origin", np.allclose(a[2], b[2], atol=1e-3)), ("direction", np.allclose(a[3], b[3], atol=1e-4)))
    index = {"shape": 0, "spacing": 1, "origin": 2, "direction": 3}
    for what, same in checks:
        if not same:
            return what, _fmt(what, a[index[what]]), _fmt(what, b[index[what]])
    return None


def geometry_groups(files: Mapping[str, object], readers: Mapping) -> tuple[dict, list[list[str]]]:
    """(:func:`image_geometry` of each file, the files grouped by equal geometry in the order first seen)."""
    geometries = {k: image_geometry(readers[k]) for k in files}
    groups: list[list[str]] = []
    for k in files:
        group = next((g for g in groups if geometry_difference(geometries[g[0]], geometries[k]) is None), None)
        if group is None:
            groups.append([k])
        else:
            group.append(k)
    return geometries, groups


def check_same_geometry(case_id: str, files: Mapping[str, Path], readers: Mapping) -> None:
    """Raise unless every file of a case has one geometry (:func:`image_geometry`).

    The files are grouped by geometry; the message names a file outside the largest group when there is one, or
    two files that disagree when no group is larger than the others (two files, or two against two).
    """
    geometries, groups = geometry_groups(files, readers)
    if len(groups) == 1:
        return
    groups.sort(key=len, reverse=True)
    first, second = groups[0], groups[1]
    if len(first) > len(second):
        odd = next(k for k in files if k not in first)
        what, expected, got = geometry_difference(geometries[first[0]], geometries[odd])
        others = ", ".join(files[k].name for k in first)
        raise NnalignError(f"{case_id}: {files[odd].name}: {what} {got} differs from {expected} of the other "
                           f"files ({others})")
    a, b = first[0], second[0]
    what, value_a, value_b = geometry_difference(geometries[a], geometries[b])
    raise NnalignError(f"{case_id}: {files[a].name} and {files[b].name} differ in {what}: {value_a} vs {value_b} "
                       f"(no majority among the case's files says which is right)")


def check_case_images(case: BratsCase, modalities: Sequence[str], seg: bool = False,
                      require_signal: bool = False, one_geometry: bool = True) -> Mapping:
    """Check the images of ``modalities`` of a case (and, with ``seg``, its segmentation) and return their header
    readers by modality (and ``"seg"``).

    Every file must be a readable, complete 3D scalar image without NaN or infinite voxels (after the header's scale
    factor), and with ``one_geometry`` all must share one geometry (without it the caller brings them onto one grid,
    :mod:`nnalign.data.sequence_grid`); with ``require_signal`` no modality may have every voxel the same.
    Raises NnalignError naming the case and the bad file.
    """
    files = {m: case.images[m] for m in modalities}
    if seg and case.seg is not None:
        files["seg"] = case.seg
    readers = {k: read_header(case.case_id, path) for k, path in files.items()}
    for k, path in files.items():
        size = tuple(int(n) for n in readers[k].GetSize())
        components = readers[k].GetNumberOfComponents()
        if len(size) != 3 or components != 1:
            got = f"{len(size)}D image ({' x '.join(map(str, size))})" if len(size) != 3 else \
                f"image of {components} components per voxel"
            raise NnalignError(f"{case.case_id}: {path.name}: expected a 3D scalar image, got a {got}")
    if one_geometry:
        check_same_geometry(case.case_id, files, readers)
    for k, path in files.items():
        check_voxels(case.case_id, path, readers[k], blank=require_signal and k != "seg")
    return readers
