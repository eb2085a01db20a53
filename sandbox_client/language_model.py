"""``sc.LanguageModel``: a causal LM with a tokenizer; traces, batched invokes and generation.

    lm = sc.LanguageModel(smollm2_folder())          # or LanguageModel(hf_model, tokenizer=tok)
    with lm.generate("The capital of France is", max_new_tokens=5) as tracer:
        with tracer.all_steps():
            top = lm.lm_head.output[:, -1].argmax(-1).save()     # a list, one per step
        ids = tracer.result.save()
    lm.tokenizer.decode(ids.value[0])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import LocalBackend, ScanBackend
from .errors import TraceError
from .interpreter.runner import LanguageModelRunner
from .interpreter.shapes import ShapeTemplate, meta_copy
from .model import Model
from .tracer import Tracer
from .types import Backend


class LanguageModel(Model):
    """A Hugging Face causal LM (object or local folder) with its tokenizer.

    ``served_as="smollm2-135m"`` names the same model on a server, for ``trace(..., remote=True)``
    (``host``/``api_key`` or the environment's ``SANDBOX_HOST``/``SANDBOX_API_KEY``)."""

    def __init__(self, model: nn.Module | str | Path, tokenizer: Any = None, *, served_as: str | None = None,
                 host: str | None = None, api_key: str | None = None, **load_kwargs: Any) -> None:
        if isinstance(model, (str, Path)):
            model, tokenizer = _load_folder(Path(model), tokenizer, load_kwargs)
        elif load_kwargs:
            raise TypeError(f"LanguageModel got unknown keyword(s) {sorted(load_kwargs)}: loading options apply "
                            "only when the model is given as a folder")
        super().__init__(model, LanguageModelRunner(model, tokenizer))
        self._served = (served_as, host, api_key)
        self._session: Any = None
        self._shapes: tuple[ShapeTemplate, nn.Module] | None = None

    runner: LanguageModelRunner

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    def trace(self, *args: Any, backend: Backend | None = None, remote: bool | None = None,
              blocking: bool = True, **kwargs: Any) -> Tracer:
        """Record interventions for one forward. ``remote=True`` runs it on the server (``blocking=False``:
        the block ends at once and ``tracer.job`` follows the job); ``backend`` overrides both."""
        return Tracer(self, "trace", args, kwargs, backend=backend or self._backend(remote, blocking))

    def generate(self, *args: Any, max_new_tokens: int = 20, backend: Backend | None = None,
                 remote: bool | None = None, blocking: bool = True, **kwargs: Any) -> Tracer:
        """Record interventions over a greedy generation of ``max_new_tokens`` tokens (``remote`` as for trace)."""
        options = {"max_new_tokens": int(max_new_tokens), **kwargs}
        return Tracer(self, "generate", args, {}, options=options,
                      backend=backend or self._backend(remote, blocking))

    def scan_backend(self) -> Backend:
        return ScanBackend(self.runner, self.shape_model)

    def shape_model(self) -> tuple[ShapeTemplate, nn.Module]:
        """The model's shape template and a meta copy (built once), for scans and dry runs."""
        if self._shapes is None:
            vocab = int(getattr(getattr(self._module, "config", None), "vocab_size", 2) or 2)
            template = ShapeTemplate.probe(
                self._module, lambda b, t: {"input_ids": torch.randint(0, vocab, (b, t))})
            self._shapes = (template, meta_copy(self._module))
        return self._shapes

    def _backend(self, remote: bool | None, blocking: bool) -> Backend:
        if not (self.remote_default if remote is None else remote):
            if not blocking:
                raise TraceError("blocking=False applies to remote runs only (remote=True)")
            return LocalBackend(self.runner)
        from .remote.backend import RemoteBackend

        return RemoteBackend(self.remote_session(), blocking=blocking, check=self.runner.check)

    remote_default = False   # RemoteModel: True

    def remote_session(self) -> Any:
        """The server connection for ``remote=True`` (made on first use, checked against this model's modules)."""
        if self._session is None:
            from .remote.session import RemoteSession

            name, host, api_key = self._served
            if name is None:
                raise TraceError("remote=True needs the model's name on the server: "
                                "sc.LanguageModel(..., served_as='smollm2-135m'), or use sc.RemoteModel")
            session = RemoteSession.connect(name, host, api_key)
            session.check_same_modules(self.runner.module_names)
            self._session = session
        return self._session


def _load_folder(folder: Path, tokenizer: Any, load_kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a local Hugging Face model folder")
    model = AutoModelForCausalLM.from_pretrained(str(folder), **load_kwargs).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer
