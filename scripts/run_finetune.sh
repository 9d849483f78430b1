#!/usr/bin/env bash
# The main job: installs what is needed, then runs `qsparseprop finetune` on
# its defaults (a ResNet-style CNN on Fashion-MNIST, pruned to 90 %, fine-tuned
# dense fp32 / dense bf16 / qsparseprop f32 / qsparseprop int8). Extra
# arguments go to it (qsparseprop finetune --help); the report lands in
# qsparseprop-finetune/ (report.json, curves.png).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
mkdir -p qsparseprop-finetune
exec .venv/bin/qsparseprop finetune --json qsparseprop-finetune/report.json \
  --png qsparseprop-finetune/curves.png "$@"
