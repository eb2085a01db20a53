#!/usr/bin/env bash
# The main job: set up .venv if needed, start a server with the embedded defaults (SmolLM2-135M and a
# tiny random GPT-2), create an API key, run the logit lens and IOI activation patching through
# sc.RemoteModel, print the results, and stop the server.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
exec .venv/bin/python examples/remote_experiment.py "$@"
