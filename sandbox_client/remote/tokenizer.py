"""The served model's tokenizer, rebuilt from the files the server sends (never remote code).

    tok = tokenizer_from_files({"tokenizer.json": "...", "tokenizer_config.json": "..."})

Files go to a private temporary folder that is deleted after loading; a name that is not a plain
file name (a path, '..', a hidden file) is refused.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RemoteError

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def tokenizer_from_files(files: Any) -> Any:
    """A transformers tokenizer loaded from ``{file name: text}`` with ``trust_remote_code=False``."""
    from transformers import AutoTokenizer

    checked = checked_files(files)
    folder = Path(tempfile.mkdtemp(prefix="interp-sandbox-tokenizer-"))   # mode 0700
    try:
        for name, text in checked.items():
            (folder / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def checked_files(files: Any) -> dict[str, str]:
    """The files, if every name is a plain file name and every content is text; else RemoteError."""
    if not isinstance(files, Mapping) or not files:
        raise RemoteError("bad_response", "the server sent no tokenizer files")
    for name, text in files.items():
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
            raise RemoteError("bad_response", f"refusing tokenizer file name {str(name)[:80]!r} from the server: "
                              "only plain file names are accepted")
        if not isinstance(text, str):
            raise RemoteError("bad_response", f"tokenizer file {name!r} from the server is not text")
    return dict(files)
