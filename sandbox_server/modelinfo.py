"""What a model worker publishes about its loaded model, for the web tier and for clients.

    write_model_info(config.model_dir("tiny-gpt2"), model_cfg, hf_model, tokenizer)   # in the worker, once
    info = read_model_info(config.model_dir("tiny-gpt2"))                            # in the web tier
    info.spec, info.template, info.tokenizer_dir, info.public()

Files in the folder: spec.json (module tree, parameter shapes, config: no weights), template.json
(module input/output shapes as functions of batch and sequence length), config.json (the HF config,
to build a weightless meta-device copy for dry runs), tokenizer/ and info.json; "ready" is written
last, so a reader never sees a half-written folder as ready.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelConfig

if TYPE_CHECKING:                 # the supervisor imports this module, and never loads torch
    from torch import nn

    from sandbox_client.interpreter import ShapeTemplate
    from validator import ModelSpec

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    folder: Path
    spec: ModelSpec
    template: ShapeTemplate
    info: dict[str, Any]          # kind, dtype, device, description, tokenizer

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def public(self, status: str = "ready") -> dict[str, Any]:
        """The ModelInfo of the API (GET /v1/models), without spec/template."""
        return {"name": self.name, "status": status, **self.info}

    def tokenizer_files(self) -> dict[str, str]:
        """The tokenizer's data files as text (GET /v1/models/<name>/tokenizer)."""
        folder = self.tokenizer_dir
        return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.name in _TOKENIZER_FILES} \
            if folder.is_dir() else {}


def write_model_info(folder: Path, cfg: ModelConfig, model: nn.Module, tokenizer: Any) -> None:
    """Publish ``model``'s spec, template, config and tokenizer into ``folder`` (replacing what was there)."""
    import torch

    from sandbox_client.interpreter import ShapeTemplate
    from validator import ModelSpec

    folder = Path(folder)
    (folder / "ready").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    device = next(model.parameters()).device
    template = ShapeTemplate.probe(model, lambda b, t: {"input_ids": torch.randint(0, vocab, (b, t), device=device)})
    _write_json(folder / "spec.json", ModelSpec.from_module(model, name=cfg.name).to_dict())
    _write_json(folder / "template.json", template.to_dict())
    hf_config: Any = getattr(model, "config")   # noqa: B009 - typed Any: nn.Module declares no .config
    hf_config.to_json_file(str(folder / "config.json"))
    tok_dir = folder / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tok_dir))
    _write_json(folder / "info.json", {"kind": "language_model", "dtype": cfg.dtype, "device": cfg.device,
                                       "description": cfg.description, "tokenizer": tokenizer is not None})
    (folder / "ready").write_text(str(os.getpid()))


def read_model_info(folder: Path, name: str) -> ModelInfo | None:
    """The published info, or None while the worker has not finished loading."""
    from sandbox_client.interpreter import ShapeTemplate
    from validator import ModelSpec

    folder = Path(folder)
    if not (folder / "ready").exists():
        return None
    spec = ModelSpec.from_dict(json.loads((folder / "spec.json").read_text()))
    template = ShapeTemplate.from_dict(json.loads((folder / "template.json").read_text()))
    info = json.loads((folder / "info.json").read_text())
    return ModelInfo(name=name, folder=folder, spec=spec, template=template, info=info)


def clear_model_info(folder: Path) -> None:
    """Mark the model as not ready (its worker is restarting)."""
    (Path(folder) / "ready").unlink(missing_ok=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
