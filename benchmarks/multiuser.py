"""Many users, one model: K simulated researchers (separate processes, one API key each) run a typical
experiment on SmolLM2-135M through one server; co-batching (max_batch = 16) against NDIF's mode
(max_batch = 1) and against K local copies of the model, all measured in one run.

    .venv/bin/python benchmarks/multiuser.py                          # K = 1 2 4 8 10 16, CPU (~6.5 minutes)
    .venv/bin/python benchmarks/multiuser.py --users 1 4 16 --jobs 4 --repeat 1
    .venv/bin/python benchmarks/multiuser.py --device cuda --jobs 6 --repeat 1   # GPU (< 5 minutes)

The experiment: a trace on a 16-token prompt saving 3 activations (two decoder layers' last-token
states and the next-token logits). Warm user processes (started once, reused for every server and K)
start together when told on stdin, then run ``--jobs`` experiments back to back; throughput is
experiments over the time from that start to the last answer. Both servers (co-batching and
max_batch = 1) run side by side; each K is measured ``--repeat`` times on one then at once on the
other, so a busy spell of the machine hits both modes alike, and the median paired ratio is reported.
Memory is sampled in a separate pass, so the sampler does not slow the throughput runs.

Memory: the peak memory of all server processes (supervisor, gunicorn master and worker, model worker)
with every physical page counted once (``benchmarks/procmem.py``: anonymous pages as PSS, file pages
as distinct frames), against K x the peak RSS of one process that loads the model and runs the same
experiment locally (what each researcher does today). With --device cuda also GPU memory: the model
worker's against K x one local process's, both as nvidia-smi reports them (CUDA context included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "In a quiet village by the sea, an old fisherman told the children a story"   # 16 tokens
MODEL = "smollm2-135m"
MODES = (16, 1)          # max_batch: co-batching, NDIF's one request at a time


def experiment(lm: Any) -> None:
    with lm.trace(PROMPT):
        a = lm.model.layers[10].output[:, -1].save()
        b = lm.model.layers[20].output[:, -1].save()
        c = lm.lm_head.output[:, -1].save()
    assert a.value.shape[-1] == 576 and b.value.shape[-1] == 576 and c.value.shape[-1] == 49152


# ----- simulated users (child processes, started once, reused for every server and K) ------------
def user_main() -> None:
    """One researcher: reads commands from stdin, one JSON object per line, answers on stdout.

    {"warm": url, "key": k}     connect to a server and run the experiment once (module tree, tokenizer, key)
    {"run": url, "jobs": n}     run the experiment n times back to back; answer the latencies and the end time
    end of input                exit at once (``os._exit``): a Python exit with torch loaded takes 0.6 s of
                                CPU, which must not land in another run's measurement
    """
    import sandbox_client as sc

    models: dict[str, Any] = {}
    for line in sys.stdin:
        command = json.loads(line)
        if "warm" in command:
            models[command["warm"]] = sc.RemoteModel(MODEL, host=command["warm"], api_key=command["key"],
                                                     verbose=False)
            experiment(models[command["warm"]])
            print(json.dumps({"ready": True}), flush=True)
            continue
        lm, latencies = models[command["run"]], []
        for _ in range(command["jobs"]):
            start = time.perf_counter()
            experiment(lm)
            latencies.append(time.perf_counter() - start)
        print(json.dumps({"latencies": latencies, "end": time.time()}), flush=True)
    sys.stdout.flush()
    os._exit(0)


class Users:
    """``count`` warm user processes; ``run`` makes the first K of them run the experiment against a server."""

    def __init__(self, count: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, __file__, "--user"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(count)]

    def warm(self, server: Any) -> None:
        """Give every user its own key on ``server`` and run the experiment once, all at the same time."""
        for i, proc in enumerate(self.procs):
            self._send(proc, {"warm": server.url, "key": server.create_key(f"user{i}")})
        for proc in self.procs:
            assert self._read(proc).get("ready"), "a user process failed to warm up: see its stderr above"

    def run(self, server: Any, users: int, jobs: int) -> tuple[float, list[dict[str, Any]]]:
        """Start K users at once (their stdin is the barrier); the start time and each user's answer."""
        start = time.time()
        for proc in self.procs[:users]:
            self._send(proc, {"run": server.url, "jobs": jobs})
        return start, [self._read(proc) for proc in self.procs[:users]]

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait()

    @staticmethod
    def _send(proc: subprocess.Popen[str], command: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()

    @staticmethod
    def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"user process {proc.pid} ended early: see its stderr above")
        return dict(json.loads(line))


