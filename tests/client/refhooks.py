"""Raw-torch references for gradients, generation, skip and memory tests (no sandbox_client here).

    out, g = grad_of(hf, layer(hf, "gpt2", 1), lambda o: o.logits[0, -1, 42], ids)
    tokens, per_call = generate_capturing(hf, ids, 3, layer(hf, "gpt2", 1))
    with hook_inventory_unchanged(hf): ...

Path helpers (`layer`, `mlp`, `norm`, ...), `run_hf` and `count_calls` live in reference.py and are
re-exported here.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from reference import PATHS, attn, count_calls, layer, mlp, norm, run_hf, snapshot, token_ids, walk
from torch import nn

__all__ = [
    "PATHS", "attn", "layer", "mlp", "norm", "walk", "snapshot", "run_hf", "count_calls", "token_ids",
    "PROMPT_IDS", "OTHER_IDS",
    "grad_of", "generate_capturing", "module_hooks", "assert_no_hooks", "params_snapshot",
    "assert_params_equal", "WeakOutputs", "identity_forward", "constant_forward",
]

# Two 9-token GPT-2 BPE id sequences ('The Eiffel Tower is in the city of' / '... Colosseum ...').
PROMPT_IDS = torch.tensor([[464, 46660, 36, 8765, 318, 287, 262, 1748, 286]])
OTHER_IDS = torch.tensor([[464, 1623, 418, 325, 388, 318, 287, 262, 1748]])


def grad_of(model: nn.Module, modules: list[nn.Module], loss_fn: Callable[[Any], torch.Tensor],
            input_ids: torch.Tensor,
            grad_hooks: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
            **kwargs: Any) -> tuple[Any, list[torch.Tensor]]:
    """Forward with grad enabled, retain_grad() on each module's output, loss_fn(output).backward().

    grad_hooks maps an index into `modules` to a tensor hook (register_hook) placed on that module's
    output, i.e. a function that may return a replacement gradient. Parameter .grad is reset to None
    afterwards so the reference leaves no trace on the model.
    """
    outputs: list[Any] = [None] * len(modules)
    hooks = grad_hooks or {}

    def keep(k: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
            out.retain_grad()
            if k in hooks:
                out.register_hook(hooks[k])
            outputs[k] = out
        return hook

    handles = [m.register_forward_hook(keep(k)) for k, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            out = model(input_ids=input_ids, **kwargs)
            loss_fn(out).backward()
    finally:
        for h in handles:
            h.remove()
    for p in model.parameters():
        p.grad = None
    grads = [o.grad.detach().clone() for o in outputs]
    return out, grads


def generate_capturing(model: Any, input_ids: torch.Tensor, max_new_tokens: int,
                       capture: nn.Module | None = None,
                       edit: tuple[nn.Module, Callable[[int, Any], Any]] | None = None,
                       ) -> tuple[torch.Tensor, list[Any]]:
    """Greedy hf generate; returns (token ids, snapshot of `capture`'s output at each forward call).

    edit = (module, fn): a forward hook on module calling fn(call_index, output); a non-None return
    replaces the output (call_index 0 is the prompt forward). The edit runs before the capture.
    """
    calls: list[Any] = []
    counter = [0]
    handles = []
    if edit is not None:
        emod, efn = edit

        def edit_hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            k = counter[0]
            counter[0] += 1
            return efn(k, out)

        handles.append(emod.register_forward_hook(edit_hook))
    if capture is not None:
        handles.append(capture.register_forward_hook(lambda _m, _a, out: calls.append(snapshot(out))))
    try:
        with torch.no_grad():
            tokens = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return tokens, calls


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def module_hooks(model: nn.Module) -> dict[str, dict[str, int]]:
    """{module name: {hook dict name: size}} for every non-empty hook dict, plus global module hooks."""
    found: dict[str, dict[str, int]] = {}
    for name, mod in model.named_modules():
        sizes = {d: len(getattr(mod, d)) for d in HOOK_DICTS if len(getattr(mod, d, {}))}
        if "forward" in mod.__dict__:
            sizes["instance forward attribute"] = 1
        if sizes:
            found[name or "<root>"] = sizes
    g = torch.nn.modules.module
    for d in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
              "_global_backward_pre_hooks"):
        if len(getattr(g, d, {})):
            found.setdefault("<global>", {})[d] = len(getattr(g, d))
    return found


def assert_no_hooks(model: nn.Module) -> None:
    found = module_hooks(model)
    assert not found, f"hooks or patched forwards left on the model: {found}"


def params_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer."""
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def assert_params_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = params_snapshot(model)
    assert now.keys() == before.keys()
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert not changed, f"model tensors changed: {changed[:5]}"


class WeakOutputs:
    """Forward hooks that keep only a weakref to each module's output, and count live earlier outputs.

        with WeakOutputs(layers) as w: model(ids)
        w.alive() -> indices whose output tensor is still referenced somewhere
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.refs: list[weakref.ref[torch.Tensor] | None] = [None] * len(modules)
        self.live_earlier: list[int] = []  # at module k's hook: live outputs among modules < k - 1
        self.handles: list[Any] = []

    def _hook(self, k: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
            assert isinstance(out, torch.Tensor)
            self.refs[k] = weakref.ref(out)
            self.live_earlier.append(sum(1 for r in self.refs[:k] if r is not None and r() is not None))
        return hook

    def alive(self) -> list[int]:
        return [k for k, r in enumerate(self.refs) if r is not None and r() is not None]

    def __enter__(self) -> WeakOutputs:
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def identity_forward(module: nn.Module) -> Iterator[None]:
    """Replace module.forward by `return first positional arg` (the module is not run)."""
    module.forward = lambda hidden_states, *a, **k: hidden_states  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward


@contextmanager
def constant_forward(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """Replace module.forward by `return value` (the module is not run)."""
    module.forward = lambda *a, **k: value  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward
