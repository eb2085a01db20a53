"""The main job: start a server with the embedded defaults, create an API key, and run a real
experiment on SmolLM2-135M through ``sc.RemoteModel`` (logit lens + IOI activation patching).

    bash scripts/main.sh            # or: .venv/bin/python examples/remote_experiment.py

The server (``interp-sandbox serve --embedded``) runs here as a child process: SQLite, a local
result folder, one worker process per model (SmolLM2-135M and a tiny random GPT-2) and gunicorn on
a loopback port. Every trace below travels as a JSON graph, is validated by the server, runs on the
shared model and comes back as a signed safetensors bundle that the client verifies.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".cache" / "sandbox-demo"            # persistent: the server's signing key survives runs
os.environ.setdefault("INTERP_SANDBOX_CONFIG_DIR", str(DATA / "client"))   # where the client pins server keys

import sandbox_client as sc  # noqa: E402  (after the pin folder is chosen)

EIFFEL = "The Eiffel Tower is in the city of"
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"      # answer: ' Mary'
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"    # answer: ' John'
LAYERS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, check: bool = True) -> str:
    done = subprocess.run([sys.executable, "-m", "sandbox_server.cli", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"interp-sandbox {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def start_server(port: int) -> subprocess.Popen[bytes]:
    log = DATA / "server.log"
    print(f"starting the server on 127.0.0.1:{port} (data in {DATA}, log in {log}) ...", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "sandbox_server.cli", "serve", "--embedded",
                             "--data-dir", str(DATA), "--port", str(port)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600   # the first run converts the packaged SmolLM2 weights once
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
            if health.get("models") and all(s == "ready" for s in health["models"].values()):
                print(f"server ready: {health['models']}", flush=True)
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not become ready within 10 minutes")


def logit_lens(lm: sc.RemoteModel, paris: int) -> None:
    with lm.trace(EIFFEL):
        tops, probs = [], []
        for i in range(LAYERS):
            p = lm.lm_head(lm.model.norm(lm.model.layers[i].output[:, -1])).softmax(-1)
            tops.append(p.argmax(-1).save())
            probs.append(p[:, paris].save())
        final = lm.output.logits[:, -1].softmax(-1)[:, paris].save()
    print(f"\nLogit lens on {EIFFEL!r} (remote, signed)")
    print(f"{'layer':>5}  {'top token':<14} P(' Paris')")
    for i in range(LAYERS):
        print(f"{i:>5}  {lm.tokenizer.decode([int(tops[i].value[0])])!r:<14} {float(probs[i].value[0]):.4f}")
    print(f"final P(' Paris') = {float(final.value[0]):.3f}")


def ioi_patching(lm: sc.RemoteModel, mary: int, john: int) -> None:
    """Patch the clean run's last-token residual stream into the corrupted run, one layer per invoke."""
    with lm.trace() as tracer:
        with tracer.invoke(IOI_CLEAN):
            clean = [lm.model.layers[i].output[:, -1].save() for i in range(LAYERS)]
            clean_diff = (lm.output.logits[:, -1, mary] - lm.output.logits[:, -1, john]).save()
        with tracer.invoke(IOI_CORRUPT):
            corrupt_diff = (lm.output.logits[:, -1, mary] - lm.output.logits[:, -1, john]).save()
    with lm.trace() as tracer:            # 30 invokes = one batched forward on the server
        diffs = []
        for i in range(LAYERS):
            with tracer.invoke(IOI_CORRUPT):
                lm.model.layers[i].output[:, -1] = clean[i].value
                diffs.append((lm.output.logits[:, -1, mary] - lm.output.logits[:, -1, john]).save())
    base, top = float(corrupt_diff.value[0]), float(clean_diff.value[0])
    print("\nIOI activation patching: logit(' Mary') - logit(' John')")
    print(f"  clean {IOI_CLEAN!r}: {top:+.2f}   corrupted {IOI_CORRUPT!r}: {base:+.2f}")
    print(f"{'layer':>5}  {'patched diff':>12}  recovered")
    for i, d in enumerate(diffs):
        value = float(d.value[0])
        print(f"{i:>5}  {value:>+12.2f}  {(value - base) / (top - base):>8.0%}")


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(port)
    try:
        cli("keys", "revoke", "--data-dir", str(DATA), "demo", check=False)   # the previous run's key, if any
        key = re.search(r"isk_\S+", cli("keys", "create", "--data-dir", str(DATA), "--name", "demo"))
        assert key, "keys create printed no key"
        host = f"http://127.0.0.1:{port}"
        models = requests.get(f"{host}/v1/models", headers={"Authorization": f"Bearer {key[0]}"}, timeout=10).json()
        print(f"API key created for 'demo'; models: {[m['name'] for m in models['models']]}")
        lm = sc.RemoteModel("smollm2-135m", host=host, api_key=key[0])
        (paris,) = lm.tokenizer.encode(" Paris")
        (mary,), (john,) = lm.tokenizer.encode(" Mary"), lm.tokenizer.encode(" John")
        logit_lens(lm, paris)
        ioi_patching(lm, mary, john)
        tiny = sc.RemoteModel("tiny-gpt2", host=host, api_key=key[0], verbose=False)
        with tiny.generate("Hello", max_new_tokens=5) as tracer:
            ids = tracer.result.save()
        print(f"\ntiny-gpt2 (random weights) generated ids {ids.value[0].tolist()}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server stopped (exit code {code})")


if __name__ == "__main__":
    main()
