"""Remote runs: the same traces, executed by an interp-sandbox server.

    model = sc.RemoteModel("smollm2-135m", host="http://127.0.0.1:8000", api_key=KEY)
    with model.trace("Hello"):
        h = model.model.layers[0].output.save()

Modules: ``api`` (HTTP + typed errors), ``pins`` (known server keys), ``tree`` (weightless module
tree), ``tokenizer``, ``job`` (following, cancelling, downloading), ``results`` (verification),
``session`` (one served model: key pin, description, submission), ``backend`` (the tracer's remote
Backend), ``model`` (RemoteModel).
"""
from .backend import PendingResults, RemoteBackend
from .job import RemoteJob
from .model import RemoteModel
from .session import RemoteSession

__all__ = ["PendingResults", "RemoteBackend", "RemoteJob", "RemoteModel", "RemoteSession"]
