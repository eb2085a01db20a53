"""The budget of one user-function call: loop iterations, time, and the size of plain Python values.

    budget = UserFunctionBudget(deadline=time.monotonic() + 2.0)
    budget.binop("*", [0], 10)              # [0, 0, ..., 0]
    budget.binop("**", 10, 10**8)           # UserFunctionError: `**` would make an int over the 16,384-bit ...
    budget.builtins()["range"](10**9)       # UserFunctionError: range(...) has 1,000,000,000 items ...

RestrictedPython bounds attribute access, not size: one expression such as ``10 ** 10 ** 8``, ``[0] * 10**9``
or ``list(range(10**9))`` can take a worker's memory or minutes of CPU. ``restricted.py`` compiles ``a + b``,
``a * b``, ``a ** b``, ``a << b`` and ``a % b`` (and their augmented forms) into ``binop``/``inplace``, ``*x``
and ``**d`` inside displays into ``unpack``, and binds the builtins, slicing and the list/str/dict methods
from here. For plain Python values (tensors and tensor arithmetic pass through untouched):

- an int computed by ``* ** <<`` (checked before) or ``+`` (after: it adds one bit) has at most
  ``MAX_INT_BITS`` bits, so one multiplication or division costs microseconds and one pass over a list of
  such ints stays under a second;
- a str, bytes, list or tuple built by an operator, a builtin or a method has at most ``MAX_SEQUENCE``
  items, and ``str()``, ``%``-formatting and the function's return value are measured with every shared
  sub-list counted each time it appears (``[[0] * 1000] * 1000`` is a million items when printed);
- the values those guards create in one call add up to at most ``MAX_ALLOCATED_BYTES`` (shallow
  ``sys.getsizeof``), which bounds loops of bounded operations and quadratic patterns (``s = s + t``,
  ``sum(lists, [])``);
- loops, builtins that pull items from a tensor or an iterator (``list(t)``, ``sorted(zip(a, b))``) and
  tensor ops that return one Python object per piece (``split``, ``chunk``, ``unbind``) share
  ``MAX_ITERATIONS``; the deadline is checked every ``_DEADLINE_EVERY`` items and after every large
  guarded operation.
"""
from __future__ import annotations

import math
import operator
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .expanded_size import CONTAINERS, NUMBERS, VIEWS, item_count, repr_size

MAX_ITERATIONS = 1_000_000
MAX_INT_BITS = 2**14          # ~4,900 decimal digits; Python itself will not print an int over 4,300
MAX_SEQUENCE = 1_000_000      # items of one str/bytes/list/tuple/dict, as many as a loop may append
MAX_ALLOCATED_BYTES = 2**26   # all guarded values of one call together (garbage included)
MAX_FORMAT_WIDTH = 10_000     # width or precision of one %-format field

_DEADLINE_EVERY = 64          # iterations between two deadline checks
_LARGE_BYTES = 32_768         # a guarded result at least this big checks the deadline
_TENSOR_ITEM_BYTES = 640      # a tensor row or piece as a Python object (measured ~630), not its data
_FRESH_ITEM_BYTES = 56        # an int from range(), a character or a piece of str.split(): a new object
_HINT = "use torch tensors for large arrays"

_SEQUENCES = (str, bytes, list, tuple)
_SIZED = (str, bytes, list, tuple, dict, range, *VIEWS)
_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "*": operator.mul, "**": operator.pow, "<<": operator.lshift, "%": operator.mod}
_AUGMENTED: dict[str, tuple[str | None, Callable[[Any, Any], Any], Callable[[Any, Any], Any]]] = {
    # op -> (the binop whose bounds apply, in-place operator for Python values, plain operator for tensors)
    "+=": ("+", operator.iadd, operator.add), "-=": (None, operator.isub, operator.sub),
    "*=": ("*", operator.imul, operator.mul), "/=": (None, operator.itruediv, operator.truediv),
    "//=": (None, operator.ifloordiv, operator.floordiv), "%=": ("%", operator.imod, operator.mod),
    "**=": ("**", operator.ipow, operator.pow), "@=": (None, operator.imatmul, operator.matmul),
}
_GROWING_METHODS = frozenset({"extend", "join", "replace", "update", "split", "copy", "strip", "lower", "upper"})
# a %-format field: optional (key), flags, width, .precision, length modifier
_FORMAT_FIELD = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?")


