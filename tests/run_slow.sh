#!/usr/bin/env bash
# The slow suite (`make test-slow`, CI) as two pytest processes side by side: the embedded workflow end to end
# (tests/test_workflow.py, ~30 min, mostly 2 cores busy) and everything else (kill -9 harness, tiny DAG + bundle,
# tensor-parallel ranks, and the rehearsal of config/paper.yaml through SLURM on localhost (tests/test_rehearsal.py,
# marker slurm); about one core busy on average: process start-up and imports per Snakemake job). Run one after the other they took 18 + ~35 min on 2 cores; side by side the second
# core's idle time is used. The embedded run's output is printed after the other's. Exit status: non-zero if
# either failed. Extra arguments go to both pytest calls.
set -uo pipefail
PY=${PY:-.venv/bin/python}
LOGS=${SLOW_LOGS:-.pytest-logs}
mkdir -p "$LOGS"
# each process its own temporary root and no shared pytest cache, so neither can clean up or overwrite the other's
TMP=$(mktemp -d "${TMPDIR:-/tmp}/esr-slow.XXXXXX")
# the paper rehearsal (marker rehearsal, `make rehearse-paper`) is too long for CI: see README "Tests"
COMMON=(-m "(slow or slurm) and not rehearsal" -q -p no:cacheprovider)
"$PY" -m pytest "${COMMON[@]}" --basetemp "$TMP/embedded" tests/test_workflow.py "$@" >"$LOGS/slow-embedded.log" 2>&1 &
embedded_pid=$!
"$PY" -m pytest "${COMMON[@]}" --basetemp "$TMP/other" --ignore=tests/test_workflow.py "$@"
other=$?
wait "$embedded_pid"
embedded=$?
echo "----- tests/test_workflow.py (the embedded workflow, run alongside; exit $embedded) -----"
cat "$LOGS/slow-embedded.log"
exit $((other != 0 || embedded != 0))
