"""Package names that load on first use (PEP 562), so importing a package costs nothing until a name
from it is used: a process that needs only ``validator.Limits`` never imports torch.

    __getattr__, __dir__ = lazy_exports(__name__, globals(), {"Graph": ".graph", "Tracer": ".tracer"})

Using one name imports its module and binds every name listed for that module, so a submodule that
the import system binds on the package never stays shadowing a name exported from it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any],
                 where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's ``__getattr__`` and ``__dir__`` for names ``where`` maps to (relative) module names."""
    def getattr_(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(where[name], package)
        namespace.update({n: getattr(module, n) for n, w in where.items() if w == where[name]})
        return namespace[name]

    def dir_() -> list[str]:
        return sorted({*namespace, *where})

    return getattr_, dir_
