"""Proxy operations inside a trace vs the same operations on a raw-hook captured tensor.

Each case is a function f applied once to a proxy inside `lm.trace` (f(layer.output).save()) and once to
the tensor a raw forward hook captured from the same layer; the two must agree bitwise (NaN == NaN).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny
from reference import assert_same, layer, run_hf, token_ids
from torch import nn

import sandbox_client as sc

ARCH = "gpt2"
PROMPT = "The Eiffel Tower is in the city of"  # 10 GPT-2 tokens
WIDTH = 64

_gen = torch.Generator().manual_seed(123)
T = torch.randn(WIDTH, generator=_gen)          # an external tensor (becomes a graph literal)
W = torch.randn(8, WIDTH, generator=_gen)
WT = W.T.contiguous()                           # contiguous: a wire round trip drops strides


@pytest.fixture(scope="module")
def hf() -> nn.Module:
    return build_tiny(ARCH)


@pytest.fixture(scope="module")
def lm(hf: nn.Module, gpt2_tokenizer: Any) -> Any:
    return sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)


@pytest.fixture(scope="module")
def captured(hf: nn.Module, gpt2_tokenizer: Any) -> torch.Tensor:
    """Layer 1's output ([1, 10, 64]) from a raw forward hook."""
    _, (h,) = run_hf(hf, token_ids(gpt2_tokenizer, PROMPT), capture=[layer(hf, ARCH, 1)])
    assert isinstance(h, torch.Tensor) and h.shape == (1, 10, WIDTH)
    return h


Op = Callable[[Any], Any]

ARITHMETIC: dict[str, Op] = {
    "add": lambda h: h + 1.5,
    "sub": lambda h: h - 0.25,
    "mul": lambda h: h * 3,
    "truediv": lambda h: h / 7.0,
    "floordiv": lambda h: h // 0.3,
    "mod": lambda h: h % 0.3,
    "pow": lambda h: h ** 2,
    "matmul": lambda h: h @ WT,
    "proxy_with_proxy": lambda h: h * h + h,
    "radd_float": lambda h: 1.5 + h,
    "rsub_float": lambda h: 1.0 - h,
    "rmul_float": lambda h: 2.0 * h,
    "rtruediv_float": lambda h: 1.0 / h,
    "rfloordiv_float": lambda h: 1.0 // h,
    "rmod_float": lambda h: 1.0 % h,
    "rpow_float": lambda h: 2.0 ** h,
    "radd_tensor": lambda h: T + h,
    "rsub_tensor": lambda h: T - h,
    "rmul_tensor": lambda h: T * h,
    "rtruediv_tensor": lambda h: T / h,
    "rmatmul_tensor": lambda h: W @ h.transpose(1, 2),
}

COMPARISON: dict[str, Op] = {
    "gt": lambda h: h > 0,
    "ge": lambda h: h >= 0.1,
    "lt": lambda h: h < 0,
    "le": lambda h: h <= -0.1,
    "eq": lambda h: h == h[:, :1],
    "ne": lambda h: h != 0,
    "gt_tensor": lambda h: h > T,
}

UNARY: dict[str, Op] = {
    "neg": lambda h: -h,
    "pos": lambda h: +h,
    "abs": lambda h: abs(h),
    "invert_bool": lambda h: ~(h > 0),
}

GETITEM: dict[str, Op] = {
    "int": lambda h: h[0],
    "int_int": lambda h: h[0, 3],
    "negative_int": lambda h: h[:, -1],
    "slice": lambda h: h[:, 2:5],
    "slice_step": lambda h: h[0, ::2, 1:-1:3],
    "ellipsis": lambda h: h[..., 0],
    "ellipsis_slice": lambda h: h[..., 5:9],
    "none": lambda h: h[None, 0],
    "none_middle": lambda h: h[:, None, 2],
    "list": lambda h: h[:, [0, 3, 1]],
    "tensor_index": lambda h: h[:, torch.tensor([1, 2])],
    "bool_mask": lambda h: h[h > 0],
    "proxy_index": lambda h: h[0, h[0, :, 0].argmax()],
    "chained": lambda h: h[0][-1][:4],
}


