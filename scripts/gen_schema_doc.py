"""Rewrite the JSON Schema block of docs/graph-format.md from ``validator.schema.graph_json_schema()``.

    .venv/bin/python scripts/gen_schema_doc.py            # rewrite the block in place
    .venv/bin/python scripts/gen_schema_doc.py --check    # exit 1 if the block is out of date

The block sits between the ``<!-- schema:begin -->`` and ``<!-- schema:end -->`` markers;
tests/validator/test_schema.py fails while it differs from the generated schema.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from validator.schema import graph_json_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "graph-format.md"
BEGIN = "<!-- schema:begin -->"
END = "<!-- schema:end -->"


def schema_block() -> str:
    """The Markdown between the markers: a fenced json block, two-space indented, stable key order."""
    return f"```json\n{json.dumps(graph_json_schema(), indent=2)}\n```"


def with_schema(doc: str) -> str:
    """``doc`` with the text between the markers replaced by the current schema block."""
    head, begin, rest = doc.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{DOC}: the markers {BEGIN} and {END} are missing")
    return f"{head}{BEGIN}\n{schema_block()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only report whether the block is up to date")
    args = parser.parse_args(argv)
    current = DOC.read_text(encoding="utf-8")
    updated = with_schema(current)
    if args.check:
        if updated != current:
            print(f"{DOC} is out of date: run .venv/bin/python scripts/gen_schema_doc.py", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        DOC.write_text(updated, encoding="utf-8")
        print(f"rewrote the schema block of {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
