#!/usr/bin/env bash
# One-GPU readiness check (training step + Flickr30K-test-size exhaustive scoring at paper size).
# Prints JSON lines and, with --write-results, records them in docs/RESULTS.md with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" benchmarks/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json" "$@"
