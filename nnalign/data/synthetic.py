"""Synthetic BraTS-like cases: the embedded default dataset for the demo and the tests.

A case is a skull-stripped brain, like BraTS after preprocessing: a perturbed ellipsoid of white matter, grey matter
(a folded cortical rim and deep nuclei) and CSF (subarachnoid rim, sulci, interhemispheric fissure, ventricles), with
one or two gliomas. A glioma is a necrotic core (label 2) inside an enhancing rim (label 3) inside vasogenic edema
(label 1) that spreads through white matter and spares the cortex. About one glioma in ten is solid enhancing (no
necrosis) and one in ten is non-enhancing (its whole core is label 2, so the case may have no ET), as in BraTS.

Each tissue has a relative signal per modality chosen after MRI physics (:data:`CONTRAST`), so that every modality
carries different information: edema is bright in FLAIR and T2, enhancing tumour is bright only in T1ce, necrosis is
dark in T1/T1ce and bright in T2, CSF is dark in FLAIR and T1 and bright in T2, and white matter is brighter than grey
matter in T1/T1ce and darker in T2/FLAIR. T1 alone therefore finds ET hard, T1ce is the best single modality for ET
and FLAIR the best for WT. Partial volume (a small blur), per-case tumour contrast jitter, a smooth multiplicative
bias field per modality, Rician noise and a random per-case intensity scale per modality make the intensities
scanner-like; everything outside the brain is exactly 0.

Arrays are in numpy (z, y, x) order as SimpleITK's ``GetArrayFromImage`` uses (x left-right, y posterior-anterior,
z inferior-superior); shapes are given as (X, Y, Z) like the CLI and SimpleITK. A case is a pure function of its
seed; a dataset derives case ``i``'s seed from ``(seed, i)`` (:func:`case_seed`), so adding cases never changes the
earlier ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from nnalign.data.raw_dataset import build_dataset_folder, image_filename, write_dataset_json
from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES
from nnalign.paths import dataset_name

GENERATOR_VERSION = 1
GLIOMA_KINDS: tuple[str, ...] = ("ring", "solid", "non-enhancing")
"""The kinds of glioma, drawn with probabilities :data:`GLIOMA_KIND_SHARES`: a necrotic core in an enhancing rim,
solid enhancing, and non-enhancing (the whole core label 2, no ET)."""
GLIOMA_KIND_SHARES: tuple[float, ...] = (0.8, 0.1, 0.1)
MIN_SIZE = 32
DEFAULT_SHAPE = (96, 96, 96)

# Tissue codes of SyntheticCase.tissue.
TISSUES: tuple[str, ...] = ("background", "csf", "grey matter", "white matter", "edema", "necrosis",
                            "enhancing tumour", "non-enhancing tumour")
BG, CSF, GM, WM, EDEMA, NECROSIS, ENHANCING, NON_ENHANCING = range(len(TISSUES))

# Relative signal of each tissue per modality, in BRATS_MODALITIES order (T1, T1ce, T2, FLAIR).
CONTRAST: dict[str, tuple[float, float, float, float]] = {
    "background": (0.0, 0.0, 0.0, 0.0),
    "csf": (0.30, 0.30, 1.60, 0.25),
    "grey matter": (0.72, 0.72, 0.80, 0.82),
    "white matter": (1.00, 1.00, 0.55, 0.60),
    "edema": (0.76, 0.78, 1.20, 1.45),
    "necrosis": (0.35, 0.38, 1.45, 0.90),
    "enhancing tumour": (0.70, 1.60, 1.05, 1.30),
    "non-enhancing tumour": (0.55, 0.58, 1.25, 1.20),
}
# nnU-Net label of each tissue (CSF, GM and WM are background).
TISSUE_LABEL = np.array([0, 0, 0, 0, 1, 2, 3, 2], dtype=np.uint8)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class SyntheticCase:
    """One generated case: ``images`` by modality name (float32), nnU-Net ``seg`` (uint8) and the ``tissue`` map
    (uint8 codes indexing :data:`TISSUES`), all of one (z, y, x) shape."""

    images: dict[str, np.ndarray]
    seg: np.ndarray
    tissue: np.ndarray


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as three ints (X, Y, Z); raises NnalignError unless each is at least :data:`MIN_SIZE`."""
    try:
        size = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise NnalignError(f"shape {shape!r} is not three integers") from None
    if len(size) != 3 or any(s < MIN_SIZE for s in size):
        raise NnalignError(f"shape {size} must be three sizes of at least {MIN_SIZE} voxels (X Y Z)")
    return size  # type: ignore[return-value]


