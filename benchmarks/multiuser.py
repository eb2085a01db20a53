"""Many users, one model: K simulated researchers (separate processes, one API key each) run a typical
experiment on SmolLM2-135M through one server; co-batching (max_batch = 16) against NDIF's mode
(max_batch = 1) and against K local copies of the model, all measured in one run.

    .venv/bin/python benchmarks/multiuser.py                          # K = 1 2 4 8 10 16, CPU
    .venv/bin/python benchmarks/multiuser.py --users 1 4 16 --jobs 4
    .venv/bin/python benchmarks/multiuser.py --device cuda            # on a GPU machine (< 5 minutes)

The experiment: a trace on a 16-token prompt saving 3 activations (two decoder layers' last-token
states and the next-token logits). Each user process waits at a barrier, then runs ``--jobs``
experiments back to back. Memory: peak memory of all server processes (supervisor, gunicorn, the model
worker) against K x the peak RSS of one process that loads the model and runs the
same experiment locally (what each researcher does today); with --device cuda also GPU memory. Server
memory is the sum of PSS over its processes (shared library pages counted once), sampled every 50 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "In a quiet village by the sea, an old fisherman told the children a story"   # 16 tokens
MODEL = "smollm2-135m"


def experiment(lm: Any) -> None:
    with lm.trace(PROMPT):
        a = lm.model.layers[10].output[:, -1].save()
        b = lm.model.layers[20].output[:, -1].save()
        c = lm.lm_head.output[:, -1].save()
    assert a.value.shape[-1] == 576 and b.value.shape[-1] == 576 and c.value.shape[-1] == 49152


# ----- one simulated user (a child process) ------------------------------------------------------
def user_main(host: str, key: str, jobs: int, go: str) -> None:
    import sandbox_client as sc

    lm = sc.RemoteModel(MODEL, host=host, api_key=key, verbose=False)
    experiment(lm)                                   # warm: module tree, tokenizer, pinned key
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.005)
    latencies = []
    for _ in range(jobs):
        start = time.perf_counter()
        experiment(lm)
        latencies.append(time.perf_counter() - start)
    print(json.dumps({"latencies": latencies, "end": time.time()}), flush=True)


# ----- measurements ------------------------------------------------------------------------------
def tree_rss_mb(pid: int) -> float:
    """Memory of ``pid`` and all its descendants (MiB): the sum of their PSS, so pages the processes share
    (torch's libraries, mapped once) count once, as they occupy RAM once; RSS would count them per process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


class PeakSampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> PeakSampler:
        self.peak = tree_rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def local_copy_rss_mb(device: str) -> tuple[float, float]:
    """RSS (and GPU MiB) of one researcher's process: load SmolLM2 locally, run the experiment."""
    code = (
        "import json, resource, torch, sandbox_client as sc\n"
        "from sandbox_client.pretrained import smollm2_folder\n"
        "import benchmarks.multiuser as m\n"
        f"lm = sc.LanguageModel(smollm2_folder(), device_map={device!r}) if {device!r} != 'cpu' "
        "else sc.LanguageModel(smollm2_folder())\n"
        "m.experiment(lm)\n"
        "gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0\n"
        "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'gpu': gpu}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return float(data["rss"]), float(data["gpu"])


def run_users(server: Any, users: int, jobs: int, tmp: Path) -> dict[str, float]:
    go = tmp / f"go-{users}-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, __file__, "--user", server.url, server.create_key(f"user{i}"),
                               str(jobs), str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(users)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    start = time.time()
    go.write_text("go")
    results = []
    for proc in procs:
        assert proc.stdout is not None
        results.append(json.loads(proc.stdout.read().strip().splitlines()[-1]))
        proc.wait()
    wall = max(r["end"] for r in results) - start
    latencies = sorted(x * 1000 for r in results for x in r["latencies"])
    return {"throughput": len(latencies) / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description="K users on one shared SmolLM2-135M server")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 10, 16])
    parser.add_argument("--jobs", type=int, default=6, help="experiments per user")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model worker")
    args = parser.parse_args()
    from serverproc import start_server

    tmp = Path(tempfile.mkdtemp(prefix="multiuser-"))
    os.environ["INTERP_SANDBOX_CONFIG_DIR"] = str(tmp / "pins")
    local_rss, local_gpu = local_copy_rss_mb(args.device)
    model = {"name": MODEL, "source": "smollm2", "device": args.device, "threads": args.threads}
    table: dict[tuple[int, int], dict[str, float]] = {}
    for max_batch in (16, 1):
        with start_server(tmp / f"server-{max_batch}", models=[model], batching={"max_batch": max_batch},
                          server={"web_workers": 1, "web_threads": 32}) as server:
            assert server.process is not None
            for users in args.users:
                with PeakSampler(server.process.pid) as peak:
                    row = run_users(server, users, args.jobs, tmp)
                row["server_rss"] = peak.peak
                table[(max_batch, users)] = row
                print(f"max_batch={max_batch:>2} K={users:>2}: {row}", file=sys.stderr, flush=True)

    gpu = f", {local_gpu:.0f} MiB GPU" if local_gpu else ""
    print(f"\nSmolLM2-135M on {args.device}, {args.jobs} experiments per user (trace, 16-token prompt, 3 saved "
          f"activations); one local copy: {local_rss:.0f} MiB RSS{gpu}")
    print("\n| K | server peak PSS MiB | K local copies MiB | memory saved | co-batched exp/s | max_batch=1 exp/s "
          "| speed-up | p50 / p99 ms co-batched | p50 / p99 ms max_batch=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for users in args.users:
        co, solo = table[(16, users)], table[(1, users)]
        copies = users * local_rss
        print(f"| {users} | {co['server_rss']:.0f} | {copies:.0f} | {1 - co['server_rss'] / copies:.0%} | "
              f"{co['throughput']:.2f} | {solo['throughput']:.2f} | {co['throughput'] / solo['throughput']:.2f}x | "
              f"{co['p50']:.0f} / {co['p99']:.0f} | {solo['p50']:.0f} / {solo['p99']:.0f} |")
    if 10 in args.users:
        saved = 1 - table[(16, 10)]["server_rss"] / (10 * local_rss)
        print(f"\nmemory goal at K = 10: >= 88% less than 10 local copies: {'PASS' if saved >= 0.88 else 'FAIL'} "
              f"({saved:.1%})")
    if 16 in args.users:
        ratio = table[(16, 16)]["throughput"] / table[(1, 16)]["throughput"]
        print(f"throughput goal at K = 16: >= 3x max_batch = 1: {'PASS' if ratio >= 3 else 'FAIL'} ({ratio:.2f}x)")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--user":
        user_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
