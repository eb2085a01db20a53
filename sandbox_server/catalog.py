"""The web tier's view of the served models: published info, and full validation of a job's graph.

    catalog = Catalog(config)
    info = catalog.info("tiny-gpt2")                          # ModelInfo, or None while the worker loads it
    model_status(db, catalog, "tiny-gpt2")                    # "ready" | "loading" | "down"
    checked = catalog.validate_job("tiny-gpt2", graph_text)   # ValidatedGraph, or ValidationError (400)

A model worker publishes its model's info into ``config.model_dir(name)`` (sandbox_server.modelinfo)
and writes the file "ready" last. The catalog reads that folder, and reads it again whenever the
"ready" file changes (the worker restarted and published again). For validation it keeps, per
model, a weightless copy of the model on the meta device (built from the published config.json
with the configured dtype) and the tokenizer: tokenizing tells the batch's rows and sequence
length, and a dry run of the graph on meta tensors then finds shape errors and the exact size of
the results before anything is queued.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sandbox_client.errors import SandboxError
from sandbox_client.interpreter import DryRun, LanguageModelRunner, dry_check, dry_run_key
from validator import ValidatedGraph, ValidationError, validate

from .config import ServerConfig
from .db import Database
from .modelinfo import ModelInfo, read_model_info
from .runtime import release_free_memory

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int]
DRY_RUN_CACHE_SIZE = 4096          # per model and web process; an entry is a 64-character key and an int


class ModelNotReady(Exception):
    """The model's info is not published (its worker is loading), or its meta copy cannot be built."""


@dataclass
class _Runtime:
    """What validation needs of one model, built once per published info."""

    meta_model: nn.Module
    runner: LanguageModelRunner       # over the meta model: used only to tokenize invokes as the worker does
    tokenizer_lock: threading.Lock    # Hugging Face fast tokenizers are not safe to share across threads
    passed: DryRunCache               # dry runs that passed, by ``dry_run_key``


@dataclass
class _Entry:
    stamp: Stamp
    info: ModelInfo
    runtime: _Runtime | None = None


