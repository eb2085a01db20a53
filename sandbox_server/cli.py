"""The ``interp-sandbox`` command: run the server, manage API keys.

    interp-sandbox serve --config server.toml                 # API + model workers (see infra/README.md)
    interp-sandbox serve --embedded --data-dir ./data --port 8000
    interp-sandbox serve --embedded --models tiny-gpt2        # a subset of the embedded models (no SmolLM2)
    interp-sandbox keys create --config server.toml --name alice --models tiny-gpt2 --rate 60
    interp-sandbox keys list --config server.toml             # never shows secrets
    interp-sandbox keys revoke --config server.toml alice     # by id or name

Every command takes ``--config PATH`` (or ``$SANDBOX_CONFIG``) or ``--data-dir D`` (the embedded
setup's data folder; ``serve --embedded`` defaults to ``./.sandbox-data``). ``keys create`` prints the
key alone on stdout (details on stderr), so ``KEY=$(interp-sandbox keys create ...)`` works. Errors: one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, ServerConfig
from .db import Database
from .types import KeyRecord

EXIT_ERROR = 2


class CliError(Exception):
    """A command cannot run as asked; the message says what to pass instead."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns (and, as a script, exits with) its status."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (CliError, ConfigError, ValueError, OSError) as err:
        print(f"interp-sandbox: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    return 0


# ----- commands ------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> None:
    if args.embedded:
        if args.config:
            raise CliError("give either --config or --embedded, not both")
        config = ServerConfig.embedded_default(Path(args.data_dir or ".sandbox-data"), port=args.port or 8000)
        if args.models:
            chosen = _model_names(config, args.models)
            config = dataclasses.replace(config, models=tuple(m for m in config.models if m.name in chosen))
    else:
        if args.models:
            raise CliError("--models chooses among the embedded models (with --embedded); with --config, list "
                           "the models to serve as [[models]] in the file")
        if args.port:    # the server's processes load the config file themselves: override it for them too
            os.environ["SANDBOX_PORT"] = str(args.port)
        config = _config(args)
    from .supervisor import serve  # the process tree (gunicorn + model workers) only when serving

    serve(config)


def _keys_create(args: argparse.Namespace) -> None:
    from .keys import create_key

    config = _config(args)
    models = _model_names(config, args.models) if args.models else None
    rate = config.keys.rate_per_minute if args.rate is None else args.rate
    daily = config.keys.daily_jobs if args.daily_jobs is None else args.daily_jobs
    record, plaintext = create_key(_db(config), args.name, models=models, rate=rate, daily_jobs=daily)
    print(f"created key {record.id} for {record.name}: {_limits(record)}; store it now, it is not shown again",
          file=sys.stderr)
    print(plaintext)


def _keys_list(args: argparse.Namespace) -> None:
    from .keys import list_keys

    records = list_keys(_db(_config(args)))
    if args.json:
        print(json.dumps([_key_json(k) for k in records], indent=2))
        return
    rows = [("ID", "NAME", "MODELS", "LIMITS", "CREATED", "STATUS")]
    rows += [(k.id, k.name, ",".join(k.models) if k.models else "*", _limits(k), _when(k.created),
              f"revoked {_when(k.revoked)}" if k.revoked else "active") for k in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _keys_revoke(args: argparse.Namespace) -> None:
    from .keys import revoke_key

    record = revoke_key(_db(_config(args)), args.key)
    print(f"revoked key {record.id} ({record.name})")


# ----- helpers -------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> ServerConfig:
    if args.config and args.data_dir:
        raise CliError("give either --config or --data-dir, not both")
    if args.data_dir:
        return ServerConfig.embedded_default(Path(args.data_dir))
    path = args.config or os.environ.get("SANDBOX_CONFIG")
    if not path:
        raise CliError("say which server: --config server.toml (or $SANDBOX_CONFIG), or --data-dir for the "
                       "embedded setup")
    return ServerConfig.load(path)


def _model_names(config: ServerConfig, text: str) -> list[str]:
    """The comma-separated model names of ``text``, each one of ``config``'s models (CliError otherwise)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if config.model(m) is None]
    if unknown or not names:
        served = ", ".join(m.name for m in config.models) or "none"
        raise CliError(f"no model {', '.join(unknown) if unknown else repr(text)} in the config; served models: "
                       f"{served}")
    return names


def _db(config: ServerConfig) -> Database:
    return Database(config.db_path)


def _limits(key: KeyRecord) -> str:
    rate = f"{key.rate_per_minute}/min" if key.rate_per_minute else "no rate limit"
    daily = f"{key.daily_jobs}/day" if key.daily_jobs else "no daily quota"
    models = ",".join(key.models) if key.models else "every model"
    return f"{models}, {rate}, {daily}"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"


def _key_json(key: KeyRecord) -> dict[str, object]:
    return {"id": key.id, "name": key.name, "models": list(key.models) if key.models else None,
            "rate_per_minute": key.rate_per_minute, "daily_jobs": key.daily_jobs, "created": key.created,
            "revoked": key.revoked}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp-sandbox", description="Run the interp-sandbox server and "
                                     "manage its API keys.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the API and the model workers")
    _where(serve)
    serve.add_argument("--embedded", action="store_true", help="built-in setup: SmolLM2-135M and a tiny GPT-2, "
                       "SQLite, local results under --data-dir")
    serve.add_argument("--port", type=int, help="port to listen on (default: the config's, or 8000)")
    embedded = ", ".join(m.name for m in ServerConfig.embedded_default(Path(".sandbox-data")).models)
    serve.add_argument("--models", help=f"with --embedded: comma-separated names of the embedded models to serve "
                       f"({embedded}; default: all)")
    serve.set_defaults(run=_serve)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key and print it (once)")
    _where(create)
    create.add_argument("--name", required=True, help="who the key is for (unique among active keys)")
    create.add_argument("--models", help="comma-separated model names the key may use (default: every model)")
    create.add_argument("--rate", type=int, help="jobs per minute, 0 = unlimited (default: the config's [keys])")
    create.add_argument("--daily-jobs", type=int, help="jobs per UTC day, 0 = unlimited (default: the config's)")
    create.set_defaults(run=_keys_create)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    _where(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by id or name")
    _where(revoke)
    revoke.add_argument("key", metavar="ID_OR_NAME")
    revoke.set_defaults(run=_keys_revoke)
    return parser


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the server's TOML config (default: $SANDBOX_CONFIG)")
    parser.add_argument("--data-dir", help="the embedded setup's data folder (instead of --config)")


if __name__ == "__main__":
    sys.exit(main())
