"""User functions under RestrictedPython: ``sc.apply(fn, ...)`` ships ``fn``'s source; this compiles it.

    fn = compile_user_function("def top(x, k):\\n    return x.topk(k).indices\\n")
    fn(torch.randn(5), 2)                       # runs with guarded attribute access

What a user function may do: arithmetic, if/for (over range or iterables, with an iteration
budget), list/dict comprehensions, calls to allowlisted torch functions through the ``torch``
and ``F`` names, allowlisted tensor methods and attributes, and a small set of builtins. What it
may not: import, define classes, lambdas or generators, while-loops, try/except, f-strings,
global/nonlocal, any name or attribute starting with an underscore, or any attribute not on the
allowlist. Writes into a model weight are refused at run time, as for graph nodes. Operators, slicing,
builtins and methods that can grow a plain Python value without bound (``10 ** 10 ** 8``, ``[0] * 10**9``,
``list(range(10**9))``) are compiled into calls of the run's ``UserFunctionBudget`` (``user_budget.py``).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import math
import operator
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from RestrictedPython import compile_restricted
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import RestrictingNodeTransformer

from .allowlist import ATTRIBUTES, FACTORIES, FUNCTIONS, TENSOR_METHODS
from .expanded_size import item_count
from .user_budget import MAX_ITERATIONS, UserFunctionBudget, UserFunctionError, checked_index, checked_message

__all__ = ["MAX_ITERATIONS", "MAX_SOURCE", "UserFunctionError", "check_source", "compile_user_function"]

MAX_SOURCE = 20_000

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
        code = compile_restricted(source, filename=f"<user function {_digest(source)}>", mode="exec",
                                  policy=_BoundingTransformer)
    except SyntaxError as err:
        raise UserFunctionError(f"refused by RestrictedPython: {err}") from None
    except (MemoryError, RecursionError, ValueError):
        raise UserFunctionError("the user function is nested too deeply to compile") from None
    return code, name


def compile_user_function(source: str, check_writable: Callable[[Any], None] | None = None,
                          deadline: float | None = None, max_factory_elements: int = 2**26) -> Callable[..., Any]:
    """The callable defined by ``source``, with guards bound to this run (weight check, time and size budget)."""
    code, name = _compiled(source)
    budget = UserFunctionBudget(deadline)
    guards = _Guards(check_writable or (lambda obj: None), budget, max_factory_elements)
    namespace: dict[str, Any] = {
        "__builtins__": {**_builtin_table(), **budget.builtins()},
        "__name__": "user_function",
        "_getattr_": guards.getattr,
        "_getitem_": budget.getitem,
        "_write_": guards.write,
        "_getiter_": budget.iterate,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_inplacevar_": budget.inplace,
        "_bounded_binop_": budget.binop,
        "_bounded_unpack_": budget.unpack,
        "_checked_index_": checked_index,
        "torch": guards.torch_namespace(),
    }
    namespace["F"] = namespace["torch"].nn.functional
    exec(code, namespace)  # runs only the `def`, compiled by RestrictedPython above
    function = namespace[name]

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
        except UserFunctionError:
            raise
        except Exception as err:   # the caller prints the error: its message must be bounded too
            try:
                for arg in err.args:
                    checked_message(arg)
            except UserFunctionError as refused:
                raise refused from None
            raise
        return budget.check_result(result)
    return call


class _BoundingTransformer(RestrictingNodeTransformer):
    """RestrictedPython's policy, plus calls into the run's ``UserFunctionBudget`` wherever one expression can
    grow a Python value without bound. The names it inserts start with ``_``, which RestrictedPython refuses
    in user source, so user code can neither call nor shadow them; nodes made here are not visited again."""

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        visited = super().visit_BinOp(node)
        symbol = _BOUNDED_OPERATORS.get(type(node.op))
        if not isinstance(visited, ast.BinOp) or symbol is None:
            return visited
        return _call("_bounded_binop_", [ast.Constant(symbol), visited.left, visited.right], visited)

    def visit_Starred(self, node: ast.Starred) -> Any:   # [*a, *a, ...] copies a each time
        visited = super().visit_Starred(node)
        if isinstance(visited, ast.Starred) and isinstance(visited.ctx, ast.Load):
            visited.value = _call("_bounded_unpack_", [visited.value], visited.value)
        return visited

    def visit_Dict(self, node: ast.Dict) -> Any:         # {**d, **d, ...}
        visited = super().visit_Dict(node)
        if isinstance(visited, ast.Dict):
            visited.values = [value if key is not None else _call("_bounded_unpack_", [value], value)
                              for key, value in zip(visited.keys, visited.values, strict=True)]
        return visited

    def visit_Subscript(self, node: ast.Subscript) -> Any:  # x[index] = v: a nested-list index, as in _getitem_
        visited = super().visit_Subscript(node)
        if isinstance(visited, ast.Subscript) and isinstance(visited.ctx, ast.Store):
            visited.slice = _call("_checked_index_", [visited.slice], visited.slice)
        return visited


_BOUNDED_OPERATORS: dict[type, str] = {ast.Add: "+", ast.Mult: "*", ast.Pow: "**", ast.LShift: "<<", ast.Mod: "%"}


def _call(name: str, args: list[ast.expr], like: ast.AST) -> ast.Call:
    """``name(*args)`` at ``like``'s position; only the new nodes get locations (not a walk of ``args``, which
    would make a long chain ``x + x + ...`` quadratic to compile)."""
    for arg in args:
        if getattr(arg, "lineno", None) is None:
            ast.copy_location(arg, like)
    return ast.copy_location(ast.Call(func=ast.copy_location(ast.Name(name, ast.Load()), like), args=args,
                                      keywords=[]), like)


class _Guards:
    def __init__(self, check_writable: Callable[[Any], None], budget: UserFunctionBudget, max_elements: int) -> None:
        self.check_writable = check_writable
        self.budget = budget
        self.max_elements = max_elements

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
            if name == "tolist":
                return self.budget.tolist(obj)
            if name in _PIECE_OPS:
                return self._pieces(name, getattr(obj, name), obj)
            if name in TENSOR_METHODS:
                method = getattr(obj, name)
                if name.endswith("_"):
                    self.check_writable(obj)
                return method
            raise UserFunctionError(f"tensor attribute {name!r} is not on the allowlist")
        allowed = next((names for kind, names in _SAFE_METHODS.items() if isinstance(obj, kind)), frozenset())
        if name in allowed:
            return self.budget.method(obj, name, getattr(obj, name))
        if name in ATTRIBUTES and not callable(getattr(obj, name, None)):
            return getattr(obj, name)
        raise UserFunctionError(f"attribute {name!r} of a {type(obj).__name__} is not reachable from a user function")

    def write(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.check_writable(obj)
            return obj
        if isinstance(obj, (list, dict)):
            return obj
        raise UserFunctionError(f"a user function may not modify a {type(obj).__name__}")

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
            if qualified in FACTORIES:
                func = self._bounded(func)
            elif qualified in ("torch.split", "torch.chunk", "torch.unbind"):
                func = self._pieces(attr, func)
            setattr(space, attr, func)
        if not hasattr(root, "nn"):
            root.nn = SimpleNamespace(functional=SimpleNamespace())
        return root

    def _pieces(self, name: str, function: Callable[..., Any], tensor: Any = None) -> Callable[..., Any]:
        """split/chunk/unbind as a method of ``tensor``, or as a torch function taking it first."""
        def call(*args: Any, **kwargs: Any) -> Any:
            if tensor is None:
                self.budget.check_pieces(name, args[0] if args else kwargs.get("input", kwargs.get("tensor")),
                                         args[1:], kwargs)
            else:
                self.budget.check_pieces(name, tensor, args, kwargs)
            return function(*args, **kwargs)
        return call

    def _bounded(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        limit = self.max_elements

        def call(*args: Any, **kwargs: Any) -> Any:
            if set(kwargs) & {"device", "out", "pin_memory", "layout"}:
                raise UserFunctionError("factory functions may not choose a device or output buffer")
            elements = _factory_elements(factory, args, kwargs)
            if elements > limit:
                raise UserFunctionError(f"a factory call would create {elements:,} elements, more than {limit:,}")
            return factory(*args, **kwargs)
        return call


def _factory_elements(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The element count of a factory call, from its arguments (a dry run on meta tensors would be exact too,
    but the first meta call of randn, arange or linspace in a process takes a second or two)."""
    if factory is torch.tensor:         # nested lists, shared sub-lists counted each time they appear
        return item_count(args[0] if args else kwargs.get("data"))
    if factory is torch.arange:
        return _arange_length(*args, **kwargs)
    if factory is torch.linspace:
        return _size(args[2] if len(args) > 2 else kwargs.get("steps"))
    if factory is torch.eye:
        rows = args[0] if args else kwargs.get("n")
        return _size(rows) * _size(args[1] if len(args) > 1 else kwargs.get("m", rows))
    shapes = (list, tuple, torch.Size)
    if factory is torch.full:
        shape = args[0] if args else kwargs.get("size")
    elif factory is torch.randint:
        shape = next((a for a in args if isinstance(a, shapes)), kwargs.get("size"))
    else:                               # zeros, ones, rand, randn: zeros(2, 3) or zeros((2, 3))
        shape = args[0] if len(args) == 1 and isinstance(args[0], shapes) else args or kwargs.get("size")
    return math.prod(_size(d) for d in shape) if isinstance(shape, shapes) else _size(shape)


