"""Wire encoding of the values that appear inside graph nodes: literals, references, tensors.

    >>> encode_value((1, slice(None, 2), Ref(3)))
    {'$tuple': [1, {'$slice': [None, 2, None]}, {'$ref': 3}]}

Every non-JSON value becomes a one-key object whose key starts with ``$``; plain JSON
objects never appear, so decoding is unambiguous. Tensors travel as base64 safetensors
bytes: no pickle anywhere.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    "complex64": torch.complex64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class GraphFormatError(ValueError):
    """The JSON text is not a well-formed intervention graph; the message says which part."""


@dataclass(frozen=True)
class Ref:
    """A reference to the value of the node with this id."""

    id: int


def encode_value(value: Any) -> Any:
    """Python value -> JSON-compatible structure (see module docstring)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, Ref):
        return {"$ref": value.id}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v) for v in value]}
    if isinstance(value, dict):
        return {"$dict": [[_dict_key(k), encode_value(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [encode_value(value.start), encode_value(value.stop), encode_value(value.step)]}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"$dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.Tensor):
        return {"$tensor": encode_tensor(value)}
    raise GraphFormatError(
        f"a value of type {type(value).__name__} cannot be part of an intervention graph; "
        "use tensors, numbers, strings, lists, tuples, dicts, slices or dtypes"
    )


def decode_value(data: Any) -> Any:
    """JSON structure -> Python value; raises GraphFormatError on anything malformed."""
    if data is None or isinstance(data, (bool, int, str)):
        return data
    if isinstance(data, float):
        return data
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise GraphFormatError(f"expected a tagged value like {{'$ref': 3}}, got {_preview(data)}")
    (tag, body), = data.items()
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise GraphFormatError(f"unknown value tag {tag!r}")
    return decoder(body)


def encode_tensor(tensor: torch.Tensor) -> str:
    """A tensor as base64 of safetensors bytes (dtype, shape and data; never pickle)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in DTYPE_NAMES:
        raise GraphFormatError(f"tensors of dtype {t.dtype} cannot be sent; convert with .to(torch.float32)")
    return base64.b64encode(st_save({"t": t.contiguous()})).decode("ascii")


def decode_tensor(text: Any) -> torch.Tensor:
    """Inverse of encode_tensor, through safetensors' loader only."""
    if not isinstance(text, str):
        raise GraphFormatError("a $tensor value must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        tensors = st_load(raw)
    except Exception as exc:  # safetensors raises several types on corrupt input
        raise GraphFormatError(f"tensor literal is not valid base64 safetensors data: {exc}") from None
    if set(tensors) != {"t"}:
        raise GraphFormatError("a tensor literal must hold exactly one tensor named 't'")
    return tensors["t"]


def _dict_key(key: Any) -> str:
    if not isinstance(key, str):
        raise GraphFormatError(f"dict keys in a graph must be strings, got {type(key).__name__}")
    return key


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise GraphFormatError(f"dtype {dtype} is not supported in graphs") from None


def _preview(data: Any) -> str:
    text = repr(data)
    return text if len(text) < 80 else text[:77] + "..."


def _decode_float(body: Any) -> float:
    if body not in ("nan", "inf", "-inf"):
        raise GraphFormatError(f"$float must be 'nan', 'inf' or '-inf', got {_preview(body)}")
    return float(body)


def _decode_ref(body: Any) -> Ref:
    if not isinstance(body, int) or isinstance(body, bool) or body < 0:
        raise GraphFormatError(f"$ref must be a non-negative integer node id, got {_preview(body)}")
    return Ref(body)


def _decode_list(body: Any, what: str) -> list[Any]:
    if not isinstance(body, list):
        raise GraphFormatError(f"{what} must be a JSON array, got {_preview(body)}")
    return [decode_value(v) for v in body]


def _decode_dict(body: Any) -> dict[str, Any]:
    if not isinstance(body, list):
        raise GraphFormatError("$dict must be a list of [key, value] pairs")
    out: dict[str, Any] = {}
    for pair in body:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise GraphFormatError(f"$dict entries must be [string, value] pairs, got {_preview(pair)}")
        out[pair[0]] = decode_value(pair[1])
    return out


def _decode_slice(body: Any) -> slice:
    parts = _decode_list(body, "$slice")
    if len(parts) != 3:
        raise GraphFormatError("$slice must have exactly three entries [start, stop, step]")
    return slice(*parts)


def _decode_size(body: Any) -> torch.Size:
    if not isinstance(body, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in body):
        raise GraphFormatError("$size must be a list of integers")
    return torch.Size(body)


def _decode_dtype(body: Any) -> torch.dtype:
    if not isinstance(body, str) or body not in DTYPES:
        raise GraphFormatError(f"unknown dtype {_preview(body)}; known: {', '.join(DTYPES)}")
    return DTYPES[body]


def _decode_device(body: Any) -> torch.device:
    if not isinstance(body, str) or len(body) > 32:
        raise GraphFormatError("$device must be a short string such as 'cpu'")
    try:
        return torch.device(body)
    except RuntimeError:
        raise GraphFormatError(f"invalid device {_preview(body)}") from None


def _decode_ellipsis(body: Any) -> Any:
    if body is not True:
        raise GraphFormatError("$ellipsis must be true")
    return Ellipsis


_DECODERS: dict[str, Any] = {
    "$float": _decode_float,
    "$ref": _decode_ref,
    "$tuple": lambda body: tuple(_decode_list(body, "$tuple")),
    "$dict": _decode_dict,
    "$slice": _decode_slice,
    "$ellipsis": _decode_ellipsis,
    "$size": _decode_size,
    "$dtype": _decode_dtype,
    "$device": _decode_device,
    "$tensor": decode_tensor,
}

#: the tags of tagged values (``{"$tensor": ...}``, ``{"$slice": ...}``, ...) the format knows
VALUE_TAGS: tuple[str, ...] = tuple(_DECODERS)