class UserFunctionError(ValueError):
    """The user function's source is refused (message says why) or it broke a rule while running."""


class UserFunctionBudget:
    """Counters of one call of a user function, and the guards that charge them."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.iterations = 0
        self.allocated = 0

    # -- time, iterations, bytes --------------------------------------------------------------------------

    def iterate(self, items: Iterable[Any]) -> Iterator[Any]:
        """``items``, counting each against MAX_ITERATIONS and checking the deadline (RestrictedPython's
        ``_getiter_``: every for-loop and comprehension runs through here)."""
        for item in items:
            self.iterations += 1
            if self.iterations > MAX_ITERATIONS:
                raise UserFunctionError(f"the user function ran more than {MAX_ITERATIONS:,} loop iterations")
            if self.iterations % _DEADLINE_EVERY == 0:
                self.check_deadline()
            yield item

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise UserFunctionError("the user function ran past the job's time limit")

    def charge(self, value: Any) -> Any:
        """Count ``value``'s own bytes against MAX_ALLOCATED_BYTES; returns it."""
        self.charge_bytes(sys.getsizeof(value))
        return value

    def charge_bytes(self, size: int) -> None:
        self.allocated += size
        if self.allocated > MAX_ALLOCATED_BYTES:
            raise UserFunctionError(f"the user function built more than {MAX_ALLOCATED_BYTES // 2**20} MiB of "
                                    f"Python lists, strings and ints; {_HINT}")
        if size >= _LARGE_BYTES:
            self.check_deadline()

    # -- operators -------------------------------------------------------------------------------------------

    def binop(self, op: str, left: Any, right: Any) -> Any:
        """``left <op> right`` for op in + * ** << %, refused if the result would be too large."""
        if type(left) is int and type(right) is int:    # the common cases first: one call, few tests
            if op != "+" and op != "%":
                _check_int_op(op, left, right)
            result = _OPERATORS[op](left, right)
            return self._charged(op, result) if type(result) is int and result.bit_length() > 64 else result
        if type(left) is float or (isinstance(left, torch.Tensor) and not isinstance(right, _SEQUENCES)):
            return _OPERATORS[op](left, right)
        if not self.check(op, left, right):
            return _OPERATORS[op](left, right)
        return self._charged(op, _OPERATORS[op](left, right))

    def inplace(self, op: str, target: Any, value: Any) -> Any:
        """``target <op>= value`` (RestrictedPython's ``_inplacevar_``). On a tensor it computes a new tensor:
        writing in place could reach a weight."""
        if op not in _AUGMENTED:
            raise UserFunctionError(f"augmented assignment {op} is not allowed")
        bounded, in_place, plain = _AUGMENTED[op]
        if isinstance(target, torch.Tensor):
            return plain(target, value)
        if op == "+=" and isinstance(target, list) and not isinstance(value, _SEQUENCES):
            value = self.materialize(value)   # list += iterable extends in place: bound the iterable first
        if bounded is None or not self.check(bounded, target, value):
            return in_place(target, value)
        return self._charged(bounded, in_place(target, value))

    def check(self, op: str, left: Any, right: Any) -> bool:
        """Refuse ``left <op> right`` if its result would break a bound; True if the result is a plain
        Python value worth charging."""
        if isinstance(left, _SEQUENCES) or isinstance(right, _SEQUENCES):
            return self._check_sequence_op(op, left, right)
        if isinstance(left, int) and isinstance(right, int):
            _check_int_op(op, left, right)
            return True
        return False

    def _check_sequence_op(self, op: str, left: Any, right: Any) -> bool:
        if op == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _check_length(len(left) + len(right), "`+`")
        elif op == "*":
            sequence, count = (left, right) if isinstance(left, _SEQUENCES) else (right, left)
            if isinstance(count, _SEQUENCES):
                return False                   # Python raises TypeError
            try:
                times = operator.index(count)  # an int, a bool or a 0-d integer tensor repeats the sequence
            except TypeError:
                return False                   # not a repeat count: Python or torch decides
            _check_length(len(sequence) * max(times, 0), "`*`")
        elif op == "%" and isinstance(left, (str, bytes)):
            self._check_format(left, right)
        return True

    def _check_format(self, template: str | bytes, args: Any) -> None:
        text = template.decode("latin-1") if isinstance(template, bytes) else template
        keyed = isinstance(args, dict)   # each %(key)s field prints one value, each %s one argument
        values = list(args.values()) if keyed else list(args) if isinstance(args, tuple) else [args]
        sizes = [len(v) if type(v) is str else repr_size(v) for v in values]
        total = len(text) + (0 if keyed else sum(sizes))
        for field in _FORMAT_FIELD.finditer(text):
            key, width, precision = field.groups()
            for number in (width, precision):
                if number == "*" or (number and (len(number) > 6 or int(number) > MAX_FORMAT_WIDTH)):
                    raise UserFunctionError(f"`%` formatting: widths and precisions must be written in the format "
                                            f"string and be at most {MAX_FORMAT_WIDTH:,}")
            total += max(int(width or 0), int(precision or 0)) + (max(sizes, default=0) if key else 0)
            _check_length(total, "`%` formatting")
        _check_length(total, "`%` formatting")

    def _charged(self, op: str, result: Any) -> Any:
        if isinstance(result, int):
            bits = result.bit_length()
            if bits > MAX_INT_BITS:        # by one bit at most: `+` and the last bit of `*` are checked after
                _refuse_int(op, bits)
            if bits <= 64:
                return result
        elif not isinstance(result, _SEQUENCES):
            return result
        return self.charge(result)

    # -- displays, slicing, return values ------------------------------------------------------------------

    def unpack(self, value: Any) -> Any:
        """``*value`` or ``**value`` inside a list/tuple/set/dict display: ``[*a, *a, ...]`` copies ``a``
        each time."""
        if isinstance(value, CONTAINERS):
            self.charge(value)
        elif isinstance(value, _SIZED):        # range, str, dict views: their items are new objects
            self.charge_bytes((8 + _FRESH_ITEM_BYTES) * len(value))
        else:
            return self.materialize(value)
        return value

    def getitem(self, obj: Any, key: Any) -> Any:
        """``obj[key]`` (RestrictedPython's ``_getitem_``): slices of Python sequences are copies, and a key
        made of nested lists or tuples is bounded by ``checked_index``."""
        if type(key) is slice:
            result = obj[key]
            if isinstance(result, _SEQUENCES):
                self.charge(result)
            return result
        return obj[checked_index(key)]

    def check_result(self, value: Any) -> Any:
        """A user function's return value: the graph measures and serializes it element by element."""
        size = item_count(value)
        if size > MAX_SEQUENCE:
            raise UserFunctionError(f"the user function returned a value of {size:,} items (counting each "
                                    f"shared sub-list every time), more than {MAX_SEQUENCE:,}; {_HINT}")
        return value

    def materialize(self, items: Any) -> list[Any]:
        """``list(items)`` within the budget: sized containers are already bounded; tensors and iterators
        count their items as loop iterations."""
        if isinstance(items, (range, str)):
            self.charge_bytes(_FRESH_ITEM_BYTES * len(items))
        elif isinstance(items, torch.Tensor):
            self.charge_bytes(_TENSOR_ITEM_BYTES * self._rows(items))
        return self.charge(list(self.items(items)))

    def items(self, items: Any) -> Iterable[Any]:
        """``items`` for a builtin that walks it in C: a sized container as it is (its size was bounded
        where it was built), anything else through ``iterate``."""
        if isinstance(items, _SIZED):
            return items
        if isinstance(items, torch.Tensor):
            self._rows(items)
        return self.iterate(items)

    def check_pieces(self, name: str, tensor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before ``tensor.<name>(*args, **kwargs)`` for split, chunk or unbind, which make one tensor object per
        piece: ``x.split(1)`` of 2**26 elements would be 40 GB of Python objects, even on meta tensors."""
        pieces = _piece_count(name, tensor, args, kwargs)
        if self.iterations + pieces > MAX_ITERATIONS:
            raise UserFunctionError(f"{name}() would make {pieces:,} tensors, more than the {MAX_ITERATIONS:,} "
                                    "loop iterations could use; use tensor operations on the whole")
        self.charge_bytes(_TENSOR_ITEM_BYTES * pieces)

    def _rows(self, tensor: torch.Tensor) -> int:
        rows = len(tensor) if tensor.dim() else 0
        if self.iterations + rows > MAX_ITERATIONS:
            raise UserFunctionError(f"walking the {rows:,} rows of a tensor in Python would pass the "
                                    f"{MAX_ITERATIONS:,} loop iterations; use tensor operations")
        return rows

    # -- builtins and methods --------------------------------------------------------------------------------

    def builtins(self) -> dict[str, Any]:
        """The builtins of a user function, bound to this budget."""
        bounded: dict[str, Any] = {
            "range": self._range, "list": self._list, "tuple": self._tuple, "dict": self._dict,
            "sorted": self._sorted, "sum": self._sum, "min": self._min, "max": self._max,
            "all": lambda items: all(self.items(items)), "any": lambda items: any(self.items(items)),
            "str": self._str, "round": _round,
        }
        types = {bounded["range"]: range, bounded["list"]: list, bounded["tuple"]: tuple, bounded["dict"]: dict,
                 bounded["str"]: str}

        def real(kinds: Any) -> Any:   # isinstance(x, (float, (str, list))) with the types behind the wrappers
            return tuple(real(k) for k in kinds) if isinstance(kinds, tuple) else types.get(kinds, kinds)

        def isinstance_(obj: Any, kinds: Any) -> bool:
            return isinstance(obj, real(kinds))
        return {**bounded, "isinstance": isinstance_}

    def method(self, obj: Any, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """A list/str/dict method, bounded where it can grow a value."""
        if name not in _GROWING_METHODS:
            return method
        if isinstance(obj, list) and name == "extend":
            def extend(items: Any) -> None:
                self.inplace("+=", obj, items)
            return extend
        if isinstance(obj, str) and name == "join":
            return lambda items: self._join(obj, items)
        if isinstance(obj, str) and name == "replace":
            return lambda old, new, count=-1: self._replace(obj, old, new, count)
        if isinstance(obj, dict) and name == "update":
            def update(*args: Any, **kwargs: Any) -> None:
                before = sys.getsizeof(obj)
                obj.update(*(a if isinstance(a, dict) else self.materialize(a) for a in args), **kwargs)
                self.charge_bytes(sys.getsizeof(obj) - before)
            return update
        if isinstance(obj, str) and name == "split":
            def split(*args: Any, **kwargs: Any) -> list[str]:
                parts = self.charge(obj.split(*args, **kwargs))
                self.charge_bytes(_FRESH_ITEM_BYTES * len(parts) + len(obj))
                return parts
            return split
        if name in ("copy", "strip", "lower", "upper"):
            return lambda *args, **kwargs: self.charge(method(*args, **kwargs))
        return method

    def tolist(self, tensor: torch.Tensor) -> Callable[[], Any]:
        def tolist() -> Any:
            if tensor.numel() > MAX_SEQUENCE:
                raise UserFunctionError(f"tolist() of {tensor.numel():,} elements would make more than "
                                        f"{MAX_SEQUENCE:,} Python numbers; keep it a tensor")
            self.charge_bytes(32 * tensor.numel())
            return tensor.tolist()
        return tolist

    def _range(self, *args: Any) -> range:
        items = range(*args)
        try:
            count = len(items)
        except OverflowError:
            count = sys.maxsize
        if count > MAX_ITERATIONS:
            raise UserFunctionError(f"range(...) has {count:,} items, more than the {MAX_ITERATIONS:,} loop "
                                    f"iterations a user function may run; {_HINT} (torch.arange)")
        return items

    def _list(self, items: Any = ()) -> list[Any]:
        return self.materialize(items)

    def _tuple(self, items: Any = ()) -> tuple[Any, ...]:
        return self.charge(tuple(self.materialize(items)))

    def _dict(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        if args and not isinstance(args[0], dict):
            args = (self.materialize(args[0]), *args[1:])
        return self.charge(dict(*args, **kwargs))

    def _sorted(self, items: Any, *, key: Any = None, reverse: bool = False) -> list[Any]:
        values = self.materialize(items)
        values.sort(key=key, reverse=reverse)
        return values

    def _sum(self, items: Any, start: Any = 0) -> Any:
        if isinstance(start, (list, tuple)):   # each step copies the total so far: charge every copy
            total = start
            for item in self.items(items):
                total = self.binop("+", total, item)
            return total
        return sum(self.items(items), start)

    def _min(self, *args: Any, **kwargs: Any) -> Any:
        return min(*(args if len(args) != 1 else (self.items(args[0]),)), **kwargs)

    def _max(self, *args: Any, **kwargs: Any) -> Any:
        return max(*(args if len(args) != 1 else (self.items(args[0]),)), **kwargs)

    def _str(self, *args: Any, **kwargs: Any) -> str:
        if len(args) == 1 and not kwargs and not isinstance(args[0], str):   # str(s) is s itself
            _check_length(repr_size(args[0]), "str()")
        return self.charge(str(*args, **kwargs))

    def _join(self, separator: str, items: Any) -> str:
        parts = self.materialize(items)
        _check_length(sum(len(p) for p in parts if isinstance(p, str)) + len(separator) * len(parts), "str.join")
        return self.charge(separator.join(parts))

    def _replace(self, text: str, old: str, new: str, count: int = -1) -> str:
        if isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
            found = len(text) + 1 if old == "" else text.count(old)
            found = found if count < 0 else min(found, count)
            _check_length(len(text) + found * (len(new) - len(old)), "str.replace")
        return self.charge(text.replace(old, new, count))


def _piece_count(name: str, tensor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """How many tensors split/chunk/unbind will return; 0 where the arguments are not ints (torch refuses)."""
    names = {"split": ("split_size_or_sections", "split_size"), "chunk": ("chunks",)}.get(name, ("dim",))
    first = args[0] if args else next((kwargs[n] for n in names if n in kwargs), None)
    dim = (first if name == "unbind" else args[1] if len(args) > 1 else kwargs.get("dim")) or 0
    try:
        length = tensor.shape[dim] if isinstance(tensor, torch.Tensor) and tensor.dim() else 0
    except (IndexError, TypeError):
        return 0
    if name == "unbind":
        return int(length)
    if isinstance(first, (list, tuple)):
        return len(first)
    if not isinstance(first, int) or first <= 0:
        return 0
    return int(min(first, length)) if name == "chunk" else -(-int(length) // first)


def checked_index(key: Any) -> Any:
    """An index or key (``obj[key]``, ``obj[key] = v``): torch turns nested lists into an index tensor of every
    element, and a dict hashes a tuple key element by element, shared sub-tuples each time they appear."""
    if isinstance(key, CONTAINERS) and not (type(key) is tuple and set(map(type, key)) <= NUMBERS) \
            and item_count(key) > MAX_SEQUENCE:
        raise UserFunctionError(f"an index or key made of nested lists or tuples has more than {MAX_SEQUENCE:,} "
                                "elements (each shared one counted every time); index with a tensor")
    return key


def checked_message(message: Any) -> Any:
    """An assert's message or an exception's argument: it is printed when the error is reported."""
    _check_length(repr_size(message), "an error message")
    return message


def _round(number: Any, ndigits: Any = None) -> Any:
    # round(n, -k) on an int computes 10 ** k first; when 10 ** k > 2 * |n| the answer is 0 anyway
    if isinstance(number, int) and isinstance(ndigits, int) and -ndigits > number.bit_length() + 1:
        return 0
    return round(number, ndigits)


def _check_length(count: int, what: str) -> None:
    if count > MAX_SEQUENCE:
        raise UserFunctionError(f"{what} would build a value of {count:,} items or characters, more than "
                                f"{MAX_SEQUENCE:,}; {_HINT}")


def _check_int_op(op: str, left: int, right: int) -> None:
    if op == "**" and right > 0 and abs(left) > 1:
        bits = math.inf if right > MAX_INT_BITS else right * math.log2(abs(left))
    elif op == "*":
        bits = left.bit_length() + right.bit_length() - 1
    elif op == "<<" and left and right > 0:
        bits = math.inf if right > MAX_INT_BITS else left.bit_length() + right
    else:
        return
    if bits > MAX_INT_BITS:
        _refuse_int(op, bits)


def _refuse_int(op: str, bits: float) -> None:
    size = "" if bits == math.inf else f" of about {int(bits):,} bits,"
    raise UserFunctionError(f"`{op}` would make an int{size} over the {MAX_INT_BITS:,}-bit limit; use floats "
                            "or torch tensors for large numbers")