def _setter(fn: Callable[[Any], None]) -> Op:
    def op(h: Any) -> Any:
        x = h.clone()
        fn(x)
        return x
    return op


def _set(x: Any, key: Any, value: Any) -> None:
    x[key] = value


SETITEM_EDITS: dict[str, Callable[[Any], None]] = {
    "int": lambda x: _set(x, (0, 1), 1.0),
    "slice": lambda x: _set(x, (slice(None), slice(2, 5)), 0.0),
    "ellipsis": lambda x: _set(x, (Ellipsis, 0), 1.0),
    "none": lambda x: _set(x, (None, 0, 0), 2.0),
    "list": lambda x: _set(x, (slice(None), [0, 3]), -1.0),
    "bool_mask": lambda x: _set(x, x > 0, 0.0),
    "proxy_index": lambda x: _set(x, (0, x[0, :, 0].argmax()), 0.0),
    "proxy_value": lambda x: _set(x, (slice(None), -1), x[:, 0]),
    "tensor_value": lambda x: _set(x, (0, 0), T),
}
SETITEM: dict[str, Op] = {name: _setter(fn) for name, fn in SETITEM_EDITS.items()}

METHODS: dict[str, Op] = {
    "sum_dim": lambda h: h.sum(dim=-1),
    "sum_keepdim": lambda h: h.sum(dim=-1, keepdim=True),
    "softmax": lambda h: h.softmax(-1),
    "argmax": lambda h: h.argmax(),
    "argmax_dim": lambda h: h.argmax(dim=-1),
    "topk": lambda h: h.topk(3),
    "topk_values": lambda h: h.topk(3).values,
    "topk_indices": lambda h: h.topk(3, dim=1).indices,
    "clone": lambda h: h.clone(),
    "detach": lambda h: h.detach(),
    "to_float64": lambda h: h.to(torch.float64),
    "to_dtype_kwarg": lambda h: h.to(dtype=torch.bfloat16),
    "norm": lambda h: h.norm(),
    "norm_dim": lambda h: h.norm(dim=-1),
    "mean": lambda h: h.mean(),
    "view": lambda h: h.view(-1, WIDTH),
    "reshape": lambda h: h.reshape(-1, 8, 8),
    "reshape_proxy_size": lambda h: h.reshape(h.shape[1], -1),
    "transpose": lambda h: h.transpose(1, 2),
    "exp_max": lambda h: h.exp().max(),
    "attribute_dtype": lambda h: h.dtype,
    "attribute_mT": lambda h: h.mT,
    "shape": lambda h: h.shape,
    "shape_item": lambda h: h.shape[1],
    "size": lambda h: h.size(-1),
}

TORCH_FUNCTIONS: dict[str, Op] = {
    "cat": lambda h: torch.cat([h, h * 2], dim=-1),
    "cat_with_tensor": lambda h: torch.cat([h, T.view(1, 1, WIDTH)], dim=1),
    "stack": lambda h: torch.stack([h, -h]),
    "softmax": lambda h: F.softmax(h, dim=-1),
    "gelu": lambda h: F.gelu(h),
    "layer_norm": lambda h: F.layer_norm(h, (WIDTH,)),
    "cosine_similarity": lambda h: F.cosine_similarity(h[:, 0], h[:, -1], dim=-1),
    "einsum": lambda h: torch.einsum("bsd,btd->bst", h, h),
    "where_float": lambda h: torch.where(h > 0, h, 0.0),
    "where_tensor": lambda h: torch.where(h > 0, h, T),
    "matmul": lambda h: torch.matmul(h, WT),
    "zeros_like": lambda h: torch.zeros_like(h) + 1,
}

