"""The result bundle: a job's saved values as one safetensors file, never a pickle.

    >>> data = encode_results({"3": torch.ones(2, 2), "7": (1.5, None, {"logits": torch.zeros(3)})})
    >>> decode_results(data)["7"][2]["logits"]
    tensor([0., 0., 0.])

Tensors are the file's tensors (named ``t0``, ``t1``, ...); everything around them is a JSON
manifest stored in the safetensors metadata under ``MANIFEST_KEY``::

    {"format": "interp-sandbox-results", "version": 1, "values": [["3", {"$tensor": "t0"}], ...]}

Inside ``values`` a JSON null/bool/int/float/string/array is itself (arrays are lists), and
every other value is a one-key object whose key starts with ``$``: ``$tensor`` (a tensor's
name), ``$float`` ("nan", "inf", "-inf"), ``$tuple``, ``$dict`` (``[[key, value], ...]``, keys
are strings), ``$size`` (torch.Size), ``$dtype`` (torch.dtype name) and ``$output``
(``[class name, [[field, value], ...]]`` for a transformers ``ModelOutput``).

What a bundle holds: tensors of any dtype safetensors stores (detached, moved to the CPU and
copied contiguously, so views and tensors sharing storage come back as independent tensors
with bitwise identical values), None, bool, int, float, str, list, tuple, dict with string
keys, torch.Size, torch.dtype, and ModelOutputs. A ModelOutput comes back as its class if
``transformers.modeling_outputs`` defines a ModelOutput subclass of that name, otherwise as a
plain dict. Transformers ``Cache`` objects (``past_key_values``) are stored as None: save the
key/value tensors you need instead. Anything else raises BundleError when encoding.

Decoding treats its input as hostile: any malformed file or manifest raises BundleError (and
nothing else), at most ``MAX_DEPTH`` containers may enclose a value, and nothing is unpickled or evaluated.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "interp-sandbox-results"
VERSION = 1
MANIFEST_KEY = "interp-sandbox-manifest"
MAX_DEPTH = 64
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "uint16", "uint32", "uint64", "complex64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
)
TENSOR_DTYPES: frozenset[torch.dtype] = frozenset(getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n))
_ALL_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
_WHAT_TO_SAVE = "save tensors, numbers, strings, None, lists, tuples, dicts with string keys, torch.Size or dtypes"


class BundleError(Exception):
    """A value cannot be put in a result bundle, or bytes are not a valid result bundle."""


def encode_results(values: Mapping[str, Any]) -> bytes:
    """The bundle bytes for ``{node id: value}``; raises BundleError naming any unsupported value."""
    encoder = _Encoder()
    pairs = []
    for key, value in values.items():
        if not isinstance(key, str):
            raise BundleError(f"result names must be strings, got {type(key).__name__} {key!r}")
        pairs.append([key, encoder.encode(value, repr(key), 0)])
    manifest = {"format": FORMAT, "version": VERSION, "values": pairs}
    try:
        text = json.dumps(manifest, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:  # e.g. an int with more digits than Python will print
        raise BundleError(f"a result value cannot be written: {exc}; {_WHAT_TO_SAVE}") from None
    return bytes(st_save(encoder.tensors, metadata={MANIFEST_KEY: text}))


def decode_results(data: bytes) -> dict[str, Any]:
    """The ``{node id: value}`` stored in bundle bytes; BundleError for anything malformed."""
    try:
        return _decode(data)
    except BundleError:
        raise
    except Exception as exc:  # the parsers below raise many types on corrupt input; callers get one
        raise BundleError(f"the result bundle is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any, where: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise BundleError(f"result value {where} is nested more than {MAX_DEPTH} levels deep (or contains itself)")
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, str):
            return str(value)
        if isinstance(value, torch.Tensor):
            return {"$tensor": self._tensor(value, where)}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Size):
            return {"$size": [int(d) for d in value]}
        special = _transformers_classes() if "transformers" in sys.modules else None
        if special is not None and isinstance(value, special[1]):
            return None  # a Cache: documented as stored as None
        if special is not None and isinstance(value, special[0]):
            fields = [[k, self.encode(v, f"{where}.{k}", depth + 1)] for k, v in value.items()]
            return {"$output": [type(value).__name__, fields]}
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {"$dict": [[self._key(k, where), self.encode(v, f"{where}[{k!r}]", depth + 1)]
                              for k, v in value.items()]}
        raise BundleError(
            f"result value {where} is a {type(value).__module__}.{type(value).__qualname__}, "
            f"which a result bundle cannot hold; {_WHAT_TO_SAVE}"
        )

    def _tensor(self, tensor: torch.Tensor, where: str) -> str:
        if tensor.layout != torch.strided:
            raise BundleError(f"result value {where} is a {tensor.layout} tensor; save tensor.to_dense() instead")
        if tensor.device.type == "meta":
            raise BundleError(f"result value {where} is a meta tensor and has no values; save a real tensor")
        if tensor.dtype not in TENSOR_DTYPES:
            raise BundleError(
                f"result value {where} has dtype {tensor.dtype}, which safetensors cannot store; "
                "save tensor.to(torch.float32) (or another supported dtype) instead"
            )
        # A private contiguous CPU copy: views, shared storage and later in-place edits cannot leak in.
        copy = tensor.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
        copy = copy.resolve_conj().resolve_neg()
        if type(copy) is not torch.Tensor:
            copy = copy.as_subclass(torch.Tensor)
        name = f"t{len(self.tensors)}"
        self.tensors[name] = copy
        return name

    @staticmethod
    def _key(key: Any, where: str) -> str:
        if not isinstance(key, str):
            raise BundleError(f"result value {where} is a dict with a {type(key).__name__} key {key!r}; "
                              "use string keys")
        return key


@functools.cache
def _transformers_classes() -> tuple[Any, Any] | None:
    """(ModelOutput, Cache) from transformers; only called once transformers is imported anyway."""
    try:
        from transformers.cache_utils import Cache
        from transformers.utils import ModelOutput
    except ImportError:
        return None
    return ModelOutput, Cache


def _decode(data: bytes) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BundleError(f"a result bundle is bytes, got {type(data).__name__}")
    data = bytes(data)
    manifest = _read_manifest(data)
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise BundleError(f"the result bundle's tensor data is corrupt ({str(exc)[:200]})") from None
    decoder = _Decoder(tensors)
    values = manifest.get("values")
    if not isinstance(values, list):
        raise BundleError("the result bundle's manifest 'values' must be a list of [name, value] pairs")
    out: dict[str, Any] = {}
    for pair in values:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise BundleError("the result bundle's manifest 'values' must be a list of [name, value] pairs")
        out[pair[0]] = decoder.decode(pair[1], 0)
    unused = set(tensors) - decoder.used
    if unused:
        raise BundleError(f"the result bundle holds tensors its manifest never names: {sorted(unused)[:5]}")
    return out


def _read_manifest(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise BundleError(f"a result bundle has at least 8 bytes, got {len(data)}")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise BundleError("the result bundle's header length is larger than the bundle: truncated or not a bundle")
    header = json.loads(data[8:8 + size], parse_constant=_reject_constant)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    text = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise BundleError(f"not an interp-sandbox result bundle: no {MANIFEST_KEY!r} in the safetensors metadata")
    manifest = json.loads(text, parse_constant=_reject_constant)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"not an interp-sandbox result bundle: the manifest's format is not {FORMAT!r}")
    version = manifest.get("version")
    if version != VERSION or isinstance(version, bool):
        raise BundleError(
            f"result bundle format version {str(version)[:20]!r} is not supported (this code reads version "
            f"{VERSION}); upgrade interp-sandbox on the side that is older"
        )
    return manifest


def _reject_constant(name: str) -> Any:
    raise BundleError(f"the result bundle's JSON contains {name}, which this format never writes")


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def decode(self, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise BundleError(f"the result bundle's manifest is nested more than {MAX_DEPTH} levels deep")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, depth + 1) for v in node]
        if not isinstance(node, dict) or len(node) != 1:
            raise BundleError("the result bundle's manifest has an object that is not a one-key tagged value")
        ((tag, body),) = node.items()
        if tag == "$tensor":
            return self._tensor(body)
        if tag == "$float":
            if body not in ("nan", "inf", "-inf"):
                raise BundleError("a $float in the result bundle must be 'nan', 'inf' or '-inf'")
            return float(body)
        if tag == "$tuple":
            return tuple(self.decode(v, depth + 1) for v in _list(body, tag))
        if tag == "$dict":
            return dict(self._pairs(body, tag, depth))
        if tag == "$size":
            return torch.Size(_ints(body))
        if tag == "$dtype":
            if not isinstance(body, str) or body not in _ALL_DTYPES:
                raise BundleError(f"unknown dtype {str(body)[:40]!r} in the result bundle")
            return _ALL_DTYPES[body]
        if tag == "$output":
            body = _list(body, tag)
            if len(body) != 2 or not isinstance(body[0], str):
                raise BundleError("an $output in the result bundle must be [class name, [[field, value], ...]]")
            return _model_output(body[0], dict(self._pairs(body[1], tag, depth)))
        raise BundleError(f"unknown tag {str(tag)[:40]!r} in the result bundle's manifest")

    def _tensor(self, name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in self.tensors:
            raise BundleError(f"the result bundle's manifest names a tensor {str(name)[:40]!r} that the file lacks")
        if name in self.used:
            raise BundleError(f"the result bundle's manifest names the tensor {name!r} twice")
        self.used.add(name)
        return self.tensors[name]

    def _pairs(self, body: Any, tag: str, depth: int) -> list[tuple[str, Any]]:
        pairs = []
        for pair in _list(body, tag):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise BundleError(f"{tag} entries in the result bundle must be [string, value] pairs")
            pairs.append((pair[0], self.decode(pair[1], depth + 1)))
        return pairs


def _list(body: Any, tag: str) -> list[Any]:
    if not isinstance(body, list):
        raise BundleError(f"a {tag} in the result bundle must hold a JSON array")
    return body


def _ints(body: Any) -> list[int]:
    if not isinstance(body, list) or not all(type(v) is int and 0 <= v < 2**63 for v in body):
        raise BundleError("a $size in the result bundle must be a list of non-negative 64-bit integers")
    return body


def _model_output(name: str, fields: dict[str, Any]) -> Any:
    """The ModelOutput class ``name`` from transformers.modeling_outputs, else a plain dict (see module doc)."""
    if not name.isidentifier() or name.startswith("_"):
        return fields
    from transformers import modeling_outputs
    from transformers.utils import ModelOutput

    cls = getattr(modeling_outputs, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelOutput) and dataclasses.is_dataclass(cls)):
        return fields
    names = [f.name for f in dataclasses.fields(cls)]
    if not names or not set(fields) <= set(names):
        return fields
    first = fields.get(names[0])
    # ModelOutput.__post_init__ reinterprets a lone non-tensor first field as (key, value) pairs: never feed it one.
    if first is not None and not isinstance(first, torch.Tensor) and all(fields.get(n) is None for n in names[1:]):
        return fields
    try:
        return cls(**fields)
    except Exception:
        return fields
