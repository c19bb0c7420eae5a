"""`package.module:function` references written in a config: the one importer behind the reward,
loss and gate plug-ins."""
from __future__ import annotations

import importlib
from typing import Callable


def is_ref(name: object) -> bool:
    """True for a `module:function` reference (as opposed to a registry name)."""
    return isinstance(name, str) and ":" in name


def import_ref(ref: str, kind: str) -> Callable:
    """Import `package.module:qualname` and return the callable; ValueError naming `kind` and `ref`
    (module missing, attribute missing, not callable) otherwise."""
    module_name, _, qualname = ref.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"{kind} reference {ref!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{kind} {ref!r}: cannot import module {module_name!r} ({exc})") from exc
    for attr in qualname.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(f"{kind} {ref!r}: {module_name!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise ValueError(f"{kind} {ref!r} is not callable")
    return obj
