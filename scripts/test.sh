#!/usr/bin/env bash
# Set up everything on a fresh machine and run the test suite.
#   bash scripts/test.sh [pytest args...]
# The virtual environment goes to $TSHSR_VENV (default: .venv beside this repository).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The browser test drives Debian's chromium; install it where we can (root + apt), else it skips.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "note: chromium could not be installed; the browser test will skip" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
exec "$VENV/bin/pytest" -q "$@"
