"""sc.Model over arbitrary torch modules: trace(*args, **kwargs) calls module(*args, **kwargs).

References are the same module run with raw forward hooks / pre-hooks under no_grad.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import assert_same, capture_inputs, count_calls, hooked, snapshot
from torch import nn

import sandbox_client as sc


class Scale(nn.Module):
    def forward(self, x: torch.Tensor, *, factor: float) -> torch.Tensor:
        return x * factor


class Net(nn.Module):
    """forward(x, y, *, scale=1.0, bias=None): several positional and keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.scale = Scale()
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.a(x + y))
        h = self.scale(h, factor=scale)
        out = self.b(h)
        if bias is not None:
            out = out + bias
        return out


def _t(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def seq() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


X, Y, BIAS = _t(3, 8, seed=10), _t(3, 8, seed=11), _t(4, seed=12)


def run(module: nn.Module, *args: Any, fwd: Any = (), pre: Any = (), **kwargs: Any) -> Any:
    with torch.no_grad(), hooked(fwd, pre):
        return module(*args, **kwargs)


def test_trace_calls_module_with_args_and_kwargs(net: Net, wire: str) -> None:
    model = sc.Model(net)
    with count_calls(net) as calls:
        with model.trace(X, Y, scale=2.0, bias=BIAS):
            out = model.output.save()
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert_same(tuple(args), (X, Y))
    assert_same(kwargs, {"scale": 2.0, "bias": BIAS})
    assert_same(out.value, run(net, X, Y, scale=2.0, bias=BIAS))


def test_save_submodule_outputs_and_inputs(net: Net, wire: str) -> None:
    model = sc.Model(net)
    with model.trace(X, Y, scale=0.5):
        a = model.a.output.save()
        act_in = model.act.input.save()
        scale_inputs = model.scale.inputs.save()
        out = model.output.save()
    captured: dict[str, Any] = {}

    def keep(name: str) -> Any:
        def hook(_m: nn.Module, _a: Any, o: Any) -> None:
            captured[name] = snapshot(o)
        return hook

    expected = run(net, X, Y, scale=0.5, fwd=[(net.a, keep("a"))])
    args, kwargs = capture_inputs(net, net.scale, lambda: net(X, Y, scale=0.5))
    assert_same(a.value, captured["a"])
    assert_same(act_in.value, captured["a"])
    got_args, got_kwargs = scale_inputs.value
    assert_same(tuple(got_args), args)
    assert_same(dict(got_kwargs), kwargs)
    assert kwargs == {"factor": 0.5}
    assert_same(out.value, expected)


def test_inplace_edit_equals_raw_hook(net: Net, wire: str) -> None:
    model = sc.Model(net)
    with model.trace(X, Y, bias=BIAS):
        model.a.output[:, :4] = 0
        out = model.output.save()

    def edit(_m: nn.Module, _a: Any, o: torch.Tensor) -> None:
        o[:, :4] = 0

    expected = run(net, X, Y, bias=BIAS, fwd=[(net.a, edit)])
    assert_same(out.value, expected)
    assert not torch.equal(expected, run(net, X, Y, bias=BIAS))


def test_replacement_equals_raw_hook(net: Net, wire: str) -> None:
    model = sc.Model(net)
    with model.trace(X, Y, scale=3.0):
        model.act.output = model.act.output * -1 + 0.25
        out = model.output.save()
    expected = run(net, X, Y, scale=3.0, fwd=[(net.act, lambda _m, _a, o: o * -1 + 0.25)])
    assert_same(out.value, expected)


def test_input_replacement_equals_raw_pre_hook(net: Net, wire: str) -> None:
    model = sc.Model(net)
    with model.trace(X, Y):
        model.b.input = model.b.input.flip(-1)
        out = model.output.save()
    expected = run(net, X, Y, pre=[(net.b, lambda _m, a: (a[0].flip(-1),) + a[1:])])
    assert_same(out.value, expected)


def test_sequential_indexing_save_and_edit(seq: nn.Sequential, wire: str) -> None:
    model = sc.Model(seq)
    with model.trace(X):
        relu = model[1].output.save()
        model[0].output[:, 0] = 5.0
        out = model.output.save()

    def edit(_m: nn.Module, _a: Any, o: torch.Tensor) -> None:
        o[:, 0] = 5.0

    captured: list[torch.Tensor] = []
    expected = run(seq, X, fwd=[(seq[0], edit), (seq[1], lambda _m, _a, o: captured.append(o.clone()))])
    assert_same(relu.value, captured[0])
    assert_same(out.value, expected)


def test_invokes_concatenate_tensor_args_along_dim0(net: Net, wire: str) -> None:
    x1, y1 = _t(2, 8, seed=20), _t(2, 8, seed=21)
    x2, y2 = _t(3, 8, seed=22), _t(3, 8, seed=23)
    model = sc.Model(net)
    with count_calls(net) as calls:
        with model.trace() as tracer:
            with tracer.invoke(x1, y1):
                s1 = model.a.output.shape.save()
                a1 = model.a.output.save()
                o1 = model.output.save()
            with tracer.invoke(x2, y2):
                model.act.output[:] = 0
                s2 = model.a.output.shape.save()
                o2 = model.output.save()
    assert len(calls) == 1, f"expected one batched forward, got {len(calls)}"
    args, _ = calls[0]
    assert_same(tuple(args[:2]), (torch.cat([x1, x2]), torch.cat([y1, y2])))

    # reference: the same concatenated batch, the edit applied to invoke 2's rows (2:5) only
    captured: list[torch.Tensor] = []

    def edit_rows(_m: nn.Module, _a: Any, o: torch.Tensor) -> None:
        o[2:5] = 0

    expected = run(net, torch.cat([x1, x2]), torch.cat([y1, y2]),
                   fwd=[(net.a, lambda _m, _a, o: captured.append(o.clone())), (net.act, edit_rows)])
    assert tuple(s1.value) == (2, 16) and tuple(s2.value) == (3, 16)
    assert_same(a1.value, captured[0][:2])
    assert_same(o1.value, expected[:2])
    assert_same(o2.value, expected[2:])


def test_invoke_patching_between_generic_invokes(net: Net, wire: str) -> None:
    x1, y1 = _t(2, 8, seed=30), _t(2, 8, seed=31)
    x2, y2 = _t(2, 8, seed=32), _t(2, 8, seed=33)
    model = sc.Model(net)
    with model.trace() as tracer:
        with tracer.invoke(x1, y1):
            src = model.a.output
        with tracer.invoke(x2, y2):
            model.a.output = src * 1.0
            out = model.output.save()
    full_a: list[torch.Tensor] = []
    run(net, torch.cat([x1, x2]), torch.cat([y1, y2]),
        fwd=[(net.a, lambda _m, _a, o: full_a.append(o.clone()))])

    def patch(_m: nn.Module, _a: Any, o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[2:4] = full_a[0][:2]
        return o

    expected = run(net, torch.cat([x1, x2]), torch.cat([y1, y2]), fwd=[(net.a, patch)])
    assert_same(out.value, expected[2:])


def test_wrapping_leaves_module_unchanged(net: Net, wire: str) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plain = run(net, X, Y)
    model = sc.Model(net)
    with model.trace(X, Y):
        model.a.output[:] = 0
        model.output.save()
    for name, module in net.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
    assert_same(net.state_dict(), before)
    assert_same(run(net, X, Y), plain)
