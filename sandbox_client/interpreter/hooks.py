"""Attach the executor to a model for one run, and detach it completely afterwards.

    with HookSession(executor, model):
        model(**inputs)          # hooks fire executor events
    # no hook, wrapper or flag is left on any module

Only modules the graph touches get hooks; the root always gets a pre-hook that counts
forward calls (generation steps). A skipped module's ``forward`` is wrapped for the run.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .executor import Executor


def executor_counts_steps(executor: Executor) -> bool:
    """Generation needs a root pre-hook counting forward calls; a trace has a single step."""
    return executor.graph.kind == "generate"


class HookSession:
    """Context manager installing the hooks one graph run needs."""

    def __init__(self, executor: Executor, root: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> None:
        self.ex = executor
        self.root = root
        self.modules = modules
        self.handles: list[RemovableHandle] = []
        self.wrapped: list[nn.Module] = []
        self.fired: dict[tuple[str, str], int] = {}
        self.grad_paths = {path for (path, kind) in executor.events() if kind == "grad"}

    def __enter__(self) -> HookSession:
        try:
            if executor_counts_steps(self.ex):
                self.handles.append(self.root.register_forward_pre_hook(self._on_root_call, prepend=True))
            else:
                self.ex.begin_step()   # a trace is one forward: step 0, no hook needed to count
            for path, kind in sorted(self.ex.events()):
                self._install(path, kind)
            for path in self.grad_paths:
                if (path, "output") not in self.ex.events():
                    self._install(path, "output")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.wrapped:
            module.__dict__.pop("forward", None)
        self.wrapped.clear()

    def _install(self, path: str, kind: str) -> None:
        if kind in ("grad", "result"):
            return
        module = self.modules[path] if self.modules is not None else self.root.get_submodule(path)
        if kind == "output":
            self.handles.append(module.register_forward_hook(self._output_hook(path)))
        elif kind == "input":
            self.handles.append(module.register_forward_pre_hook(self._input_hook(path), with_kwargs=True))
        elif kind == "skip":
            self._wrap_forward(path, module)

    def _on_root_call(self, module: nn.Module, args: Any) -> None:
        if self.ex.ctx.adhoc_depth == 0:
            self.ex.begin_step()

    def _first_call(self, path: str, kind: str) -> bool:
        if self.ex.ctx.adhoc_depth > 0:
            return False
        key = (path, kind)
        if self.fired.get(key) == self.ex.step:
            return False
        self.fired[key] = self.ex.step
        return True

    def _output_hook(self, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self._first_call(path, "output"):
                return None
            new = self.ex.fire(path, "output", output) if self.ex.wants(path, "output") else output
            if path in self.grad_paths:
                self._watch_grad(path, new)
            return new if new is not output else None
        return hook

    def _input_hook(self, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self._first_call(path, "input"):
                return None
            new = self.ex.fire(path, "input", (args, kwargs))
            return new if new[0] is not args or new[1] is not kwargs else None
        return hook

    def _watch_grad(self, path: str, output: Any) -> None:
        tensor = output if isinstance(output, torch.Tensor) else next(
            (t for t in output if isinstance(t, torch.Tensor)), None) if isinstance(output, (tuple, list)) else None
        if tensor is None or not tensor.requires_grad:
            return
        step = self.ex.step
        tensor.register_hook(lambda grad: self.ex.fire(path, "grad", grad, step=step))

    def _wrap_forward(self, path: str, module: nn.Module) -> None:
        original = module.forward
        ex = self.ex
        session = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not ex.wants(path, "skip") or ex.ctx.adhoc_depth > 0 or not session._first_call(path, "skip"):
                return original(*args, **kwargs)
            parts: list[tuple[slice | None, Any]] = ex.fire(path, "skip", [])
            if any(rows is None for rows, _ in parts) and len(parts) == 1:
                return parts[0][1]
            out = original(*args, **kwargs)
            for rows, value in parts:
                out = ex.ctx.merge(out, value, rows)
            return out

        module.forward = forward
        self.wrapped.append(module)
