#!/usr/bin/env bash
# All tests: installs what is needed, then runs the GoogleTest suite, the
# find_package(qsparseprop) consumer, linters, and pytest (with doctests).
# Every stage runs; the script fails if any stage failed.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh" || exit 1
cd "$ROOT"
# shellcheck disable=SC1091
source .venv/bin/activate
failed=()
stage() { local name=$1; shift; printf '\n== %s\n' "$name"; "$@" || failed+=("$name"); }

stage "C++ tests (ctest)" ctest --test-dir build --output-on-failure -j2
stage "C++ tests with QSP_MAX_CPU_ISA=ref from the environment" \
  env QSP_MAX_CPU_ISA=ref ./build/tests/cpp/qsp_tests --gtest_brief=1

consumer() {
  cmake --install build --prefix build/install >/dev/null &&
    cmake -S tests/cmake_consumer -B build/consumer -G Ninja \
      -DCMAKE_PREFIX_PATH="$ROOT/build/install;$ROOT/.venv" >/dev/null &&
    ninja -C build/consumer >/dev/null &&
    ./build/consumer/consumer
}
stage "C++ user project: find_package(qsparseprop)" consumer

lint() {
  local py_dirs=(python tests)
  [[ -d benchmarks ]] && py_dirs+=(benchmarks)
  ruff check "${py_dirs[@]}" &&
    ruff format --check "${py_dirs[@]}" &&
    clang-format --dry-run -Werror $(git ls-files '*.cpp' '*.hpp')
}
stage "lint (ruff, clang-format)" lint

pytest_stage() {
  python -m pytest tests/python -q
  local rc=$?
  if ((rc == 5)); then
    echo "pytest collected no tests: the Python suite is missing" >&2
    return 1
  fi
  ((rc == 0)) || return 1
  python -m pytest -q --doctest-modules --pyargs qsparseprop
}
stage "Python tests (pytest) and docstring examples" pytest_stage

if ((${#failed[@]})); then
  printf '\nFAILED stages: %s\n' "${failed[*]}" >&2
  exit 1
fi
printf '\nall test stages passed\n'
