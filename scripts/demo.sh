#!/usr/bin/env bash
# Set up from nothing and run the demo lab (needs root: it creates network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec kubelab demo "$@"
