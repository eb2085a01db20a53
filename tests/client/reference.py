"""Plain-PyTorch references for the client tests: raw forward hooks, no sandbox_client.

    ids = token_ids(tok, "Hello world")
    out, (h,) = run_hf(hf_model, ids, capture=[layer(hf_model, "gpt2", 1)])
    out2, _ = run_hf(hf_model, ids, fwd=[(mlp(hf_model, "gpt2", 1), lambda m, a, o: o * 2)])

The path helpers (`layer`, `mlp`, `attn`, `norm`, `embed`) are plain getattr/[] chains, so the same call
works on the raw Hugging Face module and on the sandbox_client Envoy tree that mirrors it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# arch -> attribute chains (relative to the root model, or to a decoder layer for mlp/attn)
PATHS: dict[str, dict[str, str]] = {
    "gpt2": {"layers": "transformer.h", "norm": "transformer.ln_f", "embed": "transformer.wte",
             "mlp": "mlp", "attn": "attn"},
    "llama": {"layers": "model.layers", "norm": "model.norm", "embed": "model.embed_tokens",
              "mlp": "mlp", "attn": "self_attn"},
    "qwen2": {"layers": "model.layers", "norm": "model.norm", "embed": "model.embed_tokens",
              "mlp": "mlp", "attn": "self_attn"},
}

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
PreHook = Callable[[nn.Module, tuple[Any, ...]], Any]


def walk(root: Any, dotted: str) -> Any:
    """getattr chain: walk(x, "transformer.ln_f") == x.transformer.ln_f."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def layer(root: Any, arch: str, i: int) -> Any:
    return walk(root, PATHS[arch]["layers"])[i]


def mlp(root: Any, arch: str, i: int) -> Any:
    return walk(layer(root, arch, i), PATHS[arch]["mlp"])


def attn(root: Any, arch: str, i: int) -> Any:
    return walk(layer(root, arch, i), PATHS[arch]["attn"])


def norm(root: Any, arch: str) -> Any:
    return walk(root, PATHS[arch]["norm"])


def embed(root: Any, arch: str) -> Any:
    return walk(root, PATHS[arch]["embed"])


def token_ids(tok: Any, prompt: str) -> torch.Tensor:
    """[1, n] int64 ids exactly as the tokenizer gives them (GPT-2 BPE adds no BOS)."""
    return tok(prompt, return_tensors="pt")["input_ids"]


def snapshot(x: Any) -> Any:
    """Deep copy of the tensors in a (nested) value, so later in-place edits do not reach it."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(snapshot(v) for v in x)
    if isinstance(x, list):
        return [snapshot(v) for v in x]
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    return x


@contextmanager
def hooked(fwd: Sequence[tuple[nn.Module, ForwardHook]] = (),
           pre: Sequence[tuple[nn.Module, PreHook]] = ()) -> Iterator[None]:
    """Register raw hooks (in the given order) for the duration of the block."""
    handles = []
    try:
        for module, pre_fn in pre:
            handles.append(module.register_forward_pre_hook(pre_fn))
        for module, fwd_fn in fwd:
            handles.append(module.register_forward_hook(fwd_fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_hf(model: nn.Module, input_ids: torch.Tensor, *,
           fwd: Sequence[tuple[nn.Module, ForwardHook]] = (),
           pre: Sequence[tuple[nn.Module, PreHook]] = (),
           capture: Sequence[nn.Module] = (),
           **kwargs: Any) -> tuple[Any, list[Any]]:
    """model(input_ids=..., **kwargs) under no_grad with raw hooks.

    fwd/pre hooks run first (they are the edits); then each module in `capture` records a snapshot of
    its (edited) output. Returns (model output, captured outputs in `capture` order).
    """
    store: list[Any] = [None] * len(capture)

    def recorder(k: int) -> ForwardHook:
        def record(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            store[k] = snapshot(out)
        return record

    hooks = list(fwd) + [(m, recorder(k)) for k, m in enumerate(capture)]
    with torch.no_grad(), hooked(hooks, pre):
        out = model(input_ids=input_ids, **kwargs)
    return out, store


def capture_inputs(model: nn.Module, module: nn.Module, call: Callable[[], Any]) -> tuple[Any, Any]:
    """Run call() under no_grad and return (args, kwargs) of module's first call, snapshotted."""
    seen: list[tuple[Any, Any]] = []

    def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not seen:
            seen.append((snapshot(args), snapshot(dict(kwargs))))

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    assert seen, "module was not called"
    return seen[0]


@contextmanager
def count_calls(module: nn.Module) -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Records (args, kwargs) of every forward call of module while the block runs."""
    calls: list[tuple[Any, dict[str, Any]]] = []

    def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, dict(kwargs)))

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def assert_same(actual: Any, expected: Any, *, exact: bool = True, atol: float = 1e-5) -> None:
    """Recursive comparison: tensors bitwise (NaN == NaN) when exact, else allclose(atol, rtol=atol).

    Tuples and lists compare element-wise (a namedtuple such as torch.return_types.topk counts as a
    tuple), dicts key-wise, torch.Size by value and type, other objects with ==, and objects that do not
    define a meaningful == (caches) by type only.
    """
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"expected a tensor, got {type(actual).__name__}"
        assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
        tol = 0.0 if exact else atol
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)
    elif isinstance(expected, torch.Size):
        assert isinstance(actual, torch.Size), f"expected torch.Size, got {type(actual).__name__}"
        assert actual == expected
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"expected a sequence, got {type(actual).__name__}"
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e, exact=exact, atol=atol)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"expected a dict, got {type(actual).__name__}"
        assert set(actual) == set(expected), f"keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], exact=exact, atol=atol)
    elif isinstance(expected, (torch.dtype, torch.device)):
        assert actual == expected, f"{actual!r} != {expected!r}"
    elif expected is None:
        assert actual is None, f"expected None, got {actual!r}"
    elif isinstance(expected, (bool, int, float, str)):
        assert type(actual) is type(expected), f"type {type(actual).__name__} != {type(expected).__name__}"
        both_nan = actual != actual and expected != expected
        assert actual == expected or both_nan, f"{actual!r} != {expected!r}"
    else:
        assert type(actual) is type(expected), f"type {type(actual).__name__} != {type(expected).__name__}"
