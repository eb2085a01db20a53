"""Trace overhead of sandbox_client against raw torch forward hooks and nnsight, in one run.

    bash scripts/bench.sh                                   # sets up .venv-bench, then runs this
    .venv-bench/bin/python benchmarks/trace_overhead.py --rounds 30 --models small
    .venv-bench/bin/python benchmarks/trace_overhead.py --profile 200    # cProfile our traces

Random-weight GPT-2 models (2x64 on 16 tokens, 12x768 on 64 tokens, vocab 50257), CPU, one
thread, batch 1, everything under ``torch.no_grad()``. Each round runs every variant once, in a
shuffled order, so drift in machine load hits all variants alike; a variant's time is the median
over rounds, and an overhead is the median of per-round paired differences. Variants save either
the last block's output ("1") or every block's output ("all"); raw hooks register and remove their
hooks inside the timed call, as a tracer must. Each tool wraps its own copy of the model's modules
(nnsight replaces the ``forward`` of every module it wraps), sharing one set of weights.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import importlib
import itertools
import math
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import sandbox_client as sc

MIN_ROUNDS = 30
FIXED_GOAL_RATIO = 1 / 3        # our overhead over raw hooks <= this fraction of nnsight's
LARGE_GOAL_PERCENT = 2.0        # our overhead over raw hooks on the 12x768 model, % of raw

Variant = Callable[[], list[torch.Tensor]]


@dataclass(frozen=True)
class Case:
    """One model shape and input length."""

    name: str
    layers: int
    width: int
    heads: int
    seq: int
    rounds: int   # default; a round of the small model costs ~1/50 of a large one, and its noise is larger


CASES = {
    "small": Case("GPT-2 2x64 seq16", layers=2, width=64, heads=4, seq=16, rounds=500),
    # Not in the default run: 12 cheap layers separate per-trace from per-value cost precisely.
    "mid": Case("GPT-2 12x64 seq16", layers=12, width=64, heads=4, seq=16, rounds=300),
    "large": Case("GPT-2 12x768 seq64", layers=12, width=768, heads=12, seq=64, rounds=50),
}


def build_model(case: Case) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=case.layers, n_embd=case.width, n_head=case.heads)  # vocab 50257
    return GPT2LMHeadModel(config).eval()


# ----- the variants: each returns the saved block outputs ---------------------------------------
def plain_forward(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    model(input_ids=ids)
    return []


def raw_hooks(model: nn.Module, ids: torch.Tensor, blocks: list[nn.Module]) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, args, out: saved.append(out)) for b in blocks]
    try:
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return saved


def ours(lm: Any, ids: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    saved = []
    with lm.trace(ids):
        for i in indices:
            saved.append(lm.transformer.h[i].output.save())
    return [proxy.value for proxy in saved]


def nnsight_trace(nm: Any, ids: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    # nnsight 0.8 runs the with-block's source itself; a name first bound inside the block (e.g. a
    # list comprehension's result) is not visible after it inside a function, so append to a list.
    saved: list[Any] = []
    with nm.trace(input_ids=ids):
        for i in indices:
            saved.append(nm.transformer.h[i].output.save())
    return saved


def make_variants(case: Case, nnsight: Any = None) -> dict[str, Variant]:
    """The timed calls for ``case``; nnsight's are added when its module is given."""
    base = build_model(case)
    ids = torch.randint(0, base.config.vocab_size, (1, case.seq), generator=torch.Generator().manual_seed(1))
    blocks = list(base.transformer.h)
    one, every = [case.layers - 1], list(range(case.layers))
    lm = sc.LanguageModel(twin(base))
    variants: dict[str, Variant] = {
        "plain": lambda: plain_forward(base, ids),
        "raw hooks 1": lambda: raw_hooks(base, ids, blocks[-1:]),
        "raw hooks all": lambda: raw_hooks(base, ids, blocks),
        "ours 1": lambda: ours(lm, ids, one),
        "ours all": lambda: ours(lm, ids, every),
    }
    if nnsight is not None:
        nm = nnsight.NNsight(twin(base))
        variants["nnsight 1"] = lambda: nnsight_trace(nm, ids, one)
        variants["nnsight all"] = lambda: nnsight_trace(nm, ids, every)
    return variants


