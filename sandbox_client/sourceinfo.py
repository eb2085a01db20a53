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


def user_source() -> str:
    """``file.py:LINE: code`` for the innermost frame outside sandbox_client and torch."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_PREFIXES):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    filename = frame.f_code.co_filename
    line = linecache.getline(filename, frame.f_lineno).strip()
    return f"{os.path.basename(filename)}:{frame.f_lineno}: {line}"
