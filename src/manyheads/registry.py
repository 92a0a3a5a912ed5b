"""The one way a class joins a registry by name: heads by kind, loggers by name.

register = lambda kind: add_to(REGISTRY, kind, what="head kind", attribute="kind")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


def add_to(registry: dict[str, type], name: str, *, what: str, attribute: str) -> Callable[[T], T]:
    """A class decorator putting the class in ``registry`` under ``name`` and setting ``cls.<attribute> = name``.

    A second class under a taken name is refused, naming the class that has it.
    """

    def add(cls: T) -> T:
        if name in registry and registry[name] is not cls:
            taken = registry[name].__name__
            raise ValueError(f"a {what} {name!r} is registered already ({taken}); register yours under another name")
        setattr(cls, attribute, name)
        registry[name] = cls
        return cls

    return add
