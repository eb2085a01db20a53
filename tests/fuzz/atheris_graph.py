"""Coverage-guided fuzzing of ``validate(bytes)`` with atheris (libFuzzer). Not part of the pytest suite.

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_graph.py -runs=100000

Any exception other than the allowed outcomes (graph_fuzz.check_outcome: a Graph or
GraphFormatError from the decoder, a ValidatedGraph or ValidationError from the validator)
stops the run and writes the input to ``/tmp/atheris-graph-*/crash-<sha1>`` (the path is
printed; ``-artifact_prefix=DIR/`` chooses another place). Replay it with
``.venv/bin/python tests/fuzz/atheris_graph.py /tmp/atheris-graph-*/crash-<sha1>``.

Other libFuzzer flags pass through: ``-max_total_time=600``, ``-timeout=1`` (seconds per
input), ``-jobs=2``, ``-max_len=20000`` (inputs longer than the largest seed, 6 KB, are not
tried otherwise), and corpus directories (``... atheris_graph.py my_corpus/`` keeps the new
interesting inputs there). Seeds are the graphs recorded on a tiny model
(tests/graph_corpus.py). Half of the mutations are libFuzzer's own byte mutations (guided by a
dictionary of the format's keys, tags, ops and hostile names), half are structural: parse the
JSON, change one field (drop, duplicate, retype, edge numbers, hostile ops and names), write
it back.

Only ``sandbox_client`` and ``validator`` are instrumented for coverage (torch is not: it
would make every input 100x slower).
"""
from __future__ import annotations

import copy
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _write_seeds(folder: Path, texts: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / f"{name}.json").write_text(text, encoding="ascii")


def _write_dictionary(path: Path, words: list[str]) -> None:
    # libFuzzer dictionary format: one quoted token per line, \xNN escapes for anything unusual
    lines = ['"' + "".join(c if (c.isascii() and c.isalnum()) or c in "$_.:,[]{} -" else f"\\x{ord(c):02x}"
                           for c in word.encode("utf-8").decode("latin-1")) + '"'
             for word in dict.fromkeys(words) if word]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


def mutate_structure(doc: Any, rng: random.Random, pools: dict[str, tuple[Any, ...]]) -> Any:
    """One structural change to a parsed document, in place where possible; returns the document."""
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if isinstance(nodes, list) and nodes and rng.random() < 0.2:   # a node becomes a call on edge numbers
        index = rng.randrange(len(nodes))
        nodes[index] = {"id": index, "op": "call_function", "target": rng.choice(pools["functions"]), "kwargs": [],
                        "args": [copy.deepcopy(rng.choice(pools["values"])) for _ in range(rng.randrange(1, 4))],
                        "invoke": None, "step": 0, "after": [], "source": ""}
        return doc
    slots: list[tuple[Any, Any]] = []
    stack = [doc]
    while stack:
        value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            slots.append((value, key))
            stack.append(child)
    if not slots:
        return copy.deepcopy(rng.choice(pools["values"]))
    container, key = rng.choice(slots)
    action = rng.randrange(5)
    if action == 0:
        del container[key]
    elif action == 1 and isinstance(container, list):
        container.insert(rng.randrange(len(container) + 1), copy.deepcopy(container[key]))
    elif action == 1:
        container[rng.choice(pools["keys"])] = copy.deepcopy(container[key])
    elif action == 2:
        container[key] = rng.choice(pools["ops"] if key == "op" else pools["targets"])
    elif action == 3:
        container[key] = copy.deepcopy(rng.choice(pools["values"]))
    else:
        value = container[key]
        container[key] = [value] if rng.random() < 0.5 else {rng.choice(pools["keys"]): value}
    return doc


def main(argv: list[str]) -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    # atheris is imported here, not at module level: pytest never needs it. torch and transformers are
    # imported before the instrumentation starts, so that they stay uninstrumented.
    import atheris
    import torch  # noqa: F401
    import transformers  # noqa: F401

    with atheris.instrument_imports(include=["sandbox_client", "validator"]):
        import sandbox_client  # noqa: F401
        import validator  # noqa: F401
    from graph_corpus import recorded_graphs
    from graph_fuzz import EDGE_NUMBERS, FORMAT_KEYS, FUNCTIONS, OPS_POOL, TARGETS, check_outcome

    texts, spec = recorded_graphs()
    work = Path(tempfile.mkdtemp(prefix="atheris-graph-"))
    args = list(argv)
    if not any(a.startswith("-dict=") for a in args):
        _write_dictionary(work / "graph.dict", [json.dumps(k) for k in FORMAT_KEYS] + list(OPS_POOL)
                          + [t for t in TARGETS if len(t) < 64] + ["null", "true", "false", '{"$ref":', "1e999"])
        args.append(f"-dict={work / 'graph.dict'}")
    if not any(a.startswith("-artifact_prefix=") for a in args):
        args.append(f"-artifact_prefix={work}/")   # crash-<sha1> files land here, not in the work tree
    replaying = any(Path(a).is_file() for a in args[1:] if not a.startswith("-"))
    if not replaying:
        _write_seeds(work / "seeds", texts)
        args.append(str(work / "seeds"))

    pools: dict[str, tuple[Any, ...]] = {"keys": FORMAT_KEYS, "ops": OPS_POOL, "targets": TARGETS,
                                         "functions": FUNCTIONS, "values": EDGE_NUMBERS + FORMAT_KEYS + OPS_POOL}

    def test_one_input(data: bytes) -> Any:
        check_outcome(data, spec)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return bytes(atheris.Mutate(data, max_size))
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return bytes(atheris.Mutate(data, max_size))
        for _ in range(rng.randrange(1, 4)):
            doc = mutate_structure(doc, rng, pools)
        return json.dumps(doc).encode()[:max_size]

    atheris.Setup(args, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