def _size(value: Any) -> int:
    try:
        return abs(operator.index(value))
    except TypeError:
        return 0                        # not a size: torch refuses it itself


def _arange_length(*args: Any, **kwargs: Any) -> int:
    """How many values ``torch.arange(*args, **kwargs)`` makes; 0 where torch will refuse the arguments."""
    bounds = {**dict(zip(("end",) if len(args) == 1 else ("start", "end", "step"), args, strict=False)),
              **{k: v for k, v in kwargs.items() if k in ("start", "end", "step")}}
    try:
        start, end, step = (float(bounds.get(k, default)) for k, default in (("start", 0), ("end", 0), ("step", 1)))
        return max(math.ceil((end - start) / step), 0)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, RuntimeError):
        return 0                            # not finite numbers: torch refuses them itself


def _resolve(qualified: str) -> Callable[..., Any]:
    obj: Any = torch
    for part in qualified.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


_PIECE_OPS = frozenset({"split", "chunk", "unbind"})   # one tensor object per piece
_DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                    "bool", "long", "float", "half", "double")}


@functools.lru_cache(maxsize=1)
def _builtin_table() -> dict[str, Any]:
    """The builtins that cannot grow a value; ``UserFunctionBudget.builtins`` adds range, list, str, sum, ..."""
    return {
        "None": None, "True": True, "False": False, "abs": abs, "bool": bool, "divmod": divmod,
        "enumerate": enumerate, "float": float, "int": int, "len": len, "reversed": reversed, "zip": zip,
        "math": SimpleNamespace(
            **{n: getattr(math, n) for n in ("sqrt", "log", "exp", "pi", "e", "inf", "floor", "ceil", "isfinite")}),
        "ValueError": ValueError,
    }


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:12]