def check_glioma_kinds(kinds: Sequence[str]) -> None:
    """One-line NnalignError unless ``kinds`` is a non-empty selection of :data:`GLIOMA_KINDS`."""
    unknown = [k for k in kinds if k not in GLIOMA_KINDS]
    if unknown or not kinds:
        problem = f"unknown glioma kind {unknown[0]!r}" if unknown else "no glioma kind given"
        raise NnalignError(f"{problem} (kinds: {', '.join(GLIOMA_KINDS)})")


@dataclass(frozen=True)
class CaseOptions:
    """What generated cases look like beyond their shape and seed; the defaults give the standard cases.

    - ``tumour_modalities``: only these show the tumour, the others see white matter there (a known answer for
      experiments on which modality matters);
    - ``min_rim_mm`` > 0 thickens the enhancing rims of ring tumours to about that many millimetres (voxels), so that
      ET survives coarse resampling;
    - ``glioma_kinds`` restricts the kinds of glioma (:data:`GLIOMA_KINDS`); a case is otherwise the same.
    """

    tumour_modalities: tuple[str, ...] = BRATS_MODALITIES
    min_rim_mm: float = 0.0
    glioma_kinds: tuple[str, ...] = GLIOMA_KINDS

    def __post_init__(self) -> None:
        check_glioma_kinds(self.glioma_kinds)
        object.__setattr__(self, "tumour_modalities", tuple(self.tumour_modalities))
        object.__setattr__(self, "min_rim_mm", float(self.min_rim_mm))
        object.__setattr__(self, "glioma_kinds", tuple(self.glioma_kinds))

    def record(self) -> dict:
        """The options as dataset.json records them (modalities and kinds in their canonical order)."""
        return {"tumour_modalities": [m for m in BRATS_MODALITIES if m in self.tumour_modalities],
                "min_rim_mm": self.min_rim_mm,
                "glioma_kinds": [k for k in GLIOMA_KINDS if k in self.glioma_kinds]}


def case_seed(seed: int, index: int, held_out: bool = False) -> int:
    """The generator seed of training case ``index`` (or held-out case ``index``) of a dataset made with ``seed``."""
    entropy = [int(seed), int(index)] + ([1] if held_out else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


# ----------------------------------------------------------------------------------------------------------------------
# smooth random fields


def _interp_matrix(n: int, nodes: int) -> np.ndarray:
    """(n, nodes) weights that interpolate ``nodes`` lattice values smoothly onto ``n`` points (normalised
    Gaussians)."""
    t = np.linspace(0.0, nodes - 1.0, n)[:, None]
    w = np.exp(-0.5 * ((t - np.arange(nodes)[None, :]) / 0.7) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], wavelength: float) -> np.ndarray:
    """A smooth random field of ``shape`` with zero mean, unit std and features about ``wavelength`` voxels wide.

    A coarse Gaussian lattice is interpolated separably (one small contraction per axis), so the cost is that of a
    few passes over the volume and the shape is exact.
    """
    nz, ny, nx = shape
    kz, ky, kx = (max(2, int(round(n / wavelength)) + 2) for n in shape)
    field = rng.standard_normal((kz, ky, kx)).astype(np.float32)
    # einsum without optimisation stays off BLAS, whose threads only contend on these thin products.
    field = np.einsum("ijk,ck->ijc", field, _interp_matrix(nx, kx))
    field = np.einsum("ijc,bj->ibc", field, _interp_matrix(ny, ky))
    field = np.einsum("ibc,ai->abc", field, _interp_matrix(nz, kz))
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


