"""User functions under RestrictedPython: hostile sources are refused, ordinary ones run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from validator.restricted import UserFunctionError, check_source, compile_user_function

HOSTILE = {
    "dunder_class": "def f(x):\n    return x.__class__\n",
    "subclasses": "def f(x):\n    return ().__class__.__bases__[0].__subclasses__()\n",
    "globals": "def f(x):\n    return f.__globals__\n",
    "builtins": "def f(x):\n    return __builtins__\n",
    "code": "def f(x):\n    return f.__code__\n",
    "import": "def f(x):\n    import os\n    return os\n",
    "from_import": "def f(x):\n    from os import system\n    return system\n",
    "dunder_import": "def f(x):\n    return __import__('os')\n",
    "eval": "def f(x):\n    return eval('1+1')\n",
    "exec": "def f(x):\n    exec('y = 1')\n",
    "open": "def f(x):\n    return open('/etc/passwd').read()\n",
    "type": "def f(x):\n    return type(x)\n",
    "vars": "def f(x):\n    return vars(x)\n",
    "getattr_computed": "def f(x):\n    return getattr(x, 'stor' + 'age')()\n",
    "format_attack": "def f(x):\n    return '{0.__class__}'.format(x)\n",
    "format_map": "def f(x):\n    return '{a}'.format_map({'a': x})\n",
    "fstring": "def f(x):\n    return f'{x!r}'\n",
    "generator_frame": "def f(x):\n    g = (i for i in range(3))\n    return g.gi_frame.f_globals\n",
    "yield": "def f(x):\n    yield x\n",
    "lambda": "def f(x):\n    g = lambda: 1\n    return g\n",
    "class": "def f(x):\n    class A:\n        pass\n    return A\n",
    "while_forever": "def f(x):\n    while True:\n        pass\n",
    "try_swallow": "def f(x):\n    try:\n        return 1\n    except Exception:\n        return 2\n",
    "global": "def f(x):\n    global y\n    y = 1\n",
    "nested_def": "def f(x):\n    def g():\n        return 1\n    return g\n",
    "decorator": "@staticmethod\ndef f(x):\n    return x\n",
    "two_statements": "import os\ndef f(x):\n    return x\n",
    "storage": "def f(x):\n    return x.storage()\n",
    "untyped_storage": "def f(x):\n    return x.untyped_storage()\n",
    "data_ptr": "def f(x):\n    return x.data_ptr()\n",
    "numpy": "def f(x):\n    return x.numpy()\n",
    "tofile": "def f(x):\n    x.tofile('/tmp/x')\n",
    "cuda": "def f(x):\n    return x.cuda()\n",
    "torch_load": "def f(x):\n    return torch.load('/tmp/x')\n",
    "torch_save": "def f(x):\n    torch.save(x, '/tmp/x')\n",
    "torch_ops": "def f(x):\n    return torch.ops.aten.add(x, x)\n",
    "torch_hub": "def f(x):\n    return torch.hub.load('a', 'b')\n",
    "torch_empty": "def f(x):\n    return torch.empty(10)\n",
    "huge_zeros": "def f(x):\n    return torch.zeros(10**12)\n",
    "huge_zeros_tuple": "def f(x):\n    return torch.ones((100000, 100000))\n",
    "factory_device": "def f(x):\n    return torch.zeros(3, device='cuda')\n",
    "setattr": "def f(x):\n    setattr(x, 'a', 1)\n",
    "private_name": "def f(x):\n    _y = 1\n    return _y\n",
    "syntax": "def f(x) return x\n",
    "huge_source": "def f(x):\n    return x\n" + "#" * 30_000,
    # the names restricted.py inserts for its size guards start with `_`: user code can neither call nor shadow them
    "guard_call": "def f(x):\n    return _bounded_binop_('*', [0], 10**9)\n",
    "guard_shadow": "def f(x):\n    _bounded_binop_ = None\n    return [0] * 10**9\n",
    "guard_argument": "def f(x, _bounded_binop_=None):\n    return x\n",
    "guard_getitem": "def f(x):\n    return _getitem_\n",
}

_ALIASED = "a = [0] * 1000\n    b = [a] * 1000\n    c = [b] * 1000\n    "   # 10**9 items when expanded
_KEEP = "keep = []\n    for i in range(10**6):\n        keep.append({})\n    return len(keep)"
#: one expression (or a short loop of bounded ones) that would take gigabytes or minutes: each must raise
#: UserFunctionError within a second, allocating next to nothing (body of ``def f(x)``, x = torch.ones(3))
HOSTILE_SIZES = {
    "int_power_tower": "return 10 ** 10 ** 8",
    "int_power_huge_exponent": "return 3 ** 10**400",
    "int_shift": "return 1 << 10**10",
    "int_square_loop": "y = 3\n    for i in range(40):\n        y = y * y\n    return y",
    "int_square_augmented": "y = 3\n    for i in range(40):\n        y *= y\n    return y",
    "int_power_augmented": "y = 10\n    y **= 10**8\n    return y",
    "list_repeat": "return [0] * 10**9",
    "list_repeat_reflected": "return 10**9 * [0]",
    "list_repeat_by_tensor": "return [0] * (x.sum().long() + 10**9)",
    "str_repeat": "return 'x' * 10**10",
    "bytes_repeat": "return len(str(b'x' * 10**10))",
    "tuple_repeat": "return (0,) * 10**9",
    "list_doubling": "y = [0]\n    for i in range(40):\n        y = y + y\n    return y",
    "list_doubling_augmented": "y = [0]\n    for i in range(40):\n        y += y\n    return y",
    "list_repeat_augmented": "y = [0]\n    y *= 10**9\n    return y",
    "str_doubling": "y = 'ab'\n    for i in range(40):\n        y = y + y\n    return len(y)",
    "extend_doubling": "y = [0]\n    for i in range(40):\n        y.extend(y)\n    return y",
    "list_range": "return list(range(10**9))",
    "sorted_range": "return sorted(range(10**9))",
    "tuple_range": "return tuple(range(10**9))",
    "sum_range": "return sum(range(10**12))",
    "sum_of_lists": "return sum([[0] * 10**5] * 10**5, [])",
    "sum_of_many_short_lists": "return len(sum([[0]] * 10**6, []))",
    "unpack_repeated": "a = [0] * 10**6\n    return [" + "*a, " * 200 + "]",
    "unpack_dict_repeated": "a = {i: i for i in range(10**5)}\n    return {" + "**a, " * 2000 + "}",
    "join_repeated": "s = 'x' * 10**6\n    return ''.join([s] * 10**6)",
    "replace_empty": "s = 'x' * 10**5\n    return s.replace('', s)",
    "format_width": "return '%999999999d' % 1",
    "format_star_width": "return '%*d' % (10**9, 1)",
    "format_many_fields": "return ('%9999s' * 10**5) % (('',) * 10**5)",
    "format_aliased_list": _ALIASED + "return '%s' % (c,)",
    "str_of_aliased_list": _ALIASED + "return len(str(c))",
    "return_aliased_list": _ALIASED + "return c",
    "error_message_aliased": _ALIASED + "raise ValueError(c)",
    "assert_message_aliased": _ALIASED + "assert False, c",
    "tensor_index_aliased": _ALIASED + "return x[c]",
    "tensor_store_index_aliased": _ALIASED + "x[c] = 1\n    return x",
    "dict_key_aliased": "t = (0,) * 1000\n    t = (t,) * 1000\n    t = (t,) * 1000\n    d = {}\n    d[t] = 1\n"
                        "    return d[t]",
    # each step is within bounds, the loop is not: the budget of all guarded values adds up
    "keep_bounded_lists": _KEEP.format("[0] * 10**6"),
    "keep_slices": "a = [0] * 10**6\n    " + _KEEP.format("a[:]"),
    "keep_strings": "s = 'x' * 10**6\n    " + _KEEP.format("s.upper()"),
    "list_of_tensor_rows": "return list(torch.zeros(2**21))",
    "sum_of_tensor_rows": "return sum(torch.zeros(2**21))",
    "tolist": "return torch.zeros(2**21).tolist()",
    "arange_float_bounds": "return torch.arange(0.0, 1e12, 1.0)",
    "linspace_steps": "return torch.linspace(0, 1, 10**10)",
    "eye_square": "return torch.eye(10**6)",
    "tensor_of_shared_rows": _ALIASED + "return torch.tensor(c)",
    "split_into_scalars": "return len(torch.zeros(2**21).split(1))",
    "unbind_function": "return len(torch.unbind(torch.zeros(2**21)))",
    "split_keyword": "return len(torch.zeros(2**21).split(split_size=1))",
    "split_function_keyword": "return len(torch.split(torch.zeros(2**21), split_size_or_sections=1, dim=0))",
    "split_many_pieces": "return len(x.reshape(-1)[0:1].expand(200000).split(1))",
    "chunk_expanded": "return len(x.reshape(-1)[0:1].expand(2**21).chunk(2**21))",
}

_SIZE_RUNNER = r"""
import json, resource, sys, time, tracemalloc
import torch
from validator.restricted import UserFunctionError, compile_user_function

