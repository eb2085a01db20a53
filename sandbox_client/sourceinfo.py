"""Find the user's line that is recording a node, skipping our own and torch's frames.

    >>> user_source()          # called from inside sandbox_client while the user's line runs
    'experiment.py:12: h = lm.model.layers[5].output.save()'
"""
from __future__ import annotations

import linecache
import os
import sys

import torch

_SKIP_PREFIXES = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


_CACHE: dict[tuple[str, int], str] = {}


def user_source() -> str:
    """``file.py:LINE: code`` for the innermost frame outside sandbox_client and torch."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_PREFIXES):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    key = (frame.f_code.co_filename, frame.f_lineno)
    text = _CACHE.get(key)
    if text is None:
        line = linecache.getline(key[0], key[1]).strip()
        text = f"{os.path.basename(key[0])}:{key[1]}: {line}"
        if len(_CACHE) < 100_000:
            _CACHE[key] = text
    return text