# ----- measurements ------------------------------------------------------------------------------
def gpu_mb(pids: list[int]) -> float:
    """GPU memory nvidia-smi reports for ``pids`` (MiB, CUDA contexts included); 0 without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    used = {int(p): float(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}
    return sum(used.get(pid, 0.0) for pid in pids)


def local_copy_mb(device: str) -> tuple[float, float]:
    """Peak RSS (and GPU MiB) of one researcher's process: load SmolLM2 locally, run the experiment."""
    code = (
        "import json, os, resource, torch, sandbox_client as sc\n"
        "from sandbox_client.pretrained import smollm2_folder\n"
        "import benchmarks.multiuser as m\n"
        f"lm = sc.LanguageModel(smollm2_folder(), device_map={device!r}) if {device!r} != 'cpu' "
        "else sc.LanguageModel(smollm2_folder())\n"
        "m.experiment(lm)\n"
        f"gpu = m.gpu_mb([os.getpid()]) if {device!r} != 'cpu' else 0.0\n"
        "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'gpu': gpu}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return float(data["rss"]), float(data["gpu"])


def throughput(users_pool: Users, server: Any, users: int, jobs: int) -> dict[str, Any]:
    """K users against ``server``, nothing else measuring: experiments/s and latencies (ms)."""
    start, results = users_pool.run(server, users, jobs)
    wall = max(r["end"] for r in results) - start
    latencies = sorted(x * 1000 for r in results for x in r["latencies"])
    return {"throughput": len(latencies) / wall, "latencies": latencies}


def peak_memory(users_pool: Users, server: Any, users: int, jobs: int) -> dict[str, Any]:
    """K users against ``server`` while sampling its processes' memory: the peak, split by process.

    A pass of its own: the sampler takes about 5 ms of CPU per experiment, which would slow the throughput
    runs on a 2-core machine (and the CPU-bound co-batching server more than the other)."""
    from procmem import TreeMemory, tree_pids

    with TreeMemory(server.process.pid) as memory:
        users_pool.run(server, users, jobs)
    return {"server_mb": memory.peak_mb, "file_mb": memory.file_mb, "exact": memory.exact,
            "by_process": memory.by_process, "gpu_mb": gpu_mb(tree_pids(server.process.pid))}


def main() -> None:
    parser = argparse.ArgumentParser(description="K users on one shared SmolLM2-135M server")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 10, 16])
    parser.add_argument("--jobs", type=int, default=10, help="experiments per user")
    parser.add_argument("--repeat", type=int, default=3,
                        help="throughput runs per K and mode, paired and interleaved; medians are reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model worker")
    parser.add_argument("--omp-wait-policy", default="", choices=["passive", "active", ""],
                        help="[server] omp_wait_policy of both servers (default: the server's default)")
    args = parser.parse_args()
    from serverproc import start_server

    tmp = Path(tempfile.mkdtemp(prefix="multiuser-"))
    os.environ["INTERP_SANDBOX_CONFIG_DIR"] = str(tmp / "pins")
    local_rss, local_gpu = local_copy_mb(args.device)
    model = {"name": MODEL, "source": "smollm2", "device": args.device, "threads": args.threads}
    servers = {mode: start_server(tmp / f"server-{mode}", models=[model], batching={"max_batch": mode},
                                  server={"web_workers": 1, "web_threads": 32,
                                          "omp_wait_policy": args.omp_wait_policy}) for mode in MODES}
    table: dict[tuple[int, int], dict[str, Any]] = {}
    users_pool = Users(max(args.users))
    try:
        for server in servers.values():
            users_pool.warm(server)
        for users in args.users:
            memory = peak_memory(users_pool, servers[MODES[0]], users, args.jobs)
            runs: dict[int, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for _ in range(args.repeat):
                for mode in MODES:
                    runs[mode].append(throughput(users_pool, servers[mode], users, args.jobs))
            for mode in MODES:
                table[(mode, users)] = combine(runs[mode])
            table[(MODES[0], users)].update(memory)
            print(f"K={users:>2}: exp/s co-batched {[round(r['throughput'], 2) for r in runs[MODES[0]]]}, "
                  f"max_batch=1 {[round(r['throughput'], 2) for r in runs[MODES[1]]]}; server peak "
                  f"{memory['server_mb']:.0f} MiB", file=sys.stderr, flush=True)
    finally:
        users_pool.close()
        for server in servers.values():
            server.stop()
    report(args, table, local_rss, local_gpu)


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One K and mode over its repeats: the median throughput, each repeat's (for paired ratios), and
    latency percentiles over all experiments."""
    latencies = sorted(x for row in rows for x in row["latencies"])
    each = [row["throughput"] for row in rows]
    return {"throughput": statistics.median(each), "each": each, "p50": statistics.median(latencies),
            "p99": percentile(latencies, 0.99)}


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def speedup(co: dict[str, Any], solo: dict[str, Any]) -> float:
    """The median over repeats of co-batched / max_batch = 1 throughput, each pair measured back to back."""
    return statistics.median(a / b for a, b in zip(co["each"], solo["each"], strict=True))


def report(args: Any, table: dict[tuple[int, int], dict[str, Any]], local_rss: float, local_gpu: float) -> None:
    gpu = f", {local_gpu:.0f} MiB GPU" if local_gpu else ""
    print(f"\nSmolLM2-135M on {args.device}, {args.jobs} experiments per user (trace, 16-token prompt, 3 saved "
          f"activations); one local copy: {local_rss:.0f} MiB RSS{gpu}\nthroughput: median of {args.repeat} "
          f"paired runs per K; OpenMP wait policy: {args.omp_wait_policy or 'libgomp default'}")
    print("\n| K | server peak MiB | K local copies MiB | memory saved | co-batched exp/s | max_batch=1 exp/s "
          "| speed-up | p50 / p99 ms co-batched | p50 / p99 ms max_batch=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for users in args.users:
        co, solo = table[(16, users)], table[(1, users)]
        copies = users * local_rss
        print(f"| {users} | {co['server_mb']:.0f} | {copies:.0f} | {1 - co['server_mb'] / copies:.1%} | "
              f"{co['throughput']:.2f} | {solo['throughput']:.2f} | {speedup(co, solo):.2f}x | "
              f"{co['p50']:.0f} / {co['p99']:.0f} | {solo['p50']:.0f} / {solo['p99']:.0f} |")
    last = table[(16, args.users[-1])]
    how = "distinct file pages + PSS of anonymous pages" if last["exact"] else "PSS only (not root: reads low)"
    print(f"\nServer memory ({how}); at the peak of K = {args.users[-1]}, file-backed pages "
          f"{last['file_mb']:.0f} MiB, anonymous per process:")
    for name, mb in last["by_process"].items():
        print(f"  {mb:7.0f} MiB  {name}")
    if local_gpu:
        print("\n| K | server GPU MiB | K local copies GPU MiB | GPU memory saved |\n|---|---|---|---|")
        for users in args.users:
            server_gpu, copies_gpu = table[(16, users)]["gpu_mb"], users * local_gpu
            print(f"| {users} | {server_gpu:.0f} | {copies_gpu:.0f} | {1 - server_gpu / copies_gpu:.1%} |")
    if 10 in args.users:
        saved = 1 - table[(16, 10)]["server_mb"] / (10 * local_rss)
        print(f"\nmemory goal at K = 10: >= 88% less than 10 local copies: {'PASS' if saved >= 0.88 else 'FAIL'} "
              f"({saved:.1%})")
    if 16 in args.users:
        co, solo = table[(16, 16)], table[(1, 16)]
        ratio = speedup(co, solo)
        each = ", ".join(f"{a / b:.2f}x" for a, b in zip(co["each"], solo["each"], strict=True))
        print(f"throughput goal at K = 16: >= 3x max_batch = 1: {'PASS' if ratio >= 3 else 'FAIL'} ({ratio:.2f}x; "
              f"each run: {each})")


if __name__ == "__main__":
    if sys.argv[1:] == ["--user"]:
        user_main()
    else:
        main()
