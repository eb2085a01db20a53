"""The module tree seen from a trace: ``lm.model.layers[5].mlp`` mirrors ``named_modules()``.

    with lm.trace("Hello"):
        out = lm.model.layers[5].output.save()     # read
        lm.model.layers[3].mlp.output[:] = 0       # in-place edit
        lm.model.layers[4].output = out * 2        # replacement
        lm.model.layers[7].skip(lm.model.layers[7].input)

Each attribute of an Envoy is a child module's Envoy; a wrong name raises ModulePathError
with the nearest valid names. Parameters and buffers read as values (never writable).
"""
from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from .errors import ModulePathError, TraceError
from .proxy import Proxy, Recorder


class Envoy:
    """A module at ``path`` (dotted, '' for the root) of the wrapped model."""

    _active: Recorder | None = None   # on the root: the trace being recorded, if any

    def __init__(self, module: nn.Module, path: str, root: Envoy | None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_children", {})

    # ----- tree ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = self._module
        if name in module._modules:
            return self._child(name)
        if name in module._parameters or name in module._buffers:
            return self._tracer().record("param", _join(self._path, name), ())
        raise ModulePathError(self._missing(name))

    def __getitem__(self, key: int | str) -> Envoy:
        modules = self._module._modules
        if type(key) is int and 0 <= key and str(key) in modules:   # ModuleList/Sequential: names are indices
            return self._child(str(key))
        names = list(modules)
        if isinstance(key, int):
            index = key + len(names) if key < 0 else key
            if not 0 <= index < len(names):
                raise ModulePathError(f"index {key} is out of range for {self._label()}, which has "
                                      f"{len(names)} children (valid: 0..{len(names) - 1})")
            return self._child(names[index])
        if isinstance(key, str) and key in self._module._modules:
            return self._child(key)
        raise ModulePathError(self._missing(str(key)))

    def __iter__(self) -> Any:
        return (self._child(n) for n in self._module._modules)

    def __len__(self) -> int:
        return len(self._module._modules)

    def __repr__(self) -> str:
        return f"Envoy({self._label()}: {type(self._module).__name__})"

    def _child(self, name: str) -> Envoy:
        child = self._children.get(name)
        if child is None:
            child = Envoy(self._module._modules[name], _join(self._path, name), self._root_model())
            self._children[name] = child
        return child

    def _missing(self, name: str) -> str:
        options = list(self._module._modules) + list(self._module._parameters) + list(self._module._buffers)
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(_join(self._path, c)) for c in close)}?" if close else ""
        listed = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
        return f"no module {_join(self._path, name)!r}{hint} ({self._label()} has: {listed or 'nothing'})"

    def _label(self) -> str:
        return repr(self._path) if self._path else "the model"

    def _root_model(self) -> Envoy:
        return self._root if self._root is not None else self

    def _tracer(self) -> Recorder:
        tracer = self._root_model()._active
        if tracer is None:
            raise TraceError(f"{self._label()}: module values exist only inside `with model.trace(...)`")
        return tracer

    # ----- events ----------------------------------------------------------------------------
    @property
    def output(self) -> Proxy:
        """The module's output (for the root: the model's return value)."""
        return self._tracer().record_event("output", self._path)

    @property
    def input(self) -> Proxy:
        """The module's first positional argument."""
        return self._tracer().record_event("input", self._path)

    @property
    def inputs(self) -> Proxy:
        """``(args, kwargs)`` the module was called with."""
        return self._tracer().record_event("inputs", self._path)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input"):
            self._tracer().record_event(f"set_{name}", self._path, (value,))
        elif name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            raise TraceError(f"cannot assign {name!r} on {self._label()}: only '.output' and '.input' are writable")

    def skip(self, value: Any) -> None:
        """Do not run this module in this forward; its output is ``value``."""
        self._tracer().record_event("skip", self._path, (value,))

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        """Run this module ad hoc on traced values (e.g. the logit lens ``lm_head(norm(h))``)."""
        return self._tracer().record("call_module", self._path, args, kwargs)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
