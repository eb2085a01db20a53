"""Package entry points load on first use: the server's supervisor and gunicorn's master never import torch,
and every exported name is the documented object even after its submodule was imported directly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_supervisor_cli_and_gunicorn_config_do_not_import_torch(tmp_path: Path) -> None:
    """Also: gunicorn's master (GunicornApp, built as the web tier builds it) and infra/gunicorn.conf.py, the
    file for the plain gunicorn command, which must give the same settings."""
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\nport = 8123\n')
    code = ("import os, runpy, sys\n"
            f"os.environ['SANDBOX_CONFIG'] = {str(config)!r}\n"
            "import sandbox_server.supervisor, sandbox_server.cli, sandbox_server.config, sandbox_server.jobends\n"
            "from sandbox_server.gunicorn_app import GunicornApp, gunicorn_settings\n"
            "from sandbox_server.config import ServerConfig\n"
            f"conf = runpy.run_path({str(ROOT / 'infra' / 'gunicorn.conf.py')!r})\n"
            "config = ServerConfig.load(os.environ['SANDBOX_CONFIG'])\n"
            "assert GunicornApp(config).cfg.bind == ['127.0.0.1:8123']\n"
            "assert all(conf[k] == v for k, v in gunicorn_settings(config).items()), conf\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    assert _run(code) == "[]"


def test_exported_names_are_never_shadowed_by_their_submodules() -> None:
    code = ("import importlib, inspect, pkgutil\n"
            "import sandbox_client, storage, validator\n"
            "for pkg in (sandbox_client, storage, validator):\n"
            "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "bad = [f'{p.__name__}.{n}' for p in (sandbox_client, storage, validator) for n in p.__all__\n"
            "       if inspect.ismodule(getattr(p, n))]\n"
            "print(bad)")
    assert _run(code) == "[]"


def test_lazy_names_match_their_modules() -> None:
    import sandbox_client as sc
    import validator
    from sandbox_client.language_model import LanguageModel
    from validator.check import validate

    assert sc.LanguageModel is LanguageModel and validator.validate is validate
    assert set(sc.__all__) <= set(dir(sc)) and set(validator.__all__) <= set(dir(validator))
