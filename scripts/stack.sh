#!/usr/bin/env bash
# compose.yaml's stack without Docker: scripts/stack.sh up|down|status|env|plan (see scripts/stack.py).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
exec "${PYTHON:-$ROOT/.venv/bin/python}" "$ROOT/scripts/stack.py" "$@"
