#!/usr/bin/env bash
# The whole test suite (CPU, about 3-4 minutes on 2 cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q tests "$@"
