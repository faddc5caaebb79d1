#!/usr/bin/env bash
# make test in two lanes: the fault scenarios (short forms; they mostly wait on private instances of the
# services) run in a second pytest process beside the other tests; their report follows the first one's.
# Arguments go to both (PYTEST_ARGS).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
log=.local/test-faults.log
mkdir -p .local
echo "make test: the fault scenarios run beside the other tests; their report follows (also in $log)"
"$PY" -m pytest tests/faults -q -p no:cacheprovider --durations=10 "$@" >"$log" 2>&1 &
faults=$!
trap 'kill "$faults" 2>/dev/null' INT TERM
"$PY" -m pytest tests/unit tests/integration tests/e2e -q -p no:cacheprovider --durations=25 "$@"
main=$?
wait "$faults"
fault=$?
echo "------------------------- the fault scenarios (tests/faults) -------------------------"
cat "$log"
# 5: nothing selected in that lane (PYTEST_ARGS narrowed the run to the other one).
{ [ "$main" -eq 0 ] || [ "$main" -eq 5 ]; } && { [ "$fault" -eq 0 ] || [ "$fault" -eq 5 ]; }
