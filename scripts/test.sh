#!/usr/bin/env bash
# Runs accel's test suites: pytest (Python + native kernels) and the C++ tests (CMake + ctest).
# Expects scripts/setup.sh to have run. Any failure, or pytest collecting no tests, fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
status=0

mkdir -p build
$PY -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "[test] pytest collected no tests"; fi
[ $rc -ne 0 ] && status=1

echo "[test] C++ tests (CMake + ctest)"
if .venv/bin/cmake -S . -B build/cmake -DPython3_EXECUTABLE="$PWD/$PY" >build/cmake.log 2>&1 \
   && .venv/bin/cmake --build build/cmake -j "${MAX_JOBS:-2}" >>build/cmake.log 2>&1; then
  .venv/bin/ctest --test-dir build/cmake --output-on-failure || status=1
else
  tail -30 build/cmake.log; echo "[test] CMake build failed"; status=1
fi
exit $status
