"""sandbox_server.config: a wrong file is one ConfigError naming each wrong key (TOML path), the value and
what is allowed; good files load; the defaults are the documented ones (infra/server.example.toml)."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pydantic
import pytest

from sandbox_server.config import (
    SECTIONS,
    SERVER_KEYS,
    BatchingConfig,
    ConfigError,
    JobsConfig,
    KeyDefaults,
    LoggingConfig,
    ModelConfig,
    ServerConfig,
    StoreConfig,
    dump_toml,
)
from validator import Limits

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "server.example.toml"
MODEL = '[[models]]\nname = "m"\nsource = "random"\nconfig = { model_type = "gpt2" }\n'


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_PORT", raising=False)
    monkeypatch.delenv("SANDBOX_DATA_DIR", raising=False)


def load(tmp_path: Path, text: str) -> ServerConfig:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return ServerConfig.load(path)


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


@pytest.mark.parametrize(("text", "key_and_value", "allowed"), [
    ('[server]\nport = "x"', 'server.port = "x"', "an integer from 1 to 65535"),
    ("[server]\nport = 70000", "server.port = 70000", "an integer from 1 to 65535"),
    ("[server]\nport = true", "server.port = true", "an integer from 1 to 65535"),
    ('[server]\nport = "8000"', 'server.port = "8000"', "an integer from 1 to 65535"),      # strict: never converted
    ("[server]\nweb_workers = 0", "server.web_workers = 0", "an integer >= 1"),
    ('[server]\nomp_wait_policy = "spin"', 'server.omp_wait_policy = "spin"', 'one of "passive", "active", ""'),
    ("[server]\nshared_imports = 1", "server.shared_imports = 1", "true or false"),
    ('[jobs]\ntimeout_s = "sixty"', 'jobs.timeout_s = "sixty"', "a number > 0"),
    ("[jobs]\ntimeout_s = 0", "jobs.timeout_s = 0", "a number > 0"),
    ("[jobs]\ntimeout_s = inf", "jobs.timeout_s = inf", "a finite number > 0"),
    ("[jobs]\nworker_memory_mb = -1", "jobs.worker_memory_mb = -1", "an integer >= 0"),
    ("[limits]\nmax_nodes = -5", "limits.max_nodes = -5", "an integer >= 1"),
    ("[limits]\nmax_saves = 2.5", "limits.max_saves = 2.5", "an integer >= 1"),
    ("[limits]\nmax_source_length = -1", "limits.max_source_length = -1", "an integer >= 0"),
    ("[batching]\nmax_batch = 0", "batching.max_batch = 0", "an integer >= 1"),
    ("[batching]\nburst_wait_ms = -1", "batching.burst_wait_ms = -1", "a number >= 0"),
    ('[store]\nkind = "ftp"', 'store.kind = "ftp"', 'one of "local", "s3"'),
    ("[store]\nurl_expires_s = 0", "store.url_expires_s = 0", "an integer >= 1"),
    ("[keys]\nrate_per_minute = -1", "keys.rate_per_minute = -1", "an integer >= 0"),
    ('[logging]\nlevel = "LOUD"', 'logging.level = "LOUD"', 'one of "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"'),
    ('[logging]\nformat = "xml"', 'logging.format = "xml"', 'one of "text", "json"'),
    (MODEL + "threads = 0", "models[0].threads = 0", "an integer >= 1"),
    (MODEL + 'dtype = "int8"', 'models[0].dtype = "int8"', 'one of "float32", "float16", "bfloat16", "float64"'),
    ('[[models]]\nname = "a b"\nsource = "smollm2"', 'models[0].name = "a b"',
     "a name of letters, digits, '-', '_' or '.'"),
    ('[[models]]\nname = "m"\nsource = "hub"', 'models[0].source = "hub"', 'one of "smollm2", "folder", "random"'),
    ("[store]\nbucket = 5", "store.bucket = 5", "a string"),
    ("[limits]\nmax_nodes = 10\n[batching]\nmax_batch = []", "batching.max_batch = []", "an integer >= 1"),
])
def test_a_wrong_value_is_one_error_naming_key_value_and_what_is_allowed(tmp_path: Path, text: str,
                                                                         key_and_value: str, allowed: str) -> None:
    message = refusal(tmp_path, text)
    assert message == f"{tmp_path / 'server.toml'}: {key_and_value}: use {allowed}"


@pytest.mark.parametrize(("text", "expected"), [
    ("[limits]\nmax_nods = 5", "limits.max_nods: unknown key; allowed here: max_batch_rows, max_depth,"),
    ("[server]\nprot = 8000", "server.prot: unknown key; allowed here: data_dir, host,"),
    ("[server]\nmodels = []", "server.models: unknown key"),           # a section is not a [server] key
    ('[jobs]\ntimeout = 5', "jobs.timeout: unknown key; allowed here: inline_result_bytes,"),
    ('[logging]\nlevels = "INFO"', "logging.levels: unknown key; allowed here: format, level"),
    (MODEL + 'colour = "red"', "models[0].colour: unknown key; allowed here: config, description,"),
    ("[limts]\nmax_nodes = 5", "[limts]: unknown table; the file takes [server], [[models]], [store], [jobs]"),
    ("port = 8000", "port = 8000: a key outside any table; put it under [server]"),
])
def test_unknown_keys_are_refused_by_name(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in refusal(tmp_path, text)


def test_every_problem_of_a_file_is_in_one_error(tmp_path: Path) -> None:
    message = refusal(tmp_path, '[server]\nport = "x"\n[limits]\nmax_nodes = -5\nmax_nods = 1\n'
                                '[jobs]\ntimeout_s = "sixty"\n')
    assert message.startswith(f"{tmp_path / 'server.toml'}: 4 problems: ")
    for part in ('server.port = "x"', "limits.max_nodes = -5", "limits.max_nods: unknown key",
                 'jobs.timeout_s = "sixty"'):
        assert message.count(part) == 1, message
    assert "\n" not in message        # the CLI prints it as one line


@pytest.mark.parametrize(("text", "expected"), [
    (MODEL + MODEL, "models: the name 'm' is used 2 times; model names must be unique"),
    ('[[models]]\nname = "m"\nsource = "folder"', 'models[0] (m): source = "folder" needs path = "/a/hf/folder"'),
    ('[[models]]\nname = "m"\nsource = "random"',
     'models[0] (m): source = "random" needs config = { model_type = "gpt2", ... }'),
    ('[store]\nkind = "s3"', 'store: kind = "s3" needs bucket = "..." (and endpoint_url for non-AWS servers)'),
    ('[[models]]\nsource = "smollm2"', "models[0].name is missing: give a name of letters, digits, '-', '_' or '.'"),
    ("models = 3", "models = 3: use one [[models]] table per model"),
    ("store = 3", "store = 3: use a table, [store]"),
])
def test_what_no_single_key_can_say(tmp_path: Path, text: str, expected: str) -> None:
    assert refusal(tmp_path, text) == f"{tmp_path / 'server.toml'}: {expected}"


def test_the_environment_overrides_port_and_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = f'[server]\nport = 8123\ndata_dir = "{tmp_path / "from-file"}"\n'
    assert load(tmp_path, text).port == 8123
    monkeypatch.setenv("SANDBOX_PORT", "9001")
    monkeypatch.setenv("SANDBOX_DATA_DIR", str(tmp_path / "from-env"))
    config = load(tmp_path, text)
    assert (config.port, config.data_dir) == (9001, tmp_path / "from-env")
    monkeypatch.setenv("SANDBOX_PORT", "nine")
    assert "SANDBOX_PORT='nine' (environment): use an integer from 1 to 65535" in refusal(tmp_path, text)
    monkeypatch.setenv("SANDBOX_PORT", "0")
    assert refusal(tmp_path, text).endswith("server.port = 0 (from SANDBOX_PORT): use an integer from 1 to 65535")


def test_relative_data_dir_is_taken_from_the_files_folder(tmp_path: Path) -> None:
    config = load(tmp_path, '[server]\ndata_dir = "state"\n')
    assert config.data_dir == tmp_path / "state" and config.source_path == tmp_path / "server.toml"


# The defaults as they were before the config was checked by pydantic: the documented values.
DEFAULTS = {
    "server": {"host": "127.0.0.1", "port": 8000, "web_workers": 2, "web_threads": 8, "max_request_mb": 16.0,
               "shared_imports": True, "omp_wait_policy": ""},
    "store": {"kind": "local", "path": "", "endpoint_url": "", "bucket": "", "access_key": "", "secret_key": "",
              "region": "us-east-1", "prefix": "", "create_bucket": False, "url_expires_s": 900},
    "jobs": {"timeout_s": 60.0, "kill_grace_s": 5.0, "worker_memory_mb": 0, "worker_heap_keep_mb": 512,
             "result_ttl_s": 86400.0, "sweep_interval_s": 60.0, "max_wait_s": 30.0, "inline_result_bytes": 1048576},
    "batching": {"max_batch": 8, "max_batch_tokens": 4096, "batch_wait_ms": 2.0, "burst_wait_ms": 50.0,
                 "return_wait_ms": 100.0},
    "keys": {"rate_per_minute": 600, "daily_jobs": 20000},
    "logging": {"level": "INFO", "format": "text"},
}


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    config = ServerConfig.from_dict({})
    assert {k: getattr(config, k) for k in DEFAULTS["server"]} == DEFAULTS["server"]
    assert config.data_dir == Path(".sandbox-data").resolve() and config.models == ()
    for name, kind in (("store", StoreConfig), ("jobs", JobsConfig), ("batching", BatchingConfig),
                       ("keys", KeyDefaults), ("logging", LoggingConfig)):
        assert dataclasses.asdict(getattr(config, name)) == DEFAULTS[name] == dataclasses.asdict(kind()), name
    assert config.limits == Limits()
    # the example file spells every option out with its default
    example = ServerConfig.load(EXAMPLE)
    assert dataclasses.replace(example, data_dir=config.data_dir, models=(), source_path=None) == config
    assert example.models == ServerConfig.embedded_default(tmp_path).models


def test_the_example_config_names_every_option_with_its_default() -> None:
    """infra/server.example.toml documents every field of every section, at its default value."""
    data = tomllib.loads(EXAMPLE.read_text())
    config, defaults = ServerConfig.load(EXAMPLE), ServerConfig()
    assert set(data) == {"server", "models", *SECTIONS}
    assert set(data["server"]) == SERVER_KEYS
    for section in SECTIONS:
        assert getattr(config, section) == getattr(defaults, section), section
        assert set(data[section]) == {f.name for f in dataclasses.fields(getattr(defaults, section))}, section
    assert set(data["models"][0]) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert [m.name for m in config.models] == [m.name for m in ServerConfig.embedded_default(Path("x")).models]


def test_a_written_config_loads_back_equal(tmp_path: Path) -> None:
    config = dataclasses.replace(ServerConfig.load(EXAMPLE), port=9100, logging=LoggingConfig("DEBUG", "json"),
                                 limits=Limits(max_nodes=77), source_path=None)
    (tmp_path / "server.toml").write_text(dump_toml(config))
    assert dataclasses.replace(ServerConfig.load(tmp_path / "server.toml"), source_path=None) == config


def test_objects_built_in_code_are_checked_and_frozen(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path, models=(ModelConfig(name="m", source="smollm2"),))
    with pytest.raises(pydantic.ValidationError, match="port"):
        ServerConfig(port="x")                   # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="max_batch"):
        dataclasses.replace(config, batching=BatchingConfig(max_batch=0))
    with pytest.raises(pydantic.ValidationError, match="timeout_s"):
        dataclasses.replace(config.jobs, timeout_s=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1                          # type: ignore[misc]
    assert dataclasses.replace(config, port=9000).port == 9000 and config.port == 8000
    assert ServerConfig(data_dir=str(tmp_path)).data_dir == tmp_path    # type: ignore[arg-type]