FACTORIES: dict[str, Op] = {
    "zeros_plus_proxy": lambda h: h + torch.zeros(WIDTH),
    "arange_index": lambda h: h[:, torch.arange(2)],
    "arange_times_proxy": lambda h: torch.arange(WIDTH, dtype=torch.float32) * h,
    "ones_matmul": lambda h: h @ torch.ones(WIDTH, 4),
}

ALL_OPS: dict[str, Op] = {}
for _group, _ops in [("arith", ARITHMETIC), ("cmp", COMPARISON), ("unary", UNARY), ("getitem", GETITEM),
                     ("setitem", SETITEM), ("method", METHODS), ("torch", TORCH_FUNCTIONS),
                     ("factory", FACTORIES)]:
    for _name, _op in _ops.items():
        ALL_OPS[f"{_group}-{_name}"] = _op


@pytest.mark.parametrize("name", list(ALL_OPS))
def test_op_matches_torch_on_captured(name: str, lm: Any, captured: torch.Tensor, wire: str) -> None:
    op = ALL_OPS[name]
    with lm.trace(PROMPT):
        result = op(layer(lm, ARCH, 1).output).save()
    expected = op(captured.clone())
    assert_same(result.value, expected)


@pytest.mark.parametrize("name", list(SETITEM_EDITS))
def test_setitem_on_module_output_equals_raw_hook(name: str, lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                  wire: str) -> None:
    """The same index forms used as in-place edits of a live module output change the logits alike."""
    edit = SETITEM_EDITS[name]
    with lm.trace(PROMPT):
        edit(layer(lm, ARCH, 1).output)
        logits = lm.output.logits.save()

    def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
        edit(out)

    expected, _ = run_hf(hf, token_ids(gpt2_tokenizer, PROMPT), fwd=[(layer(hf, ARCH, 1), hook)])
    assert_same(logits.value, expected.logits)


def test_shape_is_torch_size(lm: Any, captured: torch.Tensor, wire: str) -> None:
    with lm.trace(PROMPT):
        shape = layer(lm, ARCH, 1).output.shape.save()
    assert type(shape.value) is torch.Size
    assert shape.value == captured.shape


def test_topk_unpacking(lm: Any, hf: nn.Module, gpt2_tokenizer: Any, wire: str) -> None:
    with lm.trace(PROMPT):
        values, indices = lm.output.logits[0, -1].topk(5)
        values.save()
        indices.save()
    out, _ = run_hf(hf, token_ids(gpt2_tokenizer, PROMPT))
    expected = out.logits[0, -1].topk(5)
    assert_same(values.value, expected.values)
    assert_same(indices.value, expected.indices)


def _probe() -> nn.Linear:
    probe = nn.Linear(WIDTH, 3)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(5)))
        probe.bias.copy_(torch.randn(3, generator=torch.Generator().manual_seed(6)))
    return probe.requires_grad_(False)


def test_chained_ops_pipeline(lm: Any, captured: torch.Tensor, wire: str) -> None:
    probe = _probe()

    def pipeline(h: Any) -> Any:
        z = (h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + 1e-5)
        return F.softmax(F.linear(z[:, -1], probe.weight, probe.bias), dim=-1).argmax(dim=-1)

    with lm.trace(PROMPT):
        result = pipeline(layer(lm, ARCH, 1).output).save()
    with torch.no_grad():
        expected = pipeline(captured.clone())
    assert_same(result.value, expected)


def test_user_linear_probe_on_activation(lm: Any, captured: torch.Tensor, wire: str) -> None:
    """A user's own nn.Linear (not part of the model) applied to a proxy (peers' behaviour 8)."""
    probe = _probe()
    with lm.trace(PROMPT):
        result = probe(layer(lm, ARCH, 1).output[:, -1]).save()
    with torch.no_grad():
        expected = probe(captured[:, -1])
    assert_same(result.value, expected)
