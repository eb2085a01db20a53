"""User functions under RestrictedPython: hostile sources are refused, ordinary ones run."""
from __future__ import annotations

import time

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
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_user_function_refused(name: str) -> None:
    source = HOSTILE[name]
    with pytest.raises((UserFunctionError, NameError)):
        compile_user_function(source)(torch.ones(3))


def test_long_loop_hits_the_iteration_budget() -> None:
    fn = compile_user_function("def f(x):\n    t = 0\n    for i in range(10**9):\n        t += 1\n    return t\n")
    start = time.monotonic()
    with pytest.raises(UserFunctionError, match="iterations"):
        fn(1)
    assert time.monotonic() - start < 10


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


def test_check_source_returns_the_name() -> None:
    assert check_source("def my_probe(x):\n    return x\n") == "my_probe"
