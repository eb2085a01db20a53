"""storage/bundle.py: result bundles round-trip every supported value bitwise and refuse hostile bytes.

References: the original values (compared bit for bit through integer views), and safetensors'
own file reader (``safe_open``) for what the file holds.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.gpt2.modeling_gpt2 import GPT2DoubleHeadsModelOutput

from storage import BundleError, decode_results, encode_results
from storage.bundle import FORMAT, MANIFEST_KEY, MAX_DEPTH, TENSOR_DTYPES, VERSION

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_OF_SIZE[t.element_size()])


def assert_same(a: Any, b: Any) -> None:
    """Structural equality with exact types, and bitwise equality for tensors and floats."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(bits(a), bits(b))
    elif isinstance(a, float):
        assert math.copysign(1, a) == math.copysign(1, b)
        assert (math.isnan(a) and math.isnan(b)) or a == b
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def round_trip(values: dict[str, Any]) -> dict[str, Any]:
    return decode_results(encode_results(values))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Every bit pattern is fair game (nan payloads, -0.0, subnormals), except for bool."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def craft(manifest: Any, tensors: dict[str, torch.Tensor] | None = None, raw: str | None = None) -> bytes:
    """A safetensors file with a hand-written manifest (the hostile server's view)."""
    text = raw if raw is not None else json.dumps(manifest)
    return st_save(tensors or {}, metadata={MANIFEST_KEY: text})


def manifest(values: list[Any], version: Any = VERSION) -> dict[str, Any]:
    return {"format": FORMAT, "version": version, "values": values}


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(TENSOR_DTYPES, key=str), ids=str)
def test_every_dtype_round_trips_bitwise(dtype: torch.dtype) -> None:
    values = {"a": random_tensor(dtype, (3, 5)), "b": random_tensor(dtype, (7,), seed=1)}
    assert_same(round_trip(values), values)


def test_the_dtypes_cover_what_the_contract_names() -> None:
    needed = {torch.bool, torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int16,
              torch.int32, torch.int64, torch.uint8}
    assert needed <= TENSOR_DTYPES


def test_special_float_values_keep_their_bits() -> None:
    patterns = torch.tensor([0x00000000, 0x80000000, 0x7FC00000, 0x7FC00001, 0xFFC00123, 0x7F800000, 0xFF800000,
                             0x00000001, 0x7F7FFFFF], dtype=torch.int64).to(torch.int32)
    x = patterns.view(torch.float32)
    out = round_trip({"x": x})["x"]
    assert torch.equal(out.view(torch.int32), patterns)


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,), (1, 1, 1, 1)])
def test_zero_dim_and_empty_tensors(shape: tuple[int, ...]) -> None:
    values = {"f": random_tensor(torch.float32, shape), "b": random_tensor(torch.bool, shape)}
    assert_same(round_trip(values), values)


def test_non_contiguous_views_and_shared_storage() -> None:
    base = random_tensor(torch.float32, (6, 8))
    values = {
        "base": base,
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": base[0].expand(4, 8),
        "as_strided": base.as_strided((3, 3), (1, 3), 2),
        "view": base.view(48)[5:9],
        "again": base,
        "nested": [base[1], (base[2:4],)],
    }
    out = round_trip(values)
    assert_same(out, values)
    for name, tensor in out.items():
        if isinstance(tensor, torch.Tensor):
            assert tensor.is_contiguous(), name
    out["base"].zero_()  # decoded tensors do not alias each other
    assert not torch.equal(out["again"], out["base"])


def test_encoding_takes_a_snapshot() -> None:
    x = torch.ones(3)
    data = encode_results({"x": x})
    x.mul_(5)
    assert torch.equal(decode_results(data)["x"], torch.ones(3))


def test_tensors_requiring_grad_are_detached() -> None:
    leaf = torch.randn(3, requires_grad=True)
    values = {"leaf": leaf, "nonleaf": leaf * 2, "param": torch.nn.Parameter(torch.randn(2, 2))}
    out = round_trip(values)
    for name in values:
        assert type(out[name]) is torch.Tensor and not out[name].requires_grad
        assert torch.equal(bits(out[name]), bits(values[name].detach()))