# a regression must die here with MemoryError, not take the test machine with it
with open("/proc/self/status") as status:
    used = int(status.read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + 2**31, used + 2**31))

def run(source):
    try:
        compile_user_function(source, deadline=time.monotonic() + 10)(torch.ones(3))
    except UserFunctionError as err:
        return "UserFunctionError", str(err)
    except BaseException as err:
        return type(err).__name__, str(err)[:300]
    return "returned", ""

results = {}
for name, source in json.load(sys.stdin).items():
    start = time.perf_counter()
    kind, message = run(source)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    run(source)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    results[name] = [kind, message, seconds, peak]
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def size_results() -> dict[str, list[Any]]:
    """HOSTILE_SIZES run in one child process under an address-space limit: {name: [error, message, s, peak bytes]}."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to size the child's memory limit")
    sources = {name: "def f(x):\n    " + body + "\n" for name, body in HOSTILE_SIZES.items()}
    done = subprocess.run([sys.executable, "-c", _SIZE_RUNNER], input=json.dumps(sources), capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_user_function_refused(name: str) -> None:
    source = HOSTILE[name]
    with pytest.raises((UserFunctionError, NameError)):
        compile_user_function(source)(torch.ones(3))


@pytest.mark.parametrize("name", sorted(HOSTILE_SIZES))
def test_oversized_value_refused_quickly(name: str, size_results: dict[str, list[Any]]) -> None:
    kind, message, seconds, peak = size_results[name]
    assert kind == "UserFunctionError", f"{name}: {kind}: {message}"
    assert seconds < 1.0, f"{name} took {seconds:.2f} s before it was refused"
    assert peak < 100 * 2**20, f"{name} allocated {peak / 2**20:.0f} MiB of Python objects before it was refused"


def test_long_loop_hits_the_iteration_budget() -> None:
    fn = compile_user_function("def f(x):\n    t = 0\n    for i in range(10**6):\n        for j in range(10):\n"
                               "            t += 1\n    return t\n")
    start = time.monotonic()
    with pytest.raises(UserFunctionError, match="iterations"):
        fn(1)
    assert time.monotonic() - start < 10


def test_huge_range_is_refused_before_it_runs() -> None:
    with pytest.raises(UserFunctionError, match="iterations"):
        compile_user_function("def f(x):\n    for i in range(10**9):\n        pass\n")(1)


def test_deadline_stops_a_loop() -> None:
    fn = compile_user_function("def f(x):\n    for i in range(10**6):\n        x = x + 1\n    return x\n",
                               deadline=time.monotonic() - 1)
    with pytest.raises(UserFunctionError, match="time limit"):
        fn(torch.zeros(1))


def test_weight_writes_are_checked() -> None:
    weight = torch.ones(3)

    def check(obj: object) -> None:
        if obj is weight:
            raise PermissionError("weight")

    fn = compile_user_function("def f(w):\n    w[0] = 5\n    return w\n", check_writable=check)
    with pytest.raises(PermissionError):
        fn(weight)
    fn2 = compile_user_function("def f(w):\n    return w.add_(1)\n", check_writable=check)
    with pytest.raises(PermissionError):
        fn2(weight)
    assert torch.equal(weight, torch.ones(3))


def test_augmented_assignment_on_tensor_does_not_write_in_place() -> None:
    x = torch.ones(3)
    out = compile_user_function("def f(x):\n    x += 1\n    return x\n")(x)
    assert torch.equal(x, torch.ones(3)) and torch.equal(out, torch.full((3,), 2.0))


def test_ordinary_function_runs_like_python() -> None:
    source = (
        "def f(h, k):\n"
        "    scores = F.softmax(h, -1)\n"
        "    best = {}\n"
        "    for i, row in enumerate(scores):\n"
        "        best[i] = int(row.argmax())\n"
        "    picked = [scores[i, j] for i, j in best.items() if j < k]\n"
        "    return torch.stack(picked).sum() if picked else torch.zeros(1, dtype=torch.float32)\n"
    )
    h = torch.randn(4, 6)
    got = compile_user_function(source)(h, 6)
    scores = torch.softmax(h, -1)
    expected = torch.stack([scores[i, int(scores[i].argmax())] for i in range(4)]).sum()
    assert torch.equal(got, expected)


def test_large_guarded_operation_checks_the_deadline() -> None:
    fn = compile_user_function("def f(x):\n    s = [0] * 10**5\n    return len(s + s)\n",
                               deadline=time.monotonic() - 1)
    with pytest.raises(UserFunctionError, match="time limit"):
        fn(1)


def test_size_guards_are_compiled_in() -> None:
    fn = compile_user_function("def f(a, b):\n    return a * b + a ** b\n")
    assert "_bounded_binop_" in fn.__wrapped__.__code__.co_names   # type: ignore[attr-defined]


#: ordinary code, run both under the guards and as plain Python: same result
ORDINARY = {
    "int_arithmetic": "return (3 ** 40) * 7 + (1 << 100) % 13 - 5 // 2 + 2 ** -1 + (-3) ** 3 + 0 ** 0",
    "int_at_the_bound": "return [(1 << 16383) + (2 ** 16383 - 1), (2 ** 8191) * (2 ** 8191 + 1), 3 ** 10000]",
    "big_int_sum": "return sum([2 ** 1000] * 1000)",
    "float_arithmetic": "return 1.5 * 2 + 2.0 ** 0.5 + 7 % 2.5 + 1e300 * 10",
    "list_building": "y = [0.0] * 4096 + [1.0]\n    y += [2.0]\n    y *= 2\n    return y",
    "list_at_the_bound": "return len([0] * 10**6)",
    "range_loop": "t = []\n    for i in range(10):\n        t.append(i * i)\n    return t",
    "builtins": "return [list(range(5)), tuple(range(3)), sorted([3, 1, 2], reverse=True), sum(range(10)), "
                "sum([[1], [2]], []), sum([(1,), (2,)], ()), min([4, 2]), max(4, 7), min((), default=0), "
                "all([1, 1]), any([]), dict(zip('ab', range(2)), c=3), list(enumerate('xy')), "
                "list(reversed([1, 2])), round(1234, -2), round(5, -100), round(2.567, 2), abs(-3)]",
    "strings": "s = 'ab' * 3 + 'c'\n    return [s, ', '.join(['a', 'b']), 'a,b'.split(','), s.replace('a', 'xyz'), "
               "s.upper(), ' s '.strip(), str([1, 'a', (2.5, None)]), str(), "
               "'%d-%s-%5.1f|%-4s|%%' % (3, 'a', 2.25, 'x'), '%(k)s' % {'k': [1]}, b'%s' % b'x', str(b'ab', 'ascii')]",
    "isinstance": "return [isinstance([], list), isinstance('a', (int, str)), isinstance(range(3), range), "
                  "isinstance((), tuple), isinstance({}, dict), isinstance(1, (float, (str, int))), "
                  "isinstance(ValueError('a'), ValueError)]",
    "unpacking": "a = [1, 2]\n    d = {'k': 1}\n    return [[*a, *a], (*a, 0), {**d, 'j': 2}, {*a}]",
    "slicing": "a = list(range(10))\n    return [a[2:5], a[::-1], 'hello'[1:3], (1, 2, 3)[:2]]",
    "copies": "a = [1]\n    b = a.copy()\n    b.extend([2, 3])\n    b.extend(range(2))\n    d = {1: 2}\n"
              "    d.update({3: 4})\n    d.update([(5, 6)], z=1)\n    return [a, b, d, d.copy()]",
    "long_strings": "s = 'x' * 500000\n    return [len(str(s)), len('%s|' % s), len(s + s), len(s.upper())]",
    "aliased_but_small": "a = [0] * 10\n    b = [a] * 10\n    return [b, str(b), len('%s' % (b,))]",
    "tensor_rows": "return [len(list(x)), float(sum(x)), x.tolist(), max(x).item()]",
    "factories": "return [torch.full((3,), 10**9).tolist(), torch.tensor([[1, 2], [3, 4]]).tolist(), "
                 "torch.arange(0.0, 2.0, 0.5).tolist(), torch.zeros((2, 3)).shape, torch.eye(2).tolist()]",
    "tensor_pieces": "return [[p.tolist() for p in x.split(2)], [p.tolist() for p in torch.split(x, [1, 2])], "
                     "len(x.chunk(2)), len(torch.chunk(x, 5)), [p.item() for p in x.unbind(0)], "
                     "len(torch.unbind(x.reshape(1, 3), dim=1)), len(x.split(split_size=1))]",
}


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_ordinary_code_runs_exactly_as_python(name: str) -> None:
    source = "def f(x):\n    " + ORDINARY[name] + "\n"
    reference: dict[str, Any] = {"torch": torch, "F": torch.nn.functional}
    exec(source, reference)   # the same source as plain Python: trusted test input
    x = torch.tensor([1.0, 2.0, 3.0])
    assert compile_user_function(source)(x) == reference["f"](x)


def test_tensor_arithmetic_is_untouched() -> None:
    source = ("def f(x, w):\n    y = x ** 2 * 0.5 + 2 * x - x / 3 + (x @ w) % 2\n    y += 1\n    y *= x\n"
              "    y **= 2\n    z = [1.0, 2.0] * x.shape[0]\n"
              "    return y, z, x[1].long() * [1, 2], x.long()[0:1].sum() * 'ab'\n")
    x, w = torch.arange(2.0), torch.ones(2, 2)
    y, z, repeated, text = compile_user_function(source)(x, w)
    expected = x ** 2 * 0.5 + 2 * x - x / 3 + (x @ w) % 2
    expected = ((expected + 1) * x) ** 2
    assert torch.equal(y, expected) and torch.equal(x, torch.arange(2.0))
    assert z == [1.0, 2.0] * 2 and repeated == [1, 2] and text == ""


@pytest.mark.parametrize("call", [
    "torch.zeros(2, 3)", "torch.ones((2, 3))", "torch.zeros(size=[4, 5])", "torch.full((3,), 10**9)",
    "torch.rand(x.shape)", "torch.randn(5, dtype=torch.float64)", "torch.randint(10, (3, 4))",
    "torch.randint(0, 10**9, size=(6,))", "torch.linspace(0, 1, 11)", "torch.eye(3, 5)", "torch.eye(n=4)",
    "torch.arange(10)", "torch.arange(0.0, 2.0, 0.25)", "torch.tensor([[1, 2], [3, 4]])",
])
def test_factory_bound_is_exact(call: str) -> None:
    source = f"def f(x):\n    return {call}\n"
    x = torch.ones(2, 7)
    numel = compile_user_function(source)(x).numel()
    assert compile_user_function(source, max_factory_elements=numel)(x).numel() == numel
    with pytest.raises(UserFunctionError, match="factory call"):
        compile_user_function(source, max_factory_elements=numel - 1)(x)


def test_short_error_messages_pass_through() -> None:
    with pytest.raises(ValueError, match="bad shape"):
        compile_user_function("def f(x):\n    raise ValueError('bad shape', [1, 2])\n")(1)
    with pytest.raises(AssertionError, match="too small"):
        compile_user_function("def f(x):\n    assert x > 3, 'too small'\n")(1)


def test_check_source_returns_the_name() -> None:
    assert check_source("def my_probe(x):\n    return x\n") == "my_probe"
