"""One place that maps a distillation method's name (as typed on the command line) to its loss class.

    @register_kd("kdnet")            # in nnalign/losses/kd/kdnet.py: the module of a method is named after it
    class KDNetLoss(DistillationLoss): ...

    loss = build_kd("kdnet", feature_channels=32, bottleneck_channels=320, skip_channels=[32, 64, ..., 320],
                    temperature=4.0)

The method names are declared here, torch-free, so that commands and reports check and list them without importing
the losses; the first lookup of a method imports its module.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from nnalign.errors import NnalignError
from nnalign.registry import Registry

if TYPE_CHECKING:
    from nnalign.losses.kd.base import DistillationLoss

KD = Registry("KD method", ("none", "kdnet", "pmkl", "protokd", "smunet"), module="nnalign.losses.kd.{name}")
"""The distillation methods, in the paper's order (``none``: the subset baseline without distillation)."""
KD_METHODS: tuple[str, ...] = KD.names


def register_kd(name: str) -> Callable[[type], type]:
    """Class decorator: register a ``DistillationLoss`` subclass under the declared ``name``; sets its ``name``."""
    register = KD.register(name)

    def decorate(cls: type) -> type:
        from nnalign.losses.kd.base import DistillationLoss

        if not (isinstance(cls, type) and issubclass(cls, DistillationLoss)):
            raise TypeError(f"register_kd({name!r}): {cls!r} is not a DistillationLoss subclass")
        return register(cls)

    return decorate


def kd_class(name: str) -> type:
    """The loss class registered under ``name``; NnalignError listing the methods for an unknown one."""
    return KD.get(name)


def build_kd(
    name: str,
    *,
    feature_channels: int,
    bottleneck_channels: int,
    skip_channels: Sequence[int],
    num_regions: int = 3,
    **overrides: Any,
) -> DistillationLoss:
    """Build the distillation loss ``name`` for a network with the given shapes.

    - ``feature_channels``: channels of ``NetworkOutputs.decoder_features`` (the last decoder stage).
    - ``bottleneck_channels``: channels of the bottleneck (``skips[-1]``).
    - ``skip_channels``: channels of every encoder stage, shallowest first (the last equals ``bottleneck_channels``).
    - ``num_regions``: R, the number of sigmoid region outputs (3 for WT, TC, ET).
    - ``overrides``: settings of the method (see its ``settings()``); an unknown key raises NnalignError.
    """
    cls = kd_class(name)
    allowed = cls.setting_names()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise NnalignError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} for KD method "
            f"'{cls.name}' (known: {', '.join(allowed) if allowed else 'none'})"
        )
    skips = [int(c) for c in skip_channels]
    if not skips or min(skips) < 1 or int(feature_channels) < 1 or int(bottleneck_channels) < 1 or int(num_regions) < 1:
        raise NnalignError(
            f"KD method '{cls.name}': channel counts must be positive and skip_channels non-empty "
            f"(feature_channels={feature_channels}, bottleneck_channels={bottleneck_channels}, "
            f"skip_channels={list(skip_channels)}, num_regions={num_regions})"
        )
    if skips[-1] != int(bottleneck_channels):
        raise NnalignError(
            f"KD method '{cls.name}': bottleneck_channels={bottleneck_channels} but the deepest skip has "
            f"{skips[-1]} channels (the bottleneck is the last skip)"
        )
    from nnalign.losses.kd.base import NetworkShape

    return cls(NetworkShape(int(feature_channels), int(bottleneck_channels), tuple(skips), int(num_regions)),
               **overrides)