# ----------------------------------------------------------------------------------------------------------------------
# anatomy


def _ellipsoid(grid, centre, semi_axes) -> np.ndarray:
    """Squared normalised radius of an axis-aligned ellipsoid (z, y, x) on open grids."""
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi_axes))


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int]):
    """Tissue map of a healthy brain, its mask, its centre and semi-axes (z, y, x) in voxels."""
    nz, ny, nx = shape
    grid = np.ogrid[:nz, :ny, :nx]
    grid = [g.astype(np.float32) for g in grid]
    centre = np.array(shape, dtype=np.float32) / 2 - 0.5 + rng.uniform(-0.03, 0.03, 3) * np.array(shape)
    axes = np.array([0.43 * nz, 0.46 * ny, 0.40 * nx]) * rng.uniform(0.92, 1.0, 3)
    radius = float(np.mean(axes))
    z, y, x = (g - c for g, c in zip(grid, centre))

    # Brain: an ellipsoid, flatter underneath, with a bumpy surface; depth below the surface in voxels.
    zn = np.where(z < 0, z * 1.15, z) / axes[0]
    r = np.sqrt(zn ** 2 + (y / axes[1]) ** 2 + (x / axes[2]) ** 2)
    surface = 1.0 + 0.04 * _smooth_field(rng, shape, radius / 2.5)
    depth = (surface - r) * radius
    brain = depth > 0

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[brain] = WM
    scale = radius / 40.0  # anatomy sizes below are for a brain of 40 voxels mean radius (about 1 mm voxels)

    # Interhemispheric fissure: a wavy midline cleft down to the arch of the corpus callosum, through at the poles.
    # Its walls are pial surface like the outside, so depth below the pial surface takes the nearer of the two.
    midline = np.abs(x - 0.03 * radius * _smooth_field(rng, (1, ny, 1), radius / 2)[0, :, 0][None, :, None])
    cleft = (y / (0.62 * axes[1])) ** 2 + ((z + 0.1 * axes[0]) / (0.42 * axes[0])) ** 2 > 1
    depth = np.where(cleft, np.minimum(depth, midline), depth)
    # Cortex: a grey rim of varying thickness, folded along sulci (zero sets of a random field).
    thickness = scale * (3.6 + 1.0 * _smooth_field(rng, shape, radius / 3))
    sulcal = np.abs(_smooth_field(rng, shape, radius / 5.5))
    cortex = brain & ((depth < thickness) | ((sulcal < 0.45) & (depth < 2.6 * thickness)))
    # Deep grey matter: thalami and basal ganglia (lentiform + caudate), left and right.
    deep = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        for c, a in (((-0.05, -0.12, 0.12 * side), (0.13, 0.14, 0.10)),
                     ((0.00, 0.10, 0.28 * side), (0.13, 0.17, 0.07))):
            deep |= _ellipsoid(grid, centre + np.array(c) * axes, np.array(a) * axes * rng.uniform(0.9, 1.1)) < 1
    tissue[cortex | (deep & brain)] = GM

    # CSF: subarachnoid rim, sulci, fissure, lateral ventricles (curved, varying size) and third ventricle.
    csf = (depth < 0.9 * scale) | ((sulcal < 0.12) & (depth < 2.2 * thickness))
    vsize = rng.uniform(0.8, 1.3)
    for side in (-1, 1):
        c = centre + np.array([0.12, 0.05, 0.12 * side]) * axes
        a = np.array([0.13, 0.38, 0.10]) * axes * vsize
        bend = 0.10 * axes[0] * ((grid[1] - c[1]) / a[1]) ** 2  # the ventricle arches down at its horns
        csf |= (((grid[0] - c[0] + bend) / a[0]) ** 2 + ((grid[1] - c[1]) / a[1]) ** 2
                + ((grid[2] - c[2]) / a[2]) ** 2) < 1
    csf |= (np.abs(x) < 0.8 * scale) & (np.abs(y) < 0.12 * axes[1]) & (np.abs(z + 0.05 * axes[0]) < 0.12 * axes[0])
    tissue[csf & brain] = CSF
    return tissue, brain, centre, axes


