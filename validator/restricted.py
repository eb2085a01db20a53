"""User functions under RestrictedPython: ``sc.apply(fn, ...)`` ships ``fn``'s source; this compiles it.

    fn = compile_user_function("def top(x, k):\\n    return x.topk(k).indices\\n")
    fn(torch.randn(5), 2)                       # runs with guarded attribute access

What a user function may do: arithmetic, if/for (over range or iterables, with an iteration
budget), list/dict comprehensions, calls to allowlisted torch functions through the ``torch``
and ``F`` names, allowlisted tensor methods and attributes, and a small set of builtins. What it
may not: import, define classes, lambdas or generators, while-loops, try/except, f-strings,
global/nonlocal, any name or attribute starting with an underscore, or any attribute not on the
allowlist. Writes into a model weight are refused at run time, as for graph nodes.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import math
import operator
import time
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from RestrictedPython import compile_restricted
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence

from .allowlist import ATTRIBUTES, FACTORIES, FUNCTIONS, TENSOR_METHODS

MAX_SOURCE = 20_000
MAX_ITERATIONS = 1_000_000

_REFUSED_NODES: dict[type, str] = {
    ast.Import: "imports", ast.ImportFrom: "imports", ast.ClassDef: "classes", ast.Lambda: "lambdas",
    ast.GeneratorExp: "generator expressions", ast.Yield: "generators", ast.YieldFrom: "generators",
    ast.While: "while-loops (use for i in range(n))", ast.Try: "try/except", ast.Global: "global",
    ast.Nonlocal: "nonlocal", ast.JoinedStr: "f-strings", ast.AsyncFunctionDef: "async functions",
    ast.Await: "await", ast.With: "with-blocks", ast.AsyncFor: "async for", ast.AsyncWith: "async with",
    ast.Delete: "del", ast.NamedExpr: "assignment expressions",
}
_SAFE_METHODS: dict[type, frozenset[str]] = {
    list: frozenset({"append", "extend", "pop", "index", "count", "copy", "insert", "reverse", "sort"}),
    dict: frozenset({"get", "items", "keys", "values", "copy", "pop", "setdefault", "update"}),
    tuple: frozenset({"count", "index"}),
    str: frozenset({"join", "split", "strip", "lower", "upper", "startswith", "endswith", "replace"}),
    torch.Size: frozenset({"numel", "count", "index"}),
}


class UserFunctionError(ValueError):
    """The user function's source is refused (message says why) or it broke a rule while running."""


def check_source(source: str) -> str:
    """Static checks; returns the function's name. Raises UserFunctionError."""
    if not isinstance(source, str) or len(source) > MAX_SOURCE:
        raise UserFunctionError(f"a user function's source must be a string of at most {MAX_SOURCE} characters")
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise UserFunctionError(f"the user function does not parse: {err.msg} (line {err.lineno})") from None
    except (MemoryError, RecursionError, ValueError):   # the parser's own limits: absurd nesting, NUL bytes
        raise UserFunctionError("the user function is nested too deeply or is not valid source text") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        raise UserFunctionError("the source must be exactly one plain `def` (no other statements)")
    func = tree.body[0]
    if func.decorator_list:
        raise UserFunctionError("user functions may not have decorators")
    _walk_checked(func)
    return func.name


def _walk_checked(func: ast.FunctionDef) -> None:
    for node in ast.walk(func):
        refused = next((why for kind, why in _REFUSED_NODES.items() if isinstance(node, kind)), None)
        if refused is not None:
            raise UserFunctionError(f"user functions may not use {refused} (line {getattr(node, 'lineno', '?')})")
        if isinstance(node, ast.FunctionDef) and node is not func:
            raise UserFunctionError("user functions may not define nested functions")


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> tuple[Any, str]:
    name = check_source(source)
    try:
        code = compile_restricted(source, filename=f"<user function {_digest(source)}>", mode="exec")
    except SyntaxError as err:
        raise UserFunctionError(f"refused by RestrictedPython: {err}") from None
    except (MemoryError, RecursionError, ValueError):
        raise UserFunctionError("the user function is nested too deeply to compile") from None
    return code, name


def compile_user_function(source: str, check_writable: Callable[[Any], None] | None = None,
                          deadline: float | None = None, max_factory_elements: int = 2**26) -> Callable[..., Any]:
    """The callable defined by ``source``, with guards bound to this run (weight check, time budget)."""
    code, name = _compiled(source)
    guards = _Guards(check_writable or (lambda obj: None), deadline, max_factory_elements)
    namespace: dict[str, Any] = {
        "__builtins__": _builtins(),
        "__name__": "user_function",
        "_getattr_": guards.getattr,
        "_getitem_": operator.getitem,
        "_write_": guards.write,
        "_getiter_": guards.iterate,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_inplacevar_": _inplacevar,
        "torch": guards.torch_namespace(),
    }
    namespace["F"] = namespace["torch"].nn.functional
    exec(code, namespace)  # runs only the `def`, compiled by RestrictedPython above
    return namespace[name]


