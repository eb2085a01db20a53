"""A connection to one served model: the API client, the server's pinned signing key, the model's description.

    session = RemoteSession.connect("smollm2-135m", host="http://127.0.0.1:8000", api_key=KEY)
    job = session.submit(graph, wait=True)        # a RemoteJob; job.wait() -> {node id: value}
    spec, template = session.spec_and_template()  # the weightless module tree and shape template

Shared by ``sc.RemoteModel`` and by ``sc.LanguageModel(..., served_as=name)`` for ``trace(remote=True)``.
"""
from __future__ import annotations

import os
import sys
from typing import Any
from urllib.parse import quote

from ..errors import RemoteError
from ..graph import Graph
from .api import READ_TIMEOUT, ApiClient
from .job import RemoteJob, first_wait
from .pins import KnownServers, server_key
from .tokenizer import tokenizer_from_files

HOST_ENV = "SANDBOX_HOST"
KEY_ENV = "SANDBOX_API_KEY"


class RemoteSession:
    """The served model ``name`` through ``api``; ``public_key`` is the server's verified result-signing key."""

    def __init__(self, api: ApiClient, name: str, public_key: str, info: dict[str, Any], verbose: bool) -> None:
        self.api = api
        self.name = name
        self.public_key = public_key
        self.info = info
        self.verbose = verbose

    @classmethod
    def connect(cls, name: str, host: str | None = None, api_key: str | None = None, *,
                public_key: str | None = None, verbose: bool = True) -> RemoteSession:
        """Reach ``host`` (or ``SANDBOX_HOST``), pin or check its signing key, and read the model's description."""
        host = host or os.environ.get(HOST_ENV)
        if not host:
            raise RemoteError("config", f"no server given: pass host='http://...' or set {HOST_ENV}")
        api = ApiClient(host, api_key or os.environ.get(KEY_ENV))
        key = _server_key(api, public_key, verbose)
        info = api.get_json(f"/v1/models/{quote(name, safe='')}")
        return cls(api, name, key, info, verbose)

    def spec_and_template(self) -> tuple[Any, Any]:
        """The model's ``ModelSpec`` and ``ShapeTemplate`` as the server described them."""
        from validator.spec import ModelSpec

        from ..interpreter.shapes import ShapeTemplate

        try:
            return ModelSpec.from_dict(self.info["spec"]), ShapeTemplate.from_dict(self.info["template"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise RemoteError("bad_response", f"{self.api.host} sent a model description this client cannot read "
                              f"({err!r}); update sandbox_client to the server's version") from None

    def check_same_modules(self, names: frozenset[str]) -> None:
        """Refuse to send a local model's traces to a served model with other module paths."""
        spec, _ = self.spec_and_template()
        served = frozenset(spec.modules)
        if served != names:
            differ = sorted(served ^ names)[:5]
            raise RemoteError("model_mismatch", f"{self.name!r} on {self.api.host} has other modules than this local "
                              f"model (e.g. {differ}); serve the same architecture or use sc.RemoteModel")

    def tokenizer(self) -> Any:
        """The server's tokenizer for this model (None when it has none)."""
        if not self.info.get("tokenizer", True):
            return None
        files = self.api.get_json(f"/v1/models/{quote(self.name, safe='')}/tokenizer")
        return tokenizer_from_files(files.get("files") if isinstance(files, dict) else None)

    def submit(self, graph: Graph, wait: bool) -> RemoteJob:
        """POST the job; with ``wait`` the same request waits for it to end (``?wait=``) and brings a small
        result along (``inline=1``): a short experiment takes one round trip instead of three."""
        seconds = first_wait(self.verbose) if wait else 0.0
        params = {"wait": f"{seconds:.3f}", "inline": "1"} if wait else None
        info = self.api.post_json("/v1/jobs", {"model": self.name, "graph": graph.to_json()}, params=params,
                                  read_timeout=seconds + READ_TIMEOUT)
        return RemoteJob(self.api, info, lambda: self.public_key, verbose=self.verbose)


def _server_key(api: ApiClient, explicit: str | None, verbose: bool) -> str:
    """The server's key, checked against ``explicit`` or the known_servers pin (pinned on first use)."""
    answer = api.get_json("/v1/public-key", auth=False)
    if not isinstance(answer, dict) or answer.get("algorithm") != "ed25519" or \
            not isinstance(answer.get("public_key"), str):
        raise RemoteError("bad_response", f"{api.host}/v1/public-key did not give an ed25519 key; "
                          "is host= the interp-sandbox server?")
    known = KnownServers()
    key, pinned_now = server_key(api.host, answer["public_key"], known, explicit)
    if pinned_now and verbose:
        print(f"interp-sandbox: pinned {api.host}'s result-signing key {answer.get('fingerprint', key)} "
              f"in {known.path}", file=sys.stderr)
    return key
