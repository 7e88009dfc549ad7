"""The teacher's anchors by name, and the one parser of an anchor spec (``none | normal | modality[:NAME] | mixture |
mixture-scaled``).

Torch-free: commands and reports check anchor specs without importing the anchors. The classes live in
:mod:`nnalign.networks.anchors`, registered with ``@ANCHORS.register(name)``.
"""
from __future__ import annotations

from nnalign.errors import NnalignError
from nnalign.modalities import canonical_modality
from nnalign.registry import Registry

ANCHORS = Registry("anchor", ("none", "normal", "modality", "mixture", "mixture-scaled"),
                   module="nnalign.networks.anchors")
"""The anchor kinds: no alignment, N(0, 1) (P^N), one modality (P^k, ``modality:NAME``), the learned mixture (P*, as
the paper defines it) and nnalign's extension of it whose weights also scale the latents into the predictor."""
MIXTURE_ANCHORS: tuple[str, ...] = ("mixture", "mixture-scaled")
"""The kinds with learnable mixture weights (logged per epoch, kept in the settings record)."""
ALIGN_DISTANCES: tuple[str, ...] = ("mse", "relative")
"""The distance of the P^k and P* losses: ``mse``, the paper's plain mean squared error (the default), or ``relative``,
nnalign's: the squared distance over the latents' centred energy, which neither shrinking the latents nor a common
offset can lower (:func:`nnalign.networks.anchors.latent_energy`)."""
DEFAULT_ANCHOR_MODALITY = "T1ce"
"""The modality of ``modality`` given without ``:NAME`` (the paper's best single-modality anchor)."""


def canonical_anchor(spec: str, kinds: tuple[str, ...] = ANCHORS.names) -> str:
    """The canonical spelling of an anchor spec: ``Modality : t1c`` -> ``modality:T1ce``, ``modality`` ->
    ``modality:T1ce``, ``MIXTURE`` -> ``mixture``.

    ``kinds``: the kinds accepted (a run may add ``original``, plain nnU-Net). One-line NnalignError for an unknown
    kind, a ``:`` argument to a kind other than ``modality``, or an unknown modality.
    """
    kind, sep, arg = str(spec).strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind not in kinds:
        choices = ", ".join("modality:NAME" if k == "modality" else k for k in kinds)
        raise NnalignError(f"unknown anchor {spec!r} (choose from {choices})")
    if kind != "modality":
        if sep:
            raise NnalignError(f"anchor {spec!r}: '{kind}' takes no ':' argument")
        return kind
    if sep and not arg:
        raise NnalignError(f"anchor {spec!r} names no modality: use modality:NAME, e.g. modality:T1ce")
    try:
        name = canonical_modality(arg) if arg else DEFAULT_ANCHOR_MODALITY
    except NnalignError as e:
        raise NnalignError(f"anchor {spec!r}: {e}") from None
    return f"modality:{name}"
