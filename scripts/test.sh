#!/usr/bin/env bash
# The whole test suite (CPU, 2-5 minutes on 2 cores: 133 s on the project's VM on 2026-12-06,
# 215 s and 310 s on 2026-12-03: its speed drifts). Extra arguments go to pytest.
# Two pytest workers (pytest-xdist), each taking whole files (module fixtures run once), and
# one OpenMP thread per process: the workers, and the training processes the tests start,
# share the cores without spin-waiting threads. Measured on 2 cores (2026-12-02): 182 s this way, 275 s
# with one worker, 415 s with two workers of 2 threads each.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile tests "$@"
