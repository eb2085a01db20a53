"""sandbox_server.models: every source and tokenizer kind, against models built independently."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from conftest import ARCHS, build_tiny
from serverproc import TINY_MODELS

from sandbox_server.config import ModelConfig
from sandbox_server.models import DTYPES, ModelLoadError, gpt2_bpe_tokenizer, load_model


def tiny_config(arch: str, **overrides: Any) -> ModelConfig:
    return dataclasses.replace(ModelConfig(**TINY_MODELS[f"tiny-{arch}"]), **overrides)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_random_model_is_build_tiny_bit_for_bit(arch: str) -> None:
    model, tokenizer = load_model(tiny_config(arch))
    reference = build_tiny(arch)
    assert type(model) is type(reference)
    assert_same_weights(model, reference)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())     # as loaded: gradient graphs need them
    ids = torch.tensor([[464, 3139, 286, 4881, 318]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256


def test_seed_changes_the_weights() -> None:
    a, _ = load_model(tiny_config("gpt2"))
    b, _ = load_model(tiny_config("gpt2", seed=1))
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert_same_weights(b, build_tiny("gpt2", seed=1))


def test_gpt2_bpe_matches_the_reference_tokenizer(gpt2_tokenizer: Any) -> None:
    tok = gpt2_bpe_tokenizer()
    text = "The Eiffel Tower is in the city of Paris. Ünïcödé ✓"
    assert tok(" Paris").input_ids == [6342]
    assert tok(text).input_ids == gpt2_tokenizer(text).input_ids
    assert len(tok) == 50257 and tok.pad_token == tok.eos_token


def test_every_dtype_the_config_admits_is_known() -> None:
    """A wrong dtype is refused when the config loads (tests/server/test_config.py), so load_model has no check."""
    assert set(get_args(ModelConfig.__pydantic_fields__["dtype"].annotation)) == set(DTYPES)


def test_dtype_is_applied() -> None:
    model, _ = load_model(tiny_config("llama", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = build_tiny("llama").to(torch.bfloat16)
    assert_same_weights(model, reference)


def test_folder_source_with_its_own_tokenizer(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    saved = build_tiny("qwen2", seed=3)
    saved.save_pretrained(tmp_path / "m")
    gpt2_tokenizer.save_pretrained(tmp_path / "m")
    model, tokenizer = load_model(ModelConfig(name="local", source="folder", path=str(tmp_path / "m")))
    assert_same_weights(model, saved)
    assert not model.training
    assert tokenizer(" Paris").input_ids == [6342]


def test_tokenizer_folder_overrides_and_random_models_have_none(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    gpt2_tokenizer.save_pretrained(tmp_path / "tok")
    _, tokenizer = load_model(tiny_config("gpt2", tokenizer=str(tmp_path / "tok")))
    assert tokenizer(" Paris").input_ids == [6342]
    _, none = load_model(tiny_config("gpt2", tokenizer=""))
    assert none is None


@pytest.mark.parametrize("overrides, words", [
    ({"config": {"model_type": "no-such-arch"}}, "bad random-model config"),
    ({"config": {"n_layer": 2}}, "model_type"),
    ({"tokenizer": "/no/such/folder"}, "tokenizer folder"),
    ({"source": "folder", "path": "/no/such/folder"}, "not a Hugging Face model folder"),
    ({"device": "no-such-device"}, "cannot move the model to device"),
])
def test_load_errors_say_what_to_fix(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ModelLoadError, match=words):
        load_model(tiny_config("gpt2", **overrides))


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_source_loads_the_converted_folder() -> None:
    model, tokenizer = load_model(ModelConfig(name="smollm2-135m", source="smollm2"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([top]) == " Paris"
