#!/usr/bin/env bash
# The main job: installs what is needed, then runs the fine-tune demo
# (digits, pruned to 90 %, dense vs sparse-f32 vs sparse-int8). Extra
# arguments go to the demo (python -m qsparseprop.demo --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m qsparseprop.demo "$@"