# ----------------------------------------------------------------------------------------------------------------------
# tumours


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _tumour_centre(rng: np.random.Generator, tissue: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """A random point well inside the brain parenchyma (not in CSF), in voxels."""
    for _ in range(200):
        p = rng.uniform(-1, 1, 3)
        if p @ p > 1:
            continue
        v = centre + 0.6 * p * axes
        idx = tuple(int(round(float(c))) for c in v)
        if all(0 <= i < n for i, n in zip(idx, tissue.shape)) and tissue[idx] in (GM, WM):
            return v
    return centre.copy()


def _add_tumour(rng: np.random.Generator, tissue: np.ndarray, centre: np.ndarray, axes: np.ndarray,
                size: float, min_rim: float = 0.0, kinds: Sequence[str] = GLIOMA_KINDS) -> None:
    """Paint one glioma into ``tissue`` in place: core (necrosis and/or enhancing rim) and edema. The enhancing rim of
    a ring tumour is about ``min_rim`` voxels thick or more (0: as drawn). A kind drawn outside ``kinds`` becomes the
    first of ``kinds`` (in :data:`GLIOMA_KINDS` order), with every other property as drawn."""
    kind = str(rng.choice(GLIOMA_KINDS, p=GLIOMA_KIND_SHARES))
    if kind not in kinds:  # after the draw, so that the random sequence, and every other property, stays the same
        kind = next(k for k in GLIOMA_KINDS if k in kinds)
    radius = float(np.mean(axes))
    core_r = size * radius * rng.uniform(0.15, 0.30)
    semi = core_r * rng.uniform(0.75, 1.25, 3)
    necrotic_fraction = rng.uniform(0.55, 0.85)
    if min_rim > 0:  # after the draw, so that the random sequence, and every other property, stays the same
        necrotic_fraction = max(0.0, min(necrotic_fraction, 1.0 - min_rim / core_r))
    edema_extent = rng.uniform(1.3, 2.1)
    rotation = _random_rotation(rng)
    c = _tumour_centre(rng, tissue, centre, axes)

    reach = semi.max() * edema_extent * 1.7 + 2  # the largest extent edema_edge allows, so nothing is cut off
    lo = [max(0, int(np.floor(ci - reach))) for ci in c]
    hi = [min(n, int(np.ceil(ci + reach)) + 1) for ci, n in zip(c, tissue.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape = tuple(b - a for a, b in zip(lo, hi))
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    d = [g.astype(np.float32) - ci for g, ci in zip(grid, c)]
    q = [sum(rotation[i, j] * d[j] for j in range(3)) / semi[i] for i in range(3)]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)

    wavelength = max(3.0, core_r)
    core_edge = np.clip(1 + 0.22 * _smooth_field(rng, bshape, wavelength), 0.5, 1.6)
    necrosis_edge = core_edge * necrotic_fraction * np.clip(1 + 0.12 * _smooth_field(rng, bshape, wavelength), 0.7, 1.3)
    edema_edge = edema_extent * np.clip(1 + 0.22 * _smooth_field(rng, bshape, 2.0 * wavelength), 0.5, 1.65)

    local = tissue[box]
    parenchyma = (local == WM) | ((local == GM) & (rho < 0.8 * edema_edge))  # vasogenic edema spares the cortex
    core = (rho < core_edge) & (local != BG)
    local[parenchyma & (rho < edema_edge) & ~core] = EDEMA
    if kind == "non-enhancing":
        local[core] = NON_ENHANCING
    else:
        local[core] = ENHANCING
        if kind == "ring":
            local[core & (rho < necrosis_edge)] = NECROSIS


# ----------------------------------------------------------------------------------------------------------------------
# rendering


def _render(rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray, radius: float,
            tumour_modalities: Sequence[str] = BRATS_MODALITIES) -> dict[str, np.ndarray]:
    """MR images from a tissue map: tissue contrast, texture, partial volume, bias field, scale and Rician noise.
    Modalities outside ``tumour_modalities`` render every tumour tissue as white matter (no tumour contrast)."""
    shape = tissue.shape
    table = np.array([CONTRAST[t] for t in TISSUES], dtype=np.float32)  # (tissue, modality)
    tumour = TISSUE_LABEL[tissue] > 0
    # Per-case tumour contrast jitter (tumours vary from case to case), texture and tumour heterogeneity.
    jitter = np.ones_like(table)
    jitter[EDEMA:] = rng.uniform(0.9, 1.1, (len(TISSUES) - EDEMA, len(BRATS_MODALITIES)))
    table *= jitter
    for m, modality in enumerate(BRATS_MODALITIES):
        if modality not in tumour_modalities:
            table[EDEMA:, m] = table[WM, m]
    texture = 1 + 0.03 * _smooth_field(rng, shape, 3.0)
    texture[tumour] += 0.06 * _smooth_field(rng, shape, max(3.0, radius / 8))[tumour]
    images = {}
    for m, modality in enumerate(BRATS_MODALITIES):
        img = table[tissue, m] * texture
        img = gaussian_filter(img, sigma=0.6, truncate=3.0)
        img *= np.exp(0.15 * _smooth_field(rng, shape, 2.5 * radius))  # scanner bias field
        scale = 1000.0 * rng.uniform(0.5, 2.0)
        sigma = rng.uniform(0.015, 0.04)
        real = img + sigma * rng.standard_normal(shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(shape, dtype=np.float32)
        img = np.sqrt(real * real + imag * imag) * scale  # Rician magnitude
        img[~brain] = 0
        images[modality] = img.astype(np.float32, copy=False)
    return images


def synthesize_case(shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0,
                    options: CaseOptions = CaseOptions()) -> SyntheticCase:
    """Generate one case of ``shape`` (X, Y, Z) from ``seed`` as ``options`` say, with its tissue map (see
    :class:`SyntheticCase`)."""
    size = check_shape(shape)
    rng = np.random.default_rng(seed)
    tissue, brain, centre, axes = _anatomy(rng, size[::-1])
    n_tumours = 1 if rng.random() < 0.7 else 2
    for _ in range(n_tumours):
        _add_tumour(rng, tissue, centre, axes, size=1.0 if n_tumours == 1 else 0.8, min_rim=options.min_rim_mm,
                    kinds=options.glioma_kinds)
    images = _render(rng, tissue, brain, float(np.mean(axes)), options.tumour_modalities)
    return SyntheticCase(images=images, seg=TISSUE_LABEL[tissue], tissue=tissue)


def generate_case(shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0,
                  options: CaseOptions = CaseOptions()) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Generate one BraTS-like case: float32 images by modality (T1, T1ce, T2, FLAIR) and its uint8 segmentation.

    ``shape`` is (X, Y, Z); the arrays are (Z, Y, X). Labels are nnU-Net's: 0 background, 1 edema, 2 necrosis /
    non-enhancing core, 3 enhancing tumour; every case has tumour. The same seed gives the same case.
    ``options``: see :class:`CaseOptions`.
    """
    case = synthesize_case(shape, seed, options)
    return case.images, case.seg


# ----------------------------------------------------------------------------------------------------------------------
# datasets


def _write_nifti(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), True)


def _write_case(images_dir: Path, labels_dir: Path, case: str, shape: tuple[int, int, int], seed: int,
                options: CaseOptions, absent: Sequence[str] = ()) -> None:
    images, seg = generate_case(shape, seed, options)
    for c, modality in enumerate(BRATS_MODALITIES):
        if modality not in absent:
            _write_nifti(images[modality], images_dir / image_filename(case, c))
    _write_nifti(seg, labels_dir / f"{case}.nii.gz")


def incomplete_cases(num_cases: int, fraction: float, seed: int = 0,
                     site_missing: str | None = None) -> dict[str, tuple[str, ...]]:
    """Which training cases of a synthetic dataset lack which modalities: ``round(fraction x num_cases)`` cases, as
    :func:`write_synthetic_dataset`'s ``missing`` takes them.

    Without ``site_missing`` each incomplete case is drawn at random and lacks a random proper subset of the
    modalities (one to three of four, each subset equally likely). With ``site_missing`` (a modality) half of them
    (rounded up) are instead the last cases of the dataset, a contiguous block that lacks that modality alone, as when
    one site never acquired it. The same arguments always give the same record.
    """
    if not 0.0 <= fraction < 1.0:
        raise NnalignError(f"the fraction of incomplete cases must be in [0, 1) (got {fraction:g})")
    if site_missing is not None and site_missing not in BRATS_MODALITIES:
        raise NnalignError(f"{site_missing} is not a modality ({', '.join(BRATS_MODALITIES)})")
    count = int(round(fraction * num_cases))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    block = (count + 1) // 2 if site_missing else 0
    cases = [f"SYN_{i:04d}" for i in range(int(num_cases))]
    record = {case: (site_missing,) for case in cases[len(cases) - block:]}
    subsets = [tuple(m for j, m in enumerate(BRATS_MODALITIES) if code >> j & 1)
               for code in range(1, 2 ** len(BRATS_MODALITIES) - 1)]
    for i in sorted(rng.choice(len(cases) - block, size=count - block, replace=False)):
        record[cases[i]] = subsets[int(rng.integers(len(subsets)))]
    return dict(sorted(record.items()))


def write_synthetic_dataset(raw_root: str | Path, dataset_id: int, num_cases: int,
                            shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0, num_test: int = 0,
                            name: str = "SyntheticBraTS", overwrite: bool = False,
                            options: CaseOptions = CaseOptions(),
                            missing: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write ``num_cases`` training cases (``SYN_0000``, ...) and ``num_test`` held-out cases (``SYNTS_0000``, ...,
    images in ``imagesTs``, references in ``labelsTs``) as the nnU-Net raw dataset ``raw_root/DatasetXXX_name``.

    Images are 1 mm isotropic NIfTI with identity direction and origin 0. The folder appears only when complete; an
    existing dataset with the same ID is an error unless ``overwrite``. ``options``: what the cases look like
    (:class:`CaseOptions`). ``missing``: ``{case: modalities}`` written without those modalities' files and
    recorded in dataset.json (:mod:`nnalign.data.missing`). Returns the dataset folder.
    """
    from tqdm import tqdm

    size = check_shape(shape)
    if int(num_cases) < 1:
        raise NnalignError(f"number of training cases must be at least 1 (got {num_cases})")
    if int(num_test) < 0:
        raise NnalignError(f"number of test cases must not be negative (got {num_test})")
    if int(seed) < 0:
        raise NnalignError(f"seed must not be negative (got {seed})")
    if not _NAME_RE.fullmatch(name):
        raise NnalignError(f"dataset name '{name}' may only hold letters, digits, '_' and '-'")
    raw_root = Path(raw_root)
    jobs = [("Tr", f"SYN_{i:04d}", case_seed(seed, i)) for i in range(int(num_cases))]
    jobs += [("Ts", f"SYNTS_{i:04d}", case_seed(seed, i, held_out=True)) for i in range(int(num_test))]
    with build_dataset_folder(raw_root, dataset_id, name, overwrite=overwrite) as staging:
        for split in {split for split, _, _ in jobs}:
            (staging / f"images{split}").mkdir()
            (staging / f"labels{split}").mkdir()
        for split, case, s in tqdm(jobs, desc="synthetic cases", unit="case", disable=len(jobs) < 10):
            _write_case(staging / f"images{split}", staging / f"labels{split}", case, size, s, options,
                        (missing or {}).get(case, ()))
        write_dataset_json(
            staging, int(num_cases), name,
            description=f"Synthetic BraTS-like cases made by nnalign_synth (seed {seed}, "
                        f"shape {'x'.join(map(str, size))})",
            source_label_convention="brats2023", missing=missing,
            extra={"synthetic": {"seed": int(seed), "shape": list(size), "num_test": int(num_test),
                                 "generator_version": GENERATOR_VERSION, **options.record()}})
    return raw_root / dataset_name(dataset_id, name)
