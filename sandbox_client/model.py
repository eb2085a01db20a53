"""``sc.Model``: wrap any torch module so its internals can be traced. Wrapping changes nothing.

    model = sc.Model(my_module)
    with model.trace(x, mask=m):                 # calls my_module(x, mask=m)
        hidden = model.encoder.layers[0].output.save()
    hidden.value

Hooks exist only while a traced forward runs. With several invokes, tensor arguments are
concatenated along dim 0 and each invoke sees its own rows.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .backends import LocalBackend, NoScan
from .envoy import Envoy
from .errors import TraceError
from .graph import Node
from .interpreter.runner import ModuleRunner, probe_output_lengths
from .proxy import Recorder
from .tracer import Tracer
from .types import Backend

_PAIR_METHODS = frozenset({"topk", "sort", "kthvalue", "mode", "median", "max", "min", "aminmax",
                           "std_mean", "var_mean", "slogdet", "frexp"})


class Model(Envoy):
    """A traceable view of ``module``; the module itself is never modified. ``runner`` runs its graphs."""

    def __init__(self, module: nn.Module, runner: ModuleRunner | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"sc.Model wraps a torch.nn.Module, got {type(module).__name__}")
        super().__init__(module, "", None)
        object.__setattr__(self, "runner", runner if runner is not None else ModuleRunner(module))
        self._lengths: dict[str, int | None] | None = None

    def trace(self, *args: Any, backend: Backend | None = None, remote: bool = False, **kwargs: Any) -> Tracer:
        """Record interventions for one forward on ``args``/``kwargs`` (or on invokes added inside).
        ``backend`` runs the finished graph (default: here, ``LocalBackend``)."""
        if remote:
            raise TraceError("remote=True needs a served language model: sc.RemoteModel(name, host=...) or "
                             "sc.LanguageModel(..., served_as=name)")
        return Tracer(self, "trace", args, kwargs, backend=backend or LocalBackend(self.runner))

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """Like ``trace``, but nothing runs: saved values are meta tensors with the right shapes and dtypes."""
        return Tracer(self, "trace", args, kwargs, backend=self.scan_backend())

    def scan_backend(self) -> Backend:
        return NoScan()

    # ----- TraceHost -----------------------------------------------------------------------
    def open_trace(self, tracer: Recorder) -> None:
        if self._active is not None:
            raise TraceError("a trace is already open on this model; traces cannot be nested")
        self._active = tracer

    def close_trace(self, tracer: Recorder) -> None:
        self._active = None

    def value_length(self, node: Node, tracer: Recorder) -> int | None:
        """The length of ``node``'s value while recording (for tuple unpacking), or None if unknown."""
        if node.op == "inputs":
            return 2
        if node.op == "call_method" and node.target in _PAIR_METHODS:
            return 2
        if node.op == "output":
            return self.output_lengths(tracer).get(node.target or "")
        return None

    def output_lengths(self, tracer: Any) -> dict[str, int | None]:
        """Tuple lengths of every module's output, learned once from a probe forward on the trace's input."""
        if self._lengths is None:
            if not tracer.invokes:
                raise TraceError("unpacking a module output needs the trace's input first")
            self._lengths = probe_output_lengths(self._module, self.runner.probe_batch(tracer.invokes[:1]))
        return self._lengths
