"""Names of callable targets in graphs, both ways: function object <-> qualified name.

    >>> target_name(torch.nn.functional.softmax)
    'torch.nn.functional.softmax'
    >>> resolve_function('operator.add') is operator.add
    True

Only the namespaces listed in ``NAMESPACES`` are ever resolved, and never a name that
starts with an underscore. The validator narrows this further to an explicit allowlist.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

NAMESPACES: dict[str, Any] = {
    "operator": operator,
    "torch": torch,
    "torch.nn.functional": F,
    "torch.linalg": torch.linalg,
    "torch.fft": torch.fft,
    "torch.special": torch.special,
}

#: Tensor dunder methods reached through __torch_function__ -> (operator function, swap args)
TENSOR_DUNDERS: dict[str, tuple[Callable[..., Any], bool]] = {}
for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    _op = getattr(operator, _name + "_" if _name in ("and", "or") else _name)
    TENSOR_DUNDERS[f"__{_name}__"] = (_op, False)
    TENSOR_DUNDERS[f"__r{_name}__"] = (_op, True)
for _name in ("lt", "le", "gt", "ge", "eq", "ne", "neg", "pos", "abs", "invert", "getitem"):
    TENSOR_DUNDERS[f"__{_name}__"] = (getattr(operator, _name), False)
TENSOR_DUNDERS["__div__"] = (operator.truediv, False)
TENSOR_DUNDERS["__rdiv__"] = (operator.truediv, True)


@lru_cache(maxsize=1)
def _names_by_id() -> dict[int, str]:
    names: dict[int, str] = {}
    # later namespaces win for shared objects, so torch.nn.functional names beat torch's
    for prefix, namespace in NAMESPACES.items():
        for attr in dir(namespace):
            if attr.startswith("_"):
                continue
            obj = getattr(namespace, attr, None)
            if callable(obj) and not isinstance(obj, type):
                names.setdefault(id(obj), f"{prefix}.{attr}")
    return names


def target_name(func: Callable[..., Any]) -> str | None:
    """The qualified name under which ``func`` is recorded, or None if it is not in our namespaces."""
    return _names_by_id().get(id(func))


def resolve_function(name: str) -> Callable[..., Any]:
    """The function a recorded ``call_function`` target names. Raises LookupError if unknown."""
    prefix, _, attr = name.rpartition(".")
    namespace = NAMESPACES.get(prefix)
    if namespace is None or not attr or attr.startswith("_"):
        raise LookupError(f"{name!r} is not a known function")
    func = getattr(namespace, attr, None)
    if func is None or not callable(func) or isinstance(func, type):
        raise LookupError(f"{name!r} is not a known function")
    return func


def tensor_method(name: str) -> bool:
    """Whether ``name`` is a public method of torch.Tensor."""
    return not name.startswith("_") and callable(getattr(torch.Tensor, name, None))
