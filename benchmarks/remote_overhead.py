"""Submit-to-result latency of a tiny-model trace through a real server on loopback, with the local
result store and with S3 (a real SeaweedFS), beside the same trace run in-process, all in one run.

    .venv/bin/python benchmarks/remote_overhead.py            # --jobs 200 by default
    .venv/bin/python benchmarks/remote_overhead.py --jobs 50 --no-s3

Each remote job is the whole user-visible path: record the graph, POST it (validation with a dry
run), queue, run in the model worker, encode + sign + store the bundle, long-poll, download, check
sha256 and the Ed25519 signature, decode. Goal: p50 overhead (remote p50 - local p50) <= 30 ms
with the local store.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import build_tiny  # noqa: E402
from s3server import running_s3_server  # noqa: E402
from serverproc import TINY_MODELS, start_server  # noqa: E402

import sandbox_client as sc  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
GOAL_MS = 30.0


def experiment(lm: sc.LanguageModel) -> Callable[[], None]:
    """The timed unit: one trace saving a layer's last-token state and the next-token logits."""
    def run() -> None:
        with lm.trace(PROMPT):
            h = lm.transformer.h[2].output[:, -1].save()
            logits = lm.lm_head.output[:, -1].save()
        assert h.value.shape == (1, 64) and logits.value.shape == (1, 50257)
    return run


def timed(run: Callable[[], None], jobs: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(jobs):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def remote_samples(tmp: Path, jobs: int, store: dict | None) -> tuple[list[float], Any]:
    """Latencies through a fresh server, and the server's tokenizer (for the local baseline)."""
    gpt2 = [TINY_MODELS["tiny-gpt2"]]
    with start_server(tmp, models=gpt2, store=store) as server:
        lm = sc.RemoteModel("tiny-gpt2", host=server.url, api_key=server.create_key("bench"), verbose=False)
        return timed(experiment(lm), jobs), lm.tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (SeaweedFS) variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    rows: dict[str, list[float]] = {}
    rows["remote, local store"], tokenizer = remote_samples(tmp / "local", args.jobs, None)
    if not args.no_s3:
        with running_s3_server() as s3:
            store = {"kind": "s3", "endpoint_url": s3.endpoint_url, "bucket": s3.bucket,
                     "access_key": s3.access_key, "secret_key": s3.secret_key}
            rows["remote, S3 store (presigned GET)"], _ = remote_samples(tmp / "s3", args.jobs, store)
    local = sc.LanguageModel(build_tiny("gpt2"), tokenizer=tokenizer)
    rows = {"local, in-process": timed(experiment(local), args.jobs), **rows}

    base = statistics.median(rows["local, in-process"])
    print(f"\ntiny GPT-2 (4x64), {args.jobs} jobs each, sequential, 1 torch thread, loopback\n")
    print(f"| {'mode':<34} | {'p50 ms':>7} | {'p99 ms':>7} | {'p50 overhead ms':>15} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|{'-' * 17}|")
    for name, samples in rows.items():
        p50 = statistics.median(samples)
        print(f"| {name:<34} | {p50:>7.2f} | {pct(samples, 0.99):>7.2f} | {p50 - base:>15.2f} |")
    overhead = statistics.median(rows["remote, local store"]) - base
    print(f"\ngoal: p50 overhead with the local store <= {GOAL_MS:.0f} ms: "
          f"{'PASS' if overhead <= GOAL_MS else 'FAIL'} ({overhead:.1f} ms)")


if __name__ == "__main__":
    main()