class _Guards:
    def __init__(self, check_writable: Callable[[Any], None], deadline: float | None, max_elements: int) -> None:
        self.check_writable = check_writable
        self.deadline = deadline
        self.max_elements = max_elements
        self.iterations = 0

    def getattr(self, obj: Any, name: str, default: Any = None) -> Any:
        if not isinstance(name, str) or name.startswith("_"):
            raise UserFunctionError(f"attribute {name!r} is not reachable from a user function")
        if isinstance(obj, SimpleNamespace):
            if not hasattr(obj, name):
                raise UserFunctionError(f"{name!r} is not an allowlisted torch function or dtype")
            return getattr(obj, name)
        if isinstance(obj, torch.Tensor):
            if name in ATTRIBUTES:
                return getattr(obj, name)
            if name in TENSOR_METHODS:
                method = getattr(obj, name)
                if name.endswith("_"):
                    self.check_writable(obj)
                return method
            raise UserFunctionError(f"tensor attribute {name!r} is not on the allowlist")
        allowed = next((names for kind, names in _SAFE_METHODS.items() if isinstance(obj, kind)), frozenset())
        if name in allowed or (name in ATTRIBUTES and not callable(getattr(obj, name, None))):
            return getattr(obj, name)
        raise UserFunctionError(f"attribute {name!r} of a {type(obj).__name__} is not reachable from a user function")

    def write(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.check_writable(obj)
            return obj
        if isinstance(obj, (list, dict)):
            return obj
        raise UserFunctionError(f"a user function may not modify a {type(obj).__name__}")

    def iterate(self, obj: Iterable[Any]) -> Iterator[Any]:
        for item in obj:
            self.iterations += 1
            if self.iterations > MAX_ITERATIONS:
                raise UserFunctionError(f"the user function ran more than {MAX_ITERATIONS} loop iterations")
            if self.deadline is not None and self.iterations % 1024 == 0 and time.monotonic() > self.deadline:
                raise UserFunctionError("the user function ran past the job's time limit")
            yield item

    def torch_namespace(self) -> SimpleNamespace:
        spaces: dict[str, SimpleNamespace] = {}
        root = SimpleNamespace(**{name: dtype for name, dtype in _DTYPES.items()})
        spaces["torch"] = root
        for qualified in sorted(FUNCTIONS):
            if not qualified.startswith("torch."):
                continue
            *parents, attr = qualified.split(".")
            space = root
            for depth in range(1, len(parents)):
                key = ".".join(parents[: depth + 1])
                if key not in spaces:
                    spaces[key] = SimpleNamespace()
                    setattr(space, parents[depth], spaces[key])
                space = spaces[key]
            func = _resolve(qualified)
            setattr(space, attr, self._bounded(func) if qualified in FACTORIES else func)
        if not hasattr(root, "nn"):
            root.nn = SimpleNamespace(functional=SimpleNamespace())
        return root

    def _bounded(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        limit = self.max_elements

        def call(*args: Any, **kwargs: Any) -> Any:
            if set(kwargs) & {"device", "out", "pin_memory", "layout"}:
                raise UserFunctionError("factory functions may not choose a device or output buffer")
            sizes = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            for a in args:
                if isinstance(a, (list, tuple, torch.Size)):
                    sizes.extend(int(v) for v in a)
            if math.prod(abs(s) for s in sizes) > limit:
                raise UserFunctionError(f"a factory call would create more than {limit} elements")
            return factory(*args, **kwargs)
        return call


def _resolve(qualified: str) -> Callable[..., Any]:
    obj: Any = torch
    for part in qualified.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _inplacevar(op: str, target: Any, value: Any) -> Any:
    ops = {"+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
           "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "@=": operator.imatmul}
    if op not in ops:
        raise UserFunctionError(f"augmented assignment {op} is not allowed")
    if isinstance(target, torch.Tensor):   # x += y on a tensor would write in place: compute a new one
        return {"+=": operator.add, "-=": operator.sub, "*=": operator.mul, "/=": operator.truediv,
                "//=": operator.floordiv, "%=": operator.mod, "**=": operator.pow, "@=": operator.matmul}[op](
                    target, value)
    return ops[op](target, value)


_DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                    "bool", "long", "float", "half", "double")}


@functools.lru_cache(maxsize=1)
def _builtin_table() -> dict[str, Any]:
    return {
        "None": None, "True": True, "False": False, "abs": abs, "all": all, "any": any, "bool": bool,
        "dict": dict, "divmod": divmod, "enumerate": enumerate, "float": float, "int": int, "isinstance": isinstance,
        "len": len, "list": list, "max": max, "min": min, "range": range, "reversed": reversed, "round": round,
        "sorted": sorted, "str": str, "sum": sum, "tuple": tuple, "zip": zip, "math": SimpleNamespace(
            **{n: getattr(math, n) for n in ("sqrt", "log", "exp", "pi", "e", "inf", "floor", "ceil", "isfinite")}),
        "ValueError": ValueError,
    }


def _builtins() -> dict[str, Any]:
    return dict(_builtin_table())


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:12]
