"""Named, pluggable parts (anchors, distillation losses): the names declared once, the classes registered where they
are implemented.

The names are known without importing the parts (which need torch), so commands and reports can list and check them
at once; the first lookup of a class imports the module that implements it, whose class decorator registers it::

    KD = Registry("KD method", ("none", "kdnet"), module="nnalign.losses.kd.{name}")

    @KD.register("kdnet")            # in nnalign/losses/kd/kdnet.py
    class KDNetLoss(DistillationLoss): ...

    KD.check("KDNet")  -> "kdnet"    # torch-free
    KD.get("kdnet")    -> KDNetLoss  # imports nnalign.losses.kd.kdnet on first use
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from nnalign.errors import NnalignError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Declared names (``names``, in display order) mapped to the classes registered under them.

    ``module`` is the module that registers a name's class when imported; ``{name}`` in it stands for the name.
    """

    def __init__(self, what: str, names: tuple[str, ...], module: str):
        self.what = what
        self.names = tuple(names)
        self.module = module
        self._classes: dict[str, T] = {}

    def check(self, name: str) -> str:
        """The declared name for ``name`` (case and surrounding blanks ignored); a one-line NnalignError listing the
        names for an unknown one."""
        key = str(name).strip().lower()
        if key not in self.names:
            raise NnalignError(f"unknown {self.what} {name!r} (known: {', '.join(self.names)})")
        return key

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register the class under the declared ``name`` and set its ``name`` attribute."""
        if name not in self.names:
            raise ValueError(f"{self.what} {name!r} is not declared (declared: {', '.join(self.names)})")

        def decorate(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.what} {name!r} is already registered by {self._classes[name].__qualname__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> T:
        """The class registered under ``name`` (checked with :meth:`check`), importing its module on first use."""
        key = self.check(name)
        if key not in self._classes:
            importlib.import_module(self.module.format(name=key))
        if key not in self._classes:
            raise ValueError(f"{self.module.format(name=key)} did not register {self.what} {key!r}")
        return self._classes[key]