def test_conjugate_and_negative_views_are_materialized() -> None:
    z = random_tensor(torch.complex64, (4,))
    x = torch.randn(3)
    out = round_trip({"conj": z.conj(), "neg": x._neg_view()})
    assert not out["conj"].is_conj() and not out["neg"].is_neg()
    assert torch.equal(bits(out["conj"]), bits(z.conj().resolve_conj()))
    assert torch.equal(bits(out["neg"]), bits(-x))


def test_python_scalars_keep_type_and_value() -> None:
    values: dict[str, Any] = {
        "none": None, "true": True, "false": False, "zero": 0, "neg": -5, "big": 2**80, "-big": -(2**70),
        "float": 1.5, "int-valued float": 3.0, "negzero": -0.0, "nan": float("nan"), "inf": float("inf"),
        "-inf": float("-inf"), "tiny": 5e-324, "max": 1.7976931348623157e308, "str": "", "unicode": "Paris ✓ 𝔁",
        "surrogate": "\ud800", "dollar": "$tensor", "nul": "a\x00b",
    }
    assert_same(round_trip(values), values)


def test_containers_keep_their_types_and_order() -> None:
    values: dict[str, Any] = {
        "list": [1, [2, [3]], []],
        "tuple": (1, (2,), ()),
        "dict": {"z": 1, "a": {"$tensor": "t0", "$dict": []}, "": None},
        "mixed": [{"k": (torch.arange(3), None)}, (torch.ones(2, dtype=torch.bfloat16), [0.5])],
        "size": torch.Size([2, 3, 0]),
        "empty size": torch.Size([]),
        "sizes": (torch.Size([1]), [torch.Size([4, 5])]),
        "dtypes": [torch.float32, torch.bfloat16, torch.bool, torch.complex128, torch.qint8, torch.int64],
    }
    out = round_trip(values)
    assert_same(out, values)
    assert type(out["size"]) is torch.Size and type(out["sizes"][0]) is torch.Size


def test_named_tuples_come_back_as_tuples() -> None:
    result = torch.max(torch.tensor([[1.0, 3.0], [2.0, 0.0]]), dim=1)  # torch.return_types.max
    assert_same(round_trip({"max": result})["max"], tuple(result))


def test_top_level_keys_in_order_and_empty_bundle() -> None:
    values = {str(i): i for i in (5, 1, 3)}
    assert list(round_trip(values)) == ["5", "1", "3"]
    assert round_trip({}) == {}


def test_nesting_up_to_the_limit_round_trips() -> None:
    value: Any = torch.ones(1)
    for _ in range(MAX_DEPTH):
        value = [value]
    assert_same(round_trip({"deep": value}), {"deep": value})


def test_model_output_is_rebuilt_and_cache_becomes_none() -> None:
    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), layer_idx=0)
    hidden = (torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    output = CausalLMOutputWithPast(logits=torch.randn(1, 3, 10), past_key_values=cache, hidden_states=hidden)
    out = round_trip({"out": output, "cache": cache, "in list": [cache]})
    assert type(out["out"]) is CausalLMOutputWithPast
    assert out["out"].past_key_values is None and out["cache"] is None and out["in list"] == [None]
    assert_same(out["out"].logits, output.logits)
    assert_same(out["out"].hidden_states, hidden)
    assert out["out"].loss is None
    assert out["out"][0] is out["out"].logits  # ModelOutput indexing still works


def test_real_model_forward_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)).eval()
    with torch.no_grad():
        output = model(torch.tensor([[1, 2, 3]]), use_cache=True, output_hidden_states=True)
    out = round_trip({"0": output})["0"]
    assert type(out) is type(output) and out.past_key_values is None
    assert_same(out.logits, output.logits)
    assert_same(out.hidden_states, output.hidden_states)


def test_model_specific_output_classes_become_plain_dicts() -> None:
    output = GPT2DoubleHeadsModelOutput(logits=torch.randn(2), mc_logits=torch.randn(1))
    out = round_trip({"o": output})["o"]
    assert type(out) is dict and list(out) == ["logits", "mc_logits"]
    assert_same(out["logits"], output.logits)


def test_file_is_plain_safetensors_with_the_manifest_in_its_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bundle.safetensors"
    path.write_bytes(encode_results({"3": torch.arange(4), "4": [torch.ones(2), 1.0]}))
    with safe_open(str(path), framework="pt") as f:
        names = sorted(f.keys())
        meta = json.loads(f.metadata()[MANIFEST_KEY])
        tensors = {n: f.get_tensor(n) for n in names}
    assert names == ["t0", "t1"]
    assert meta == manifest([["3", {"$tensor": "t0"}], ["4", [{"$tensor": "t1"}, 1.0]]])
    assert torch.equal(tensors["t0"], torch.arange(4))


