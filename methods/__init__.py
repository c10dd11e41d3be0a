"""Fine-tuning methods, one module each; importing this package registers every one.

`REGISTRY` (name -> `Method`, listed by family, then name) is the one list of methods: the
trial contract takes each method's settings dataclass from it, the search spaces its spaces,
`trainables.methods` what it does to a model, and the tables what it shows. A module whose
name starts with `_` is a helper, not a method. See `methods/_base.py` for what a method holds.
"""

from __future__ import annotations

import importlib
import pkgutil

from methods._base import FAMILIES, REGISTRY, Method, Site, get_method, register

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

_ordered = sorted(REGISTRY.values(), key=lambda m: (FAMILIES.index(m.family), m.name))
REGISTRY.clear()
REGISTRY.update((m.name, m) for m in _ordered)

__all__ = ["FAMILIES", "REGISTRY", "Method", "Site", "get_method", "register"]
