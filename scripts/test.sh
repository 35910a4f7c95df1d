#!/usr/bin/env bash
# Set up from nothing and run every test layer (unit, kernel, uml). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec python3 -m pytest "$@"
