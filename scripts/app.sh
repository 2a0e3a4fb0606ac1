#!/usr/bin/env bash
# Set up everything on a fresh machine and start the demo on the default model.
#   bash scripts/app.sh [app.py args...]   (e.g. --port 7860 --model checkpoints/tshsr-flickr8k --device cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False
exec "$VENV/bin/python" app.py "$@"
