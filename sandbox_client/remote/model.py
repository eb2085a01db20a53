"""``sc.RemoteModel``: a model served by an interp-sandbox server, traced with the same code as a local one.

    model = sc.RemoteModel("smollm2-135m", host="http://127.0.0.1:8000", api_key=KEY)  # or env SANDBOX_HOST/_API_KEY
    with model.trace("The Eiffel Tower is in the city of"):
        logits = model.lm_head.output.save()
    logits.value

The client holds only the module tree (meta tensors, from the server's ``ModelSpec``), the shape
template and the tokenizer. When a block ends, the graph is checked here, sent as JSON, run on the
server, and its result is downloaded, verified (sha256 + the server's pinned Ed25519 key) and decoded.
With ``blocking=False`` the block returns at once and ``tracer.job`` follows the job.
"""
from __future__ import annotations

import os
import sys
from typing import Any
from urllib.parse import quote

from torch import nn

from ..errors import RemoteError, TraceError
from ..graph import Graph, Invoke
from ..inputs import TokenBatch
from ..language_model import LanguageModel
from ..order import check_graph
from ..tracer import Tracer
from .api import READ_TIMEOUT, ApiClient
from .job import RemoteJob, first_wait
from .pins import KnownServers, server_key
from .tokenizer import tokenizer_from_files
from .tree import module_tree

HOST_ENV = "SANDBOX_HOST"
KEY_ENV = "SANDBOX_API_KEY"


class RemoteTracer(Tracer):
    """A trace or generation run as a server job; ``job`` is its RemoteJob once the block has ended."""

    def __init__(self, *args: Any, blocking: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blocking = blocking
        self.job: RemoteJob | None = None
        self._pending = False

    def result_of(self, node_id: int) -> Any:
        if self._pending and self.job is not None:
            self._results = self.job.wait()
            self._pending = False
        return super().result_of(node_id)


class RemoteModel(LanguageModel):
    """The served model ``name`` on ``host``; ``public_key`` (base64) overrides the known_servers pin."""

    def __init__(self, name: str, host: str | None = None, api_key: str | None = None, *,
                 public_key: str | None = None, verbose: bool = True) -> None:
        host = host or os.environ.get(HOST_ENV)
        if not host:
            raise RemoteError("config", f"no server given: pass host='http://...' or set {HOST_ENV}")
        api = ApiClient(host, api_key or os.environ.get(KEY_ENV))
        key = self._server_key(api, public_key, verbose)
        info = api.get_json(f"/v1/models/{quote(name, safe='')}")
        spec, template = _spec_and_template(info, api.host)
        super().__init__(module_tree(spec))
        self._name = name
        self._api = api
        self._info = info
        self._template = template
        self._verbose = verbose
        self._public_key = key
        self._ending: Tracer | None = None

    @property
    def info(self) -> dict[str, Any]:
        """The server's ModelInfo for this model (name, status, dtype, device, spec, template, ...)."""
        return dict(self._info)

    @property
    def tokenizer(self) -> Any:
        """The server's tokenizer for this model, fetched on first use."""
        return self._load_tokenizer()

    def __repr__(self) -> str:
        return f"RemoteModel({self._name!r} on {self._api.host}: {type(self._module).__name__})"

    def trace(self, *args: Any, blocking: bool = True, **kwargs: Any) -> RemoteTracer:
        """Like ``LanguageModel.trace``; ``blocking=False`` submits the job and returns at the block's end."""
        return RemoteTracer(self, "trace", args, kwargs, blocking=blocking)

    def generate(self, *args: Any, max_new_tokens: int = 20, blocking: bool = True,
                 **kwargs: Any) -> RemoteTracer:
        """Like ``LanguageModel.generate``; ``blocking=False`` as for ``trace``."""
        options = {"max_new_tokens": int(max_new_tokens), **kwargs}
        return RemoteTracer(self, "generate", args, {}, options=options, blocking=blocking)

    # ----- tracer protocol -----------------------------------------------------------------
    def _end(self, tracer: Tracer) -> None:
        self._ending = tracer   # the tracer whose graph _run_graph receives next
        super()._end(tracer)

    def _run_graph(self, graph: Graph) -> dict[int, Any]:
        tracer, self._ending = self._ending, None
        check_graph(graph, self._module_names)
        blocking = not isinstance(tracer, RemoteTracer) or tracer.blocking
        job = self._submit(graph, wait=blocking)
        if isinstance(tracer, RemoteTracer):
            tracer.job = job
            if not blocking:
                tracer._pending = True
                return {}
        return job.wait()

    def _scan_graph(self, graph: Graph) -> dict[int, Any]:
        if any(node.op == "call_module" for node in graph.nodes):
            raise TraceError("scan on a RemoteModel cannot call modules ad hoc (e.g. lm_head(x)): this machine has "
                             "no weights or model code. Scan with a local sc.LanguageModel, or trace remotely")
        return super()._scan_graph(graph)

    def _shape_model(self) -> tuple[Any, nn.Module]:
        return self._template, self._module

    def _output_lengths(self, tracer: Tracer) -> dict[str, int | None]:
        if self._lengths is None:
            self._lengths = self._template.output_lengths()
        return self._lengths

    def _tokens(self, invokes: list[Invoke]) -> tuple[TokenBatch, list[slice | None]]:
        self._load_tokenizer()   # only scan tokenizes here; traces send prompts as they are
        return super()._tokens(invokes)

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None and self._info.get("tokenizer", True):
            files = self._api.get_json(f"/v1/models/{quote(self._name, safe='')}/tokenizer")
            self._tokenizer = tokenizer_from_files(files.get("files") if isinstance(files, dict) else None)
        return self._tokenizer

    # ----- server ----------------------------------------------------------------------------
    def _submit(self, graph: Graph, wait: bool) -> RemoteJob:
        """POST the job; with ``wait`` the same request waits for it to end (``?wait=``) and brings a small
        result along (``inline=1``): a short experiment takes one round trip instead of three."""
        seconds = first_wait(self._verbose) if wait else 0.0
        params = {"wait": f"{seconds:.3f}", "inline": "1"} if wait else None
        info = self._api.post_json("/v1/jobs", {"model": self._name, "graph": graph.to_json()}, params=params,
                                   read_timeout=seconds + READ_TIMEOUT)
        return RemoteJob(self._api, info, lambda: self._public_key, verbose=self._verbose)

    @staticmethod
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


def _spec_and_template(info: Any, host: str) -> tuple[Any, Any]:
    # imported here: the validator pulls in RestrictedPython, which local-only users never need
    from validator.shapes import ShapeTemplate
    from validator.spec import ModelSpec

    try:
        return ModelSpec.from_dict(info["spec"]), ShapeTemplate.from_dict(info["template"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RemoteError("bad_response", f"{host} sent a model description this client cannot read ({err!r}); "
                          "update sandbox_client to the server's version") from None