# --- unsupported values ------------------------------------------------------------------------------------


class Custom:
    pass


def self_referencing() -> list[Any]:
    x: list[Any] = []
    x.append(x)
    return x


def too_deep() -> Any:
    value: Any = 1
    for _ in range(MAX_DEPTH + 2):
        value = (value,)
    return value


@pytest.mark.parametrize(("value", "named"), [
    (Custom(), "Custom"),
    ({1, 2}, "set"),
    (b"bytes", "bytes"),
    (torch.device("cpu"), "device"),
    (lambda: 1, "function"),
    ({1: torch.ones(1)}, "int key"),
    ([{"ok": [Custom()]}], "Custom"),
    (torch.ones(2, dtype=torch.complex128), "complex128"),
    (torch.ones(2).to_sparse(), "to_dense"),
    (torch.empty(2, device="meta"), "meta"),
    (self_referencing(), "nested"),
    (too_deep(), "nested"),
    (torch.nn.Linear(2, 2), "Linear"),
])
def test_unsupported_values_name_the_type_and_what_to_do(value: Any, named: str) -> None:
    with pytest.raises(BundleError, match=named) as info:
        encode_results({"7": value})
    assert "'7'" in str(info.value)


def test_non_string_top_level_key_is_refused() -> None:
    with pytest.raises(BundleError, match="strings"):
        encode_results({7: torch.ones(1)})  # type: ignore[dict-item]


def test_error_message_says_what_to_save() -> None:
    with pytest.raises(BundleError, match="save tensors"):
        encode_results({"x": Custom()})


# --- hostile bytes -----------------------------------------------------------------------------------------

GOOD = encode_results({"1": torch.arange(6, dtype=torch.float32).reshape(2, 3), "2": [1, (None, "x")]})


def test_every_truncation_is_a_bundle_error() -> None:
    for length in range(len(GOOD)):
        with pytest.raises(BundleError):
            decode_results(GOOD[:length])


def test_random_bytes_are_bundle_errors() -> None:
    rng = random.Random(0)
    for _ in range(300):
        with pytest.raises(BundleError):
            decode_results(rng.randbytes(rng.randrange(0, 400)))


def test_random_byte_flips_never_raise_anything_else() -> None:
    rng = random.Random(1)
    for _ in range(500):
        data = bytearray(GOOD)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode_results(bytes(data))
        except BundleError:
            pass


def test_tampered_tensor_bytes_change_the_sha256_the_client_checks() -> None:
    tampered = bytearray(GOOD)
    tampered[-1] ^= 0x40  # inside the last tensor's data: still a well-formed file
    assert hashlib.sha256(tampered).hexdigest() != hashlib.sha256(GOOD).hexdigest()
    decoded = decode_results(bytes(tampered))
    assert not torch.equal(decoded["1"], decode_results(GOOD)["1"])  # only the hash can tell


T = {"t0": torch.ones(2)}


