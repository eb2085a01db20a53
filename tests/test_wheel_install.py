"""A non-editable install serves and answers from installed code only: a wheel in a fresh venv, outside the repo.

How, without downloading anything (about 25 s on 2 idle cores, most of it the server's start-up):

1. copy ``pyproject.toml``, ``README.md`` and the four packages to a temp folder (so that no ``build/``
   or ``*.egg-info`` of a previous build can reach the wheel, and the repo stays clean), and build the
   wheel there with this venv's pip and setuptools
   (``pip wheel --no-deps --no-build-isolation --no-index``): what ``pip install .`` does, in two steps;
2. ``python -m venv --without-pip`` a fresh venv and install the wheel into it with this venv's pip
   (``pip --python <new venv> install --no-deps --no-index``): the new venv then holds our four packages
   and the ``interp-sandbox`` script, and nothing else;
3. only then add a ``.pth`` file naming this venv's site-packages, for the third-party dependencies
   (torch, transformers, flask, gunicorn, ...). A ``.pth`` line only appends that folder to ``sys.path``:
   the ``.pth`` files inside it are not run, so this venv's editable install of the project (a ``.pth``
   line naming the repo root) does not reach the new venv, and the new venv's own site-packages, first
   on ``sys.path``, wins for our packages anyway. ``--system-site-packages`` would not do: the
   dependencies live in this venv, not in the base interpreter.

Then, from a working directory outside the repo that holds decoy ``sandbox_server``/``sandbox_client``/
``validator``/``storage`` folders (which fail on import: a process that imported from the working
directory instead of the installed wheel, as ``python -m`` would without ``-P``, dies), with no
``$PYTHONPATH`` and ``$HOME`` in the temp folder: ``<venv>/bin/interp-sandbox serve --embedded --models
tiny-gpt2`` (the embedded setup minus SmolLM2, whose first start converts 520 MB of weights; the test
checks where its cache would go instead), a key from ``<venv>/bin/interp-sandbox keys create``, and a
script run by the new venv's Python that checks where its packages come from and traces the model
remotely. The zygote must have served (its children fork from it) and gunicorn must run under
``GunicornApp`` (its process title); a killed worker restarts with its own exec, from the wheel too.
Reference: the same random GPT-2 built here with transformers alone under the same seed
(``tests/conftest.py`` ``build_tiny("gpt2")``), on the prompt's token ids from GPT-2's BPE files
(conftest's ``gpt2_tokenizer``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny
from serverproc import RunningServer, descendants, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sandbox_client", "sandbox_server", "validator", "storage")
PROMPT = "The Eiffel Tower is in the city of"

EXPERIMENT = '''
import json, sys, sysconfig
from pathlib import Path

import sandbox_client as sc
import sandbox_server, storage, validator
from sandbox_client.pretrained import default_cache_dir

url, key = sys.argv[1], sys.argv[2]
lm = sc.RemoteModel("tiny-gpt2", host=url, api_key=key, verbose=False)
with lm.trace(PROMPT):
    h1 = lm.transformer.h[1].output.save()
    logits = lm.lm_head.output.save()
h1 = h1.value[0] if isinstance(h1.value, (tuple, list)) else h1.value
print(json.dumps({
    "site": sysconfig.get_path("purelib"),
    "files": {m.__name__: m.__file__ for m in (sc, sandbox_server, storage, validator)},
    "sys_path": sys.path,
    "smollm2_cache": str(default_cache_dir()),
    "h1": h1.tolist(), "logits_last": logits.value[0, -1].tolist(),
}))
'''


def _run(command: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _fresh_venv_with_the_wheel(tmp: Path, env: dict[str, str]) -> Path:
    """Build the wheel from a copy of the sources, install it into a new venv; returns the venv's python."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src],
         cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("interp_sandbox-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], cwd=tmp, env=env)
    python = tmp / "venv" / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp, env=env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp, env=env).strip())
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_interp_sandbox_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return python


def _titles(pids: list[int]) -> list[bytes]:
    found = []
    for pid in pids:
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:          # gone meanwhile
            continue
    return found


def test_a_wheel_in_a_fresh_venv_serves_the_embedded_setup_outside_the_repo(tmp_path: Path,
                                                                           gpt2_tokenizer: Any) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "INTERP_SANDBOX_CACHE")
           and not k.startswith("SANDBOX_")}
    env.update(HOME=str(home), INTERP_SANDBOX_CONFIG_DIR=str(home / "client"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    python = _fresh_venv_with_the_wheel(tmp_path, env)
    cli = python.parent / "interp-sandbox"
    assert cli.read_text().startswith(f"#!{python}"), "the console script runs the new venv's python"
    for pkg in PACKAGES:
        (work / pkg).mkdir()
        (work / pkg / "__init__.py").write_text(f"raise ImportError('decoy {pkg} in the working directory')\n")

    port = free_port()
    data = work / ".sandbox-data"                        # serve --embedded's default, in the working directory
    server = RunningServer(url=f"http://127.0.0.1:{port}", data_dir=data, config_path=data / "server.toml",
                           log_path=tmp_path / "server.log", env=env, models=["tiny-gpt2"])
    with open(server.log_path, "ab") as log:
        server.process = subprocess.Popen([str(cli), "serve", "--embedded", "--models", "tiny-gpt2", "--port",
                                           str(port)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
    try:
        server.wait_ready()
        titles = _titles(descendants(server.process.pid))
        assert any(b"gunicorn: master [interp-sandbox web]" in t for t in titles), titles   # GunicornApp's settings
        key = _run([cli, "keys", "create", "--data-dir", ".sandbox-data", "--name", "wheel", "--models",
                    "tiny-gpt2"], cwd=work, env=env).strip()
        assert key.startswith("isk_")
        script = tmp_path / "client" / "experiment.py"   # its folder, not the working directory, leads sys.path
        script.parent.mkdir()
        script.write_text(f"PROMPT = {PROMPT!r}\n{EXPERIMENT}")
        out = json.loads(_run([python, script, server.url, key], cwd=work, env=env).splitlines()[-1])
        worker = server.worker_pid("tiny-gpt2")           # a restarted worker execs on its own, from the wheel too
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while server.worker_pid("tiny-gpt2") in (None, worker):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        server.wait_ready(timeout=60)
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()
    log = server.log_path.read_text()
    assert "fork from it" in log and "decoy" not in log, server.log_tail()    # the zygote ran, from the wheel

    site = Path(out["site"]).resolve()
    assert site.is_relative_to(tmp_path.resolve() / "venv")
    for name, file in out["files"].items():
        assert Path(file).resolve().is_relative_to(site), f"{name} imported from {file}, not the wheel"
    assert str(ROOT) not in [str(Path(p).resolve()) for p in out["sys_path"] if p], out["sys_path"]
    assert out["smollm2_cache"] == str(home / ".cache" / "interp-sandbox")   # not under site-packages
    assert (data / "sandbox.db").is_file() and (data / "keys" / "signing_ed25519.pem").is_file()
    assert (data / "server.toml").is_file() and (data.stat().st_mode & 0o777) == 0o700

    ids = gpt2_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = build_tiny("gpt2")(ids, output_hidden_states=True)
    got_h1 = torch.tensor(out["h1"])
    assert got_h1.shape == (1, ids.shape[1], 64)
    # bitwise: the same weights and kernels, one thread each (JSON carries float32 values exactly)
    assert torch.equal(got_h1, want.hidden_states[2])                     # block 1's output
    assert torch.equal(torch.tensor(out["logits_last"]), want.logits[0, -1])
