"""Remote runs: the same traces, executed by an interp-sandbox server.

    model = sc.RemoteModel("smollm2-135m", host="http://127.0.0.1:8000", api_key=KEY)
    with model.trace("Hello"):
        h = model.model.layers[0].output.save()

Modules: ``api`` (HTTP + typed errors), ``pins`` (known server keys), ``tree`` (weightless module
tree), ``tokenizer``, ``job`` (following, cancelling, downloading), ``results`` (verification),
``model`` (RemoteModel).
"""
from .job import RemoteJob
from .model import RemoteModel, RemoteTracer

__all__ = ["RemoteJob", "RemoteModel", "RemoteTracer"]