@pytest.mark.parametrize(("data", "why"), [
    (craft(manifest([["a", {"$tensor": "t1"}]]), T), "lacks"),
    (craft(manifest([["a", {"$tensor": 0}]]), T), "lacks"),
    (craft(manifest([["a", {"$tensor": "t0"}], ["b", {"$tensor": "t0"}]]), T), "twice"),
    (craft(manifest([["a", 1]]), T), "never names"),
    (craft(manifest([["a", 1]], version=2)), "version"),
    (craft(manifest([["a", 1]], version="1")), "version"),
    (craft(manifest([["a", 1]], version=True)), "version"),
    (craft(manifest([["a", 1]], version=None)), "version"),
    (craft({"format": "other", "version": 1, "values": []}), "format"),
    (craft([1, 2]), "format"),
    (craft(None, raw="{not json"), "malformed"),
    (craft(None, raw='{"format": "interp-sandbox-results", "version": 1, "values": [["a", NaN]]}'), "NaN"),
    (craft(manifest({"a": 1})), "pairs"),  # type: ignore[arg-type]
    (craft(manifest([["a", 1, 2]])), "pairs"),
    (craft(manifest([[1, 1]])), "pairs"),
    (craft({"format": FORMAT, "version": 1}), "pairs"),
    (craft(manifest([["a", {"$eval": "1"}]])), "unknown tag"),
    (craft(manifest([["a", {"$tuple": [], "$dict": []}]])), "one-key"),
    (craft(manifest([["a", {"$float": "1e5"}]])), "float"),
    (craft(manifest([["a", {"$tuple": 5}]])), "array"),
    (craft(manifest([["a", {"$dict": [["k"]]}]])), "pairs"),
    (craft(manifest([["a", {"$dict": [[1, 2]]}]])), "pairs"),
    (craft(manifest([["a", {"$size": [1, True]}]])), "integers"),
    (craft(manifest([["a", {"$size": [10**40]}]])), "integers"),
    (craft(manifest([["a", {"$size": [-1]}]])), "integers"),
    (craft(manifest([["a", {"$dtype": "os.system"}]])), "dtype"),
    (craft(manifest([["a", {"$output": ["CausalLMOutputWithPast"]}]])), "output"),
    (craft(manifest([["a", {"$output": [5, []]}]])), "output"),
    (craft(manifest([["a", {"$output": ["X", {"k": 1}]}]])), "array"),
    (st_save({"t0": torch.ones(1)}), "no 'interp-sandbox-manifest'"),
    (st_save({"t0": torch.ones(1)}, metadata={"other": "x"}), "no 'interp-sandbox-manifest'"),
    ((2**64 - 1).to_bytes(8, "little") + b"{}", "header length"),
    (b"", "at least 8 bytes"),
])
def test_hostile_bundles_are_bundle_errors(data: bytes, why: str) -> None:
    with pytest.raises(BundleError, match=why):
        decode_results(data)


def nested_lists(depth: int) -> bytes:
    text = json.dumps(manifest([["a", "PLACEHOLDER"]])).replace('"PLACEHOLDER"', "[" * depth + "]" * depth)
    return craft(None, raw=text)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 2, 500, 5000, 200_000])
def test_deep_manifests_are_refused(depth: int) -> None:
    with pytest.raises(BundleError):
        decode_results(nested_lists(depth))


def test_nesting_limit_boundary() -> None:
    """MAX_DEPTH containers may enclose a value: the innermost of MAX_DEPTH + 1 lists is still allowed."""
    value = decode_results(nested_lists(MAX_DEPTH + 1))["a"]
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value == []


def test_deep_tagged_manifests_are_refused() -> None:
    node: Any = 1
    for _ in range(MAX_DEPTH + 1):
        node = {"$tuple": [node]}
    with pytest.raises(BundleError, match="nested"):
        decode_results(craft(manifest([["a", node]])))


@pytest.mark.parametrize("not_bytes", [None, "text", 5, [1]])
def test_non_bytes_input_is_a_bundle_error(not_bytes: Any) -> None:
    with pytest.raises(BundleError):
        decode_results(not_bytes)


@pytest.mark.parametrize("name", ["__class__", "torch", "ModelOutput", "dataclass", "os", "_private", "a.b", "x y"])
def test_output_class_names_outside_modeling_outputs_give_dicts(name: str) -> None:
    data = craft(manifest([["a", {"$output": [name, [["logits", {"$tensor": "t0"}]]]}]]), T)
    out = decode_results(data)["a"]
    assert type(out) is dict and torch.equal(out["logits"], T["t0"])


def test_output_fields_that_the_class_lacks_give_a_dict() -> None:
    data = craft(manifest([["a", {"$output": ["BaseModelOutputWithPast", [["__dict__", {"$dict": []}]]]}]]))
    assert decode_results(data)["a"] == {"__dict__": {}}


def test_lone_non_tensor_first_field_is_not_reinterpreted() -> None:
    """ModelOutput would read a lone list-of-pairs first field as attribute assignments; we give a dict."""
    pairs = [["__class__", 1], ["logits", 2]]
    data = craft(manifest([["a", {"$output": ["BaseModelOutputWithPast", [["last_hidden_state", pairs]]]}]]))
    out = decode_results(data)["a"]
    assert type(out) is dict and out["last_hidden_state"] == pairs
    field = ["last_hidden_state", {"$tensor": "t0"}]
    legit = craft(manifest([["a", {"$output": ["BaseModelOutputWithPast", [field]]}]]), T)
    assert type(decode_results(legit)["a"]) is BaseModelOutputWithPast
