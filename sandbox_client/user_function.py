"""``sc.apply``: call your own plain Python function on traced values (loops, ifs, helpers).

    def top_tokens(logits, k):
        best = []
        for i in range(k):
            best.append(logits[..., i])
        return torch.stack(best) if logits.sum() > 0 else logits[..., :k]

    with lm.trace("Hello"):
        out = sc.apply(top_tokens, lm.output.logits[0, -1], 3).save()

The function's source travels in the graph and runs under RestrictedPython, locally exactly
as on a server: only allowlisted torch functions (as ``torch.*`` / ``F.*``), tensor methods
and attributes; no imports, no globals from your module, no underscores, no while-loops.
"""
from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from .errors import TraceError
from .proxy import Proxy
from .tracer import current_tracer


def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Proxy:
    """Record a call of ``fn`` (a plain ``def``) on traced values; returns a proxy for its result."""
    tracer = current_tracer()
    if tracer is None:
        raise TraceError("sc.apply(...) records a call: use it inside `with model.trace(...)`")
    if not inspect.isfunction(fn) or fn.__name__ == "<lambda>":
        raise TraceError("sc.apply needs a function defined with `def` (its source is sent, not the object)")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise TraceError(f"cannot read the source of {fn.__name__}: define it in a file or notebook cell") from None
    return tracer.record("apply", source, args, kwargs)
