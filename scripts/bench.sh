#!/usr/bin/env bash
# Run the trace-overhead benchmark in its own environment, .venv-bench (git-ignored): torch==2.13.0,
# this project (editable) and nnsight==0.8.1, the peer we compare against. nnsight lives only here,
# never in the project's .venv. Idempotent: set-up is skipped while this script is unchanged.
#
#   bash scripts/bench.sh                  # both models (2x64: 500 rounds, 12x768: 50), about 3 minutes
#   bash scripts/bench.sh --rounds 30 --models small
#
# Extra arguments go to benchmarks/trace_overhead.py (see its --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench"
STAMP="$VENV/.bench-setup"
TORCH_VERSION="2.13.0"
NNSIGHT_VERSION="0.8.1"

fail() { echo "bench.sh: ERROR: $*" >&2; exit 1; }

want_hash="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bench.sh" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$want_hash" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || fail "$("$py" -V 2>&1) is too old: Python >= 3.11 is required (set PYTHON=...)"
        echo "bench.sh: creating $VENV with $("$py" -V 2>&1)"
        "$py" -m venv "$VENV"
    fi
    pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
    # torch first, pinned: neither the project's range nor nnsight's requirement may swap in another
    # build (a CUDA wheel would be gigabytes and change the timings).
    "${pip[@]}" install "torch==$TORCH_VERSION"
    "${pip[@]}" install --config-settings editable_mode=compat -e "$ROOT" "nnsight==$NNSIGHT_VERSION" \
        "torch==$TORCH_VERSION"
    have_torch="$("$VENV/bin/python" -m pip show torch 2>/dev/null | sed -n 's/^Version: //p')"
    [[ "${have_torch%%+*}" == "$TORCH_VERSION" ]] || fail "torch is $have_torch in $VENV, expected $TORCH_VERSION"
    "$VENV/bin/python" -c 'import torch, transformers, nnsight, sandbox_client' \
        || fail "$VENV does not import torch, transformers, nnsight and sandbox_client"
    echo "$want_hash" > "$STAMP"
    echo "bench.sh: environment ready ($VENV, torch $have_torch, nnsight $NNSIGHT_VERSION)"
fi

cd "$ROOT"
exec "$VENV/bin/python" benchmarks/trace_overhead.py "$@"
