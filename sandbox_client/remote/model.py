"""``sc.RemoteModel``: a model served by an interp-sandbox server, traced with the same code as a local one.

    model = sc.RemoteModel("smollm2-135m", host="http://127.0.0.1:8000", api_key=KEY)  # or env SANDBOX_HOST/_API_KEY
    with model.trace("The Eiffel Tower is in the city of"):
        logits = model.lm_head.output.save()
    logits.value

A thin wrapper: a ``LanguageModel`` over the server's weightless module tree (meta tensors, from its
``ModelSpec``) whose traces default to ``remote=True``. When a block ends, the graph is checked here, sent
as JSON, run on the server, and its result is downloaded, verified (sha256 + the server's pinned Ed25519
key) and decoded. With ``blocking=False`` the block returns at once and ``tracer.job`` follows the job.
"""
from __future__ import annotations

from typing import Any

from ..backends import ScanBackend
from ..errors import TraceError
from ..interpreter.shapes import ShapeTemplate
from ..language_model import LanguageModel
from ..types import Backend
from .session import RemoteSession
from .tree import module_tree


class RemoteModel(LanguageModel):
    """The served model ``name`` on ``host``; ``public_key`` (base64) overrides the known_servers pin."""

    remote_default = True

    def __init__(self, name: str, host: str | None = None, api_key: str | None = None, *,
                 public_key: str | None = None, verbose: bool = True) -> None:
        session = RemoteSession.connect(name, host, api_key, public_key=public_key, verbose=verbose)
        spec, template = session.spec_and_template()
        super().__init__(module_tree(spec))
        self._session = session
        self._template: ShapeTemplate = template
        self._lengths = template.output_lengths()
        self._tokenizer_loaded = False

    @property
    def session(self) -> RemoteSession:
        """The server connection: ``api`` (HTTP), ``public_key`` (the verified signing key), ``submit``."""
        return self._session

    @property
    def info(self) -> dict[str, Any]:
        """The server's ModelInfo for this model (name, status, dtype, device, spec, template, ...)."""
        return dict(self._session.info)

    @property
    def tokenizer(self) -> Any:
        """The server's tokenizer for this model, fetched on first use."""
        if not self._tokenizer_loaded:
            self.runner.tokenizer = self._session.tokenizer()
            self._tokenizer_loaded = True
        return self.runner.tokenizer

    def __repr__(self) -> str:
        return f"RemoteModel({self._session.name!r} on {self._session.api.host}: {type(self._module).__name__})"

    def _backend(self, remote: bool | None, blocking: bool) -> Backend:
        if remote is False:
            raise TraceError("a RemoteModel has no weights here: it runs only on its server (leave remote=True)")
        return super()._backend(True, blocking)

    def scan_backend(self) -> Backend:
        self.tokenizer   # noqa: B018 -- scan tokenizes here; traces send prompts as they are
        return ScanBackend(self.runner, lambda: (self._template, self._module), weights=False)