class Catalog:
    """Published model info and per-model validation, cached and reloaded when a worker republishes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def info(self, name: str) -> ModelInfo | None:
        """The model's published info, or None while its worker has not (re)published it."""
        entry = self._entry(name)
        return entry.info if entry is not None else None

    def validate_job(self, name: str, graph_text: str | bytes) -> ValidatedGraph:
        """Every check of the validator, then a dry run on meta tensors with the batch's real token count.

        Raises ValidationError (the user's graph is at fault; ``input_invalid`` when its inputs cannot be
        tokenized) or ModelNotReady.
        """
        entry = self._entry(name)
        if entry is None:
            raise ModelNotReady(f"model {name} is loading")
        limits = self.config.limits
        checked = validate(graph_text, entry.info.spec, limits)
        runtime = self._runtime(name, entry)
        seq, rows = self._tokens(runtime, checked)
        dry = DryRun(template=entry.info.template, meta_model=runtime.meta_model, seq=seq, rows=rows)
        key = dry_run_key(checked.graph, dry, limits)
        result_bytes = runtime.passed.get(key)
        if result_bytes is not None:       # the same nodes on the same shapes passed before: same outcome
            return dataclasses.replace(checked, result_bytes=result_bytes)
        checked = dry_check(checked, dry, limits)
        assert checked.result_bytes is not None
        runtime.passed.put(key, checked.result_bytes)
        return checked

    def warm(self) -> None:
        """Build the meta models and tokenizers of every published model now (not on the first job)."""
        for model in self.config.models:
            entry = self._entry(model.name)
            if entry is not None:
                try:
                    self._runtime(model.name, entry)
                except ModelNotReady as err:
                    log.warning("%s", err)

    # ----- internals -------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry | None:
        folder = self.config.model_dir(name)
        stamp = _ready_stamp(folder)
        with self._lock:
            entry = self._entries.get(name)
            if stamp is None:
                self._entries.pop(name, None)
                return None
            if entry is not None and entry.stamp == stamp:
                return entry
        try:
            info = read_model_info(folder, name)
        except (OSError, ValueError) as err:    # a worker is rewriting the folder right now
            log.info("model %s: info not readable yet (%s)", name, err)
            return None
        if info is None:
            return None
        entry = _Entry(stamp=stamp, info=info)
        with self._lock:
            self._entries[name] = entry
        return entry

    def _runtime(self, name: str, entry: _Entry) -> _Runtime:
        if entry.runtime is None:
            with self._lock:
                if entry.runtime is None:
                    entry.runtime = self._build_runtime(name, entry.info)
        return entry.runtime

    def _build_runtime(self, name: str, info: ModelInfo) -> _Runtime:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        model_cfg = self.config.model(name)
        dtype_name = model_cfg.dtype if model_cfg is not None else str(info.info.get("dtype", "float32"))
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelNotReady(f"model {name}: dtype {dtype_name!r} is not a torch dtype; fix the server config")
        try:
            hf_config = AutoConfig.from_pretrained(str(info.folder))
            with torch.device("meta"):
                meta_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(info.tokenizer_dir)) \
                if info.info.get("tokenizer") and info.tokenizer_dir.is_dir() else None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelNotReady(f"model {name}: cannot build its meta copy from {info.folder} ({err})") from None
        runtime = _Runtime(meta_model=meta_model, runner=LanguageModelRunner(meta_model, tokenizer),
                           tokenizer_lock=threading.Lock(), passed=DryRunCache())
        release_free_memory()        # building the copy frees much that malloc would otherwise keep
        return runtime

    def _tokens(self, runtime: _Runtime, checked: ValidatedGraph) -> tuple[int, list[slice | None]]:
        """The batch's sequence length and each invoke's rows, tokenized as the worker will."""
        try:
            with runtime.tokenizer_lock:
                tokens, invoke_rows = runtime.runner.tokens(checked.graph.invokes)
        except (SandboxError, ValueError, TypeError, RuntimeError) as err:
            message = getattr(err, "message", None) or str(err)
            raise ValidationError("input_invalid", f"the inputs cannot be tokenized: {message}") from None
        rows, seq = (int(n) for n in tokens.input_ids.shape)
        if rows == 0 or seq == 0:
            raise ValidationError("input_invalid", "the input has no tokens; give each invoke a non-empty prompt "
                                  "or at least one token id")
        limits = self.config.limits
        if seq > limits.max_tokens_per_row:
            raise ValidationError("input_invalid", f"{seq} tokens per row after tokenizing (limit "
                                  f"{limits.max_tokens_per_row}); send shorter prompts")
        if rows != checked.rows:
            raise ValidationError("input_invalid", f"the inputs make {rows} rows, not {checked.rows}; pass one "
                                  "prompt or one row of ids per row")
        return seq, invoke_rows


class DryRunCache:
    """The result bytes of dry runs that passed, by ``interpreter.dry_run_key``, least recently used first out.

    Researchers send the same experiment again and again with other prompts: the static rules run on every
    request, the dry run (the costly part: the model's module events replayed on meta tensors) once per
    graph shape and token count. Only passes are kept, so a refused graph is checked in full every time.
    """

    def __init__(self, size: int = DRY_RUN_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> int | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, result_bytes: int) -> None:
        with self._lock:
            self._items[key] = result_bytes
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _ready_stamp(folder: Path) -> Stamp | None:
    try:
        st = os.stat(folder / "ready")
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def model_status(db: Database, catalog: Catalog, model: str) -> str:
    """"ready", "loading" or "down": the worker's reported state, and "ready" only once its info is published."""
    worker = next((w for w in db.workers() if w.model == model), None)
    if worker is not None and worker.state in ("loading", "down"):
        return worker.state
    return "ready" if catalog.info(model) is not None else "loading"


def model_view(catalog: Catalog, name: str, status: str, full: bool = False) -> dict[str, Any]:
    """The API's ModelInfo; ``full`` adds "spec" and "template" (only for a published model)."""
    info = catalog.info(name)
    if info is None:
        cfg = catalog.config.model(name)
        return {"name": name, "kind": "language_model", "status": status, "dtype": cfg.dtype if cfg else "",
                "device": cfg.device if cfg else "", "description": cfg.description if cfg else "", "tokenizer": True}
    view = info.public(status)
    if full:
        view.update(spec=info.spec.to_dict(), template=info.template.to_dict())
    return view
