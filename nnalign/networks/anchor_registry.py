"""The teacher's anchors by name with each one's facts (:class:`AnchorKind`), and the one parser of an anchor spec
(``none | normal | modality[:NAME] | mixture | mixture-scaled``).

Torch-free: commands and reports check anchor specs without importing the anchors. The classes live in
:mod:`nnalign.networks.anchors`, registered with ``@ANCHORS.register(name)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from nnalign.errors import NnalignError
from nnalign.modalities import canonical_modality
from nnalign.registry import Registry


@dataclass(frozen=True)
class AnchorKind:
    """What a kind of anchor is, beside its name: the facts commands, names, trainers and reports ask about it.

    - ``token``: its word in a trainer name (letters and digits; ``modality`` adds the modality's name);
    - ``align_weight``: its default lambda (0 for the one without an alignment loss);
    - ``modality_dropout``: the modality dropout its teachers train with by default;
    - ``has_loss``: it has an alignment loss; ``takes_modality``: it is one modality (``modality:NAME``), so its
      gradient can be stopped; ``distance``: its loss is a squared distance between latents (``align_distance``
      applies); ``learns_weights``: it learns mixture weights (logged per epoch, kept in the settings record).
    """

    name: str
    token: str
    align_weight: float
    modality_dropout: float = 0.0
    has_loss: bool = True
    takes_modality: bool = False
    distance: bool = False
    learns_weights: bool = False


ANCHOR_KINDS: dict[str, AnchorKind] = {k.name: k for k in (
    AnchorKind("none", "none", align_weight=0.0, has_loss=False),
    AnchorKind("normal", "normal", align_weight=0.1),
    AnchorKind("modality", "modality", align_weight=0.1, takes_modality=True, distance=True),
    # P*'s weights learn only through the fill of missing modalities, so its teachers train with them by default
    AnchorKind("mixture", "mixture", align_weight=0.1, modality_dropout=0.5, distance=True, learns_weights=True),
    AnchorKind("mixture-scaled", "mixturescaled", align_weight=0.1, distance=True, learns_weights=True),
)}
"""Every anchor kind and its facts, in display order: no alignment, N(0, 1) (P^N), one modality (P^k,
``modality:NAME``), the learned mixture (P*, as the paper defines it) and nnalign's extension of it whose weights also
scale the latents into the predictor. documentation/training.md says how the default weights were chosen."""
ANCHORS = Registry("anchor", tuple(ANCHOR_KINDS), module="nnalign.networks.anchors")
"""The anchor classes by kind (:mod:`nnalign.networks.anchors` registers them)."""
DEFAULT_ANCHOR = "mixture"
"""The anchor of a teacher when none is given: P*, the paper's best."""
MIXTURE_ANCHORS: tuple[str, ...] = tuple(k.name for k in ANCHOR_KINDS.values() if k.learns_weights)
"""The kinds with learnable mixture weights."""
ALIGN_DISTANCES: tuple[str, ...] = ("mse", "relative")
"""The distance of the P^k and P* losses: ``mse``, the paper's plain mean squared error (the default), or ``relative``,
nnalign's: the squared distance over the latents' centred energy, which neither shrinking the latents nor a common
offset can lower (:func:`nnalign.networks.anchors.latent_energy`)."""
DEFAULT_ANCHOR_MODALITY = "T1ce"
"""The modality of ``modality`` given without ``:NAME`` (the paper's best single-modality anchor)."""


def canonical_anchor(spec: str, kinds: tuple[str, ...] = ANCHORS.names) -> str:
    """The canonical spelling of an anchor spec: ``Modality : t1c`` -> ``modality:T1ce``, ``modality`` ->
    ``modality:T1ce``, ``MIXTURE`` -> ``mixture``.

    ``kinds``: the kinds accepted (a command may add ``original``, the plain nnU-Net baseline). One-line NnalignError for an unknown
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
