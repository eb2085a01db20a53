"""What the validator knows about a served model: its module tree, parameter shapes and dtypes
(never the weights), and its config. Built once per model on the server, sent to clients.

    spec = ModelSpec.from_module(hf_model, name="smollm2-135m")
    ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ModuleSpec:
    type: str
    children: tuple[str, ...] = ()
    params: dict[str, TensorSpec] = field(default_factory=dict)
    buffers: dict[str, TensorSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """Module path ('' = root) -> ModuleSpec, plus the model's kind and config."""

    name: str
    kind: str                                  # "language_model" or "module"
    modules: dict[str, ModuleSpec]
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_module(cls, module: nn.Module, name: str = "model", kind: str = "language_model") -> ModelSpec:
        modules: dict[str, ModuleSpec] = {}
        for path, sub in module.named_modules():
            modules[path] = ModuleSpec(
                type=type(sub).__name__,
                children=tuple(sub._modules),
                params={k: _tensor_spec(v) for k, v in sub._parameters.items() if v is not None},
                buffers={k: _tensor_spec(v) for k, v in sub._buffers.items() if v is not None},
            )
        config = getattr(module, "config", None)
        config_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
        return cls(name=name, kind=kind, modules=modules, config=_jsonable(config_dict))

    def has_param(self, dotted: str) -> bool:
        path, _, attr = dotted.rpartition(".")
        spec = self.modules.get(path)
        return spec is not None and (attr in spec.params or attr in spec.buffers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "config": self.config,
            "modules": {
                path: {"type": m.type, "children": list(m.children),
                       "params": {k: [list(t.shape), t.dtype] for k, t in m.params.items()},
                       "buffers": {k: [list(t.shape), t.dtype] for k, t in m.buffers.items()}}
                for path, m in self.modules.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        modules = {
            path: ModuleSpec(
                type=m["type"], children=tuple(m["children"]),
                params={k: TensorSpec(tuple(s), d) for k, (s, d) in m["params"].items()},
                buffers={k: TensorSpec(tuple(s), d) for k, (s, d) in m["buffers"].items()},
            )
            for path, m in data["modules"].items()
        }
        return cls(name=data["name"], kind=data["kind"], modules=modules, config=data.get("config", {}))


def _tensor_spec(tensor: Any) -> TensorSpec:
    return TensorSpec(tuple(int(s) for s in tensor.shape), str(tensor.dtype).removeprefix("torch."))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
