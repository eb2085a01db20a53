#!/usr/bin/env bash
# Run the whole test suite on 2 workers, setting up .venv first if needed.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m 'not slow'   # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -n 2 tests "$@"
