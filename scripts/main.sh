#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the SmolLM2-135M logit-lens / patching example.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
exec .venv/bin/python examples/smollm2_logit_lens.py "$@"
