"""A weightless copy of a served model's module tree, built from its ``ModelSpec`` dict.

    root = module_tree(ModelSpec.from_dict(info["spec"]))
    root.model.layers[0]             # LlamaDecoderLayer(...): same paths, class names and child order
    root.lm_head.weight              # Parameter on the meta device: shape and dtype, no data

Each type name becomes one dynamically created ``nn.Module`` subclass (so ``repr`` shows the real
class name); parameters and buffers are meta tensors. Nothing here can compute: ``forward``
raises, since the weights and the model code stay on the server.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import TraceError

if TYPE_CHECKING:   # the client imports the validator lazily (it pulls in RestrictedPython)
    from validator.spec import ModelSpec, ModuleSpec, TensorSpec


class RemoteModule(nn.Module):
    """Base of the tree's classes: structure only."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceError(f"{type(self).__name__} has no weights on this machine: it runs only on the server, "
                         "inside `with model.trace(...)`")


def module_tree(spec: ModelSpec) -> nn.Module:
    """The tree of ``spec`` ('' = root), children registered in spec order."""
    if "" not in spec.modules:
        raise ValueError("the model spec has no root module ('')")
    classes: dict[str, type[RemoteModule]] = {}
    return _build("", spec.modules[""], spec, classes)


def _build(path: str, mspec: ModuleSpec, spec: ModelSpec, classes: dict[str, type[RemoteModule]]) -> nn.Module:
    module = _class_of(mspec.type, classes)()
    for name, tensor in mspec.params.items():
        meta = _meta(tensor)
        module.register_parameter(name, nn.Parameter(meta, requires_grad=meta.is_floating_point()))
    for name, tensor in mspec.buffers.items():
        module.register_buffer(name, _meta(tensor))
    for name in mspec.children:
        child_path = f"{path}.{name}" if path else name
        child = spec.modules.get(child_path)
        # A path missing from the spec is a None child or a module shared with an earlier path
        # (named_modules lists each module once); either way it has no events of its own.
        module.add_module(name, _build(child_path, child, spec, classes) if child is not None else None)
    return module


def _class_of(type_name: str, classes: dict[str, type[RemoteModule]]) -> type[RemoteModule]:
    cls = classes.get(type_name)
    if cls is None:
        name = type_name if type_name.isidentifier() else "RemoteModule"
        cls = type(name, (RemoteModule,), {"__module__": "sandbox_client.remote.tree"})
        classes[type_name] = cls
    return cls


def _meta(tensor: TensorSpec) -> torch.Tensor:
    dtype = getattr(torch, tensor.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {tensor.dtype!r} in the model spec")
    return torch.empty(tensor.shape, dtype=dtype, device="meta")
