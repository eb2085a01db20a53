"""Many users, one model: K simulated researchers (separate processes, one API key each) run a typical
experiment on SmolLM2-135M through one server; co-batching (max_batch = 16) against NDIF's mode
(max_batch = 1) and against K local copies of the model, all measured in one run.

    .venv/bin/python benchmarks/multiuser.py                          # K = 1 2 4 8 10 16, CPU (~6 minutes)
    .venv/bin/python benchmarks/multiuser.py --users 1 4 16 --jobs 4
    .venv/bin/python benchmarks/multiuser.py --device cuda --jobs 6   # on a GPU machine (< 5 minutes)

The experiment: a trace on a 16-token prompt saving 3 activations (two decoder layers' last-token
states and the next-token logits). Each user process waits at a barrier, then runs ``--jobs``
experiments back to back; throughput is experiments over the time from the barrier to the last
answer. Both servers (co-batching and max_batch = 1) run side by side and each K is measured on one
then at once on the other, so a busy spell of the machine hits both modes alike.

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


def run_users(server: Any, users: int, jobs: int, tmp: Path) -> dict[str, Any]:
    """K user processes against ``server``; throughput, latencies and the server's peak memory."""
    from procmem import TreeMemory, tree_pids

    go = tmp / f"go-{users}-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, __file__, "--user", server.url, server.create_key(f"user{i}"),
                               str(jobs), str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(users)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    with TreeMemory(server.process.pid) as memory:
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
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "server_mb": memory.peak_mb, "file_mb": memory.file_mb, "exact": memory.exact,
            "by_process": memory.by_process, "gpu_mb": gpu_mb(tree_pids(server.process.pid))}


def main() -> None:
    parser = argparse.ArgumentParser(description="K users on one shared SmolLM2-135M server")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 10, 16])
    parser.add_argument("--jobs", type=int, default=10, help="experiments per user")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model worker")
    args = parser.parse_args()
    from serverproc import start_server

    tmp = Path(tempfile.mkdtemp(prefix="multiuser-"))
    os.environ["INTERP_SANDBOX_CONFIG_DIR"] = str(tmp / "pins")
    local_rss, local_gpu = local_copy_mb(args.device)
    model = {"name": MODEL, "source": "smollm2", "device": args.device, "threads": args.threads}
    servers = {mode: start_server(tmp / f"server-{mode}", models=[model], batching={"max_batch": mode},
                                  server={"web_workers": 1, "web_threads": 32}) for mode in MODES}
    table: dict[tuple[int, int], dict[str, Any]] = {}
    try:
        for users in args.users:
            for mode in MODES:
                row = run_users(servers[mode], users, args.jobs, tmp)
                table[(mode, users)] = row
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items() if k != "by_process"}
                print(f"max_batch={mode:>2} K={users:>2}: {shown}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report(args, table, local_rss, local_gpu)


def report(args: Any, table: dict[tuple[int, int], dict[str, Any]], local_rss: float, local_gpu: float) -> None:
    gpu = f", {local_gpu:.0f} MiB GPU" if local_gpu else ""
    print(f"\nSmolLM2-135M on {args.device}, {args.jobs} experiments per user (trace, 16-token prompt, 3 saved "
          f"activations); one local copy: {local_rss:.0f} MiB RSS{gpu}")
    print("\n| K | server peak MiB | K local copies MiB | memory saved | co-batched exp/s | max_batch=1 exp/s "
          "| speed-up | p50 / p99 ms co-batched | p50 / p99 ms max_batch=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for users in args.users:
        co, solo = table[(16, users)], table[(1, users)]
        copies = users * local_rss
        print(f"| {users} | {co['server_mb']:.0f} | {copies:.0f} | {1 - co['server_mb'] / copies:.1%} | "
              f"{co['throughput']:.2f} | {solo['throughput']:.2f} | {co['throughput'] / solo['throughput']:.2f}x | "
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
        ratio = table[(16, 16)]["throughput"] / table[(1, 16)]["throughput"]
        print(f"throughput goal at K = 16: >= 3x max_batch = 1: {'PASS' if ratio >= 3 else 'FAIL'} ({ratio:.2f}x)")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--user":
        user_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