def twin(model: nn.Module) -> nn.Module:
    """A copy with its own module objects but the same parameter and buffer tensors.

    Separate modules keep nnsight's forward replacement off the others' model; shared weights mean
    no variant finds the weights colder in cache than another (the small model's fit in cache).
    """
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def check_outputs(variants: dict[str, Variant]) -> None:
    """Every tool's saved values must equal raw hooks' (bitwise, or allclose with a note)."""
    with torch.no_grad():
        reference = {n: variants[f"raw hooks {n}"]() for n in ("1", "all")}
        for name, run in variants.items():
            if name == "plain" or name.startswith("raw"):
                continue
            got, want = run(), reference[name.rsplit(" ", 1)[1]]
            if len(got) != len(want) or not all(g.shape == w.shape for g, w in zip(got, want, strict=True)):
                sys.exit(f"correctness: {name!r} saved {len(got)} values of the wrong shape")
            if not all(torch.equal(g, w) for g, w in zip(got, want, strict=True)):
                if not all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True)):
                    sys.exit(f"correctness: {name!r} saved values differ from raw hooks'")
                print(f"note: {name!r} matches raw hooks only approximately (allclose, not bitwise)")


# ----- timing -------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


def measure(variants: dict[str, Variant], rounds: int, warmup: int, clock: str) -> dict[str, list[float]]:
    """Milliseconds per call, one list per variant; each round runs every variant once, in a fresh
    random order (seeded), so no variant always follows the same one.

    ``clock="cpu"`` counts this process's CPU time (all its threads), which a busy machine disturbs
    far less than wall time; with one torch thread and nothing waiting on I/O the two agree when idle.
    """
    now = CLOCKS[clock]
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    with torch.no_grad():
        for r in range(warmup + rounds):
            order.shuffle(names)
            for name in names:
                run = variants[name]
                start = now()
                run()
                elapsed = (now() - start) / 1e6
                if r >= warmup:
                    times[name].append(elapsed)
    return times


@dataclass(frozen=True)
class Overhead:
    """Median of per-round paired differences (ms), with a distribution-free 95% interval."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:+.3f} [{self.low:+.2f},{self.high:+.2f}]"


def paired(times: dict[str, list[float]], name: str, base: str) -> Overhead:
    """Median over rounds of (name - base) in the same round: robust to slow drift in machine load.

    The interval is the sign-test one: order statistics n/2 -+ 0.98*sqrt(n) of the differences.
    """
    diffs = sorted(a - b for a, b in zip(times[name], times[base], strict=True))
    n = len(diffs)
    half = 0.98 * math.sqrt(n)
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return Overhead(statistics.median(diffs), diffs[low], diffs[high])


@dataclass
class Result:
    case: Case
    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def over_raw(self, tool: str, saves: str) -> Overhead:
        return paired(self.times, f"{tool} {saves}", f"raw hooks {saves}")

    def fixed_and_per_value(self, tool: str) -> tuple[float, float]:
        """Per-trace fixed cost (extrapolated to zero saves) and cost per saved value, in ms."""
        per_value = paired(self.times, f"{tool} all", f"{tool} 1").median / (self.case.layers - 1)
        return paired(self.times, f"{tool} 1", "plain").median - per_value, per_value


def print_table(result: Result) -> None:
    raw_median = {s: result.median(f"raw hooks {s}") for s in ("1", "all")}
    print(f"\n{result.case.name}: {len(result.times['plain'])} rounds; overhead = median of per-round "
          "differences [95% interval]")
    header = (f"{'variant':<14}{'median ms':>10}{'p25-p75 ms':>17}  {'vs plain ms':<25}"
              f"{'vs raw hooks ms':<25}{'vs raw %':>8}")
    print(header)
    print("-" * len(header))
    for name, times in result.times.items():
        q1, _, q3 = statistics.quantiles(times, n=4)
        row = f"{name:<14}{result.median(name):>10.3f}{f'{q1:.2f}-{q3:.2f}':>17}  "
        row += f"{str(paired(result.times, name, 'plain')) if name != 'plain' else '':<25}"
        if name.startswith(("ours", "nnsight")):
            tool, saves = name.rsplit(" ", 1)
            over = result.over_raw(tool, saves)
            row += f"{str(over):<25}{100 * over.median / raw_median[saves]:>+7.1f}%"
        print(row.rstrip())
    print(f"\n{'':<14}{'fixed ms/trace':>16}{'ms per saved value':>20}   (point estimates)")
    for tool in ("raw hooks", "ours", "nnsight"):
        if f"{tool} 1" in result.times:
            fixed, per_value = result.fixed_and_per_value(tool)
            print(f"{tool:<14}{fixed:>+16.3f}{per_value:>+20.4f}")


def verdict(passes: bool, fails: bool) -> str:
    return "PASS" if passes else "FAIL" if fails else "INCONCLUSIVE (the 95% intervals straddle the goal)"


def print_goals(results: list[Result]) -> None:
    """Judge each goal on the 95% intervals: PASS/FAIL only when noise cannot flip the answer."""
    print("\nGoals (save every block's output)")
    for result in results:
        if "nnsight all" not in result.times:
            print(f"  {result.case.name}: ours vs nnsight: SKIP (nnsight not installed)")
            continue
        ours, peer = result.over_raw("ours", "all"), result.over_raw("nnsight", "all")
        ratio = f"{ours.median / peer.median:.2f}" if peer.median > 0 else "n/a"
        judged = verdict(peer.low > 0 and ours.high <= FIXED_GOAL_RATIO * peer.low,
                         ours.low > FIXED_GOAL_RATIO * peer.high)
        print(f"  {result.case.name}: overhead over raw hooks, ours {ours} ms / nnsight {peer} ms = {ratio} "
              f"(goal <= {FIXED_GOAL_RATIO:.2f}): {judged}")
    for result in results:
        if result.case != CASES["large"]:
            continue
        ours, raw = result.over_raw("ours", "all"), result.median("raw hooks all")
        limit = LARGE_GOAL_PERCENT / 100 * raw
        print(f"  {result.case.name}: ours over raw hooks {100 * ours.median / raw:+.2f}% "
              f"[{100 * ours.low / raw:+.2f}%,{100 * ours.high / raw:+.2f}%] "
              f"(goal <= {LARGE_GOAL_PERCENT:.0f}%): {verdict(ours.high <= limit, ours.low > limit)}")
    if min(len(r.times["plain"]) for r in results) < MIN_ROUNDS:
        print(f"  (fewer than {MIN_ROUNDS} rounds: the goals are judged on >= {MIN_ROUNDS}; indicative only)")


# ----- profiling ----------------------------------------------------------------------------------
def profile_ours(case: Case, traces: int, top: int) -> None:
    """cProfile ``traces`` save-all traces of ``case``; list sandbox_client's hotspots per trace."""
    variants = make_variants(case)
    run = variants["ours all"]
    with torch.no_grad():
        for _ in range(20):
            run()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(traces):
            run()
        profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if f"{os.sep}sandbox_client{os.sep}" in path:
            short = path.split(f"{os.sep}sandbox_client{os.sep}", 1)[1]
            rows.append((cumtime, tottime, calls, f"sandbox_client/{short}:{line}:{func}"))
    print(f"\nProfile: {traces} save-all traces of {case.name} (ms per trace; cProfile inflates "
          "Python-heavy code, so read the ranking, not the absolute times)")
    print(f"{'cumulative':>11}{'own':>9}{'calls':>8}  function")
    for cumtime, tottime, calls, where in sorted(rows, reverse=True)[:top]:
        print(f"{1e3 * cumtime / traces:>11.4f}{1e3 * tottime / traces:>9.4f}{calls / traces:>8.1f}  {where}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help=f"timed rounds per model (default: {CASES['small'].rounds} "
                        f"for small, {CASES['large'].rounds} for large; >= {MIN_ROUNDS} to judge the goals)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--models", default="small,large", help="comma list of: " + ", ".join(CASES))
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a loaded machine)")
    parser.add_argument("--no-nnsight", action="store_true", help="skip nnsight (it is optional)")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="instead of timing, cProfile N of our traces on the first of --models")
    parser.add_argument("--top", type=int, default=25, help="rows of the profile to print")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if args.profile:
        profile_ours(CASES[args.models.split(",")[0].strip()], args.profile, args.top)
        return
    versions = f"torch {torch.__version__}"
    nnsight = None
    if not args.no_nnsight:
        try:
            nnsight = importlib.import_module("nnsight")   # optional: only .venv-bench has it
        except ImportError:
            print("nnsight is not installed here (bash scripts/bench.sh installs it): skipping it")
        else:
            versions += f", nnsight {nnsight.__version__}"
    load = os.getloadavg()[0]
    print(f"{versions}; 1 thread; {args.warmup} warm-up rounds; {args.clock} clock; "
          f"load average {load:.2f} on {os.cpu_count()} CPUs")
    if args.clock == "wall" and load > (os.cpu_count() or 1):
        print("note: the machine is busy; wall times will be noisy (--clock cpu is steadier)")
    started = time.perf_counter()
    results = []
    for key in args.models.split(","):
        case = CASES[key.strip()]
        variants = make_variants(case, nnsight)
        check_outputs(variants)
        rounds = args.rounds or case.rounds
        results.append(Result(case, measure(variants, rounds, args.warmup, args.clock)))
        print_table(results[-1])
    print_goals(results)
    print(f"\nwall time {time.perf_counter() - started:.1f} s; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
