#!/usr/bin/env bash
# All tests: installs what is needed, then runs the GoogleTest suite (native,
# capped to the reference tier, under AddressSanitizer + UBSan, and on
# emulated CPUs: AVX2-only and without AVX), a forward + backward of every
# Python module on the emulated CPUs, the static checks (ISA hygiene of the
# built code, include layering), the find_package(qsparseprop) consumer, the
# fuzz targets for a bounded time, linters, and pytest (with doctests). Every
# stage runs; the script fails if any stage failed.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh" || exit 1
cd "$ROOT"
# shellcheck disable=SC1091
source .venv/bin/activate
failed=()
stage() { local name=$1; shift; printf '\n== %s\n' "$name"; local t0=$SECONDS; "$@" || failed+=("$name"); printf '   (%ss)\n' $((SECONDS - t0)); }

# The GoogleTest suite in one process per stage (every test is logged: a run
# that ends without a gtest failure line, a signal, still names the test that
# was running). One process, not ctest's one per test: ctest spent 89 s
# starting 363 processes where the suite runs in 13 s.
logged_tests() { # the command that runs the suite
  local log rc
  log=$(mktemp)
  "$@" >"$log" 2>&1
  rc=$?
  if [[ $rc -eq 0 ]]; then
    grep -E '^\[  (PASSED|SKIPPED) ' "$log"
  else
    echo "exit status $rc; failed tests, and the test running when it ended:"
    grep -E '^\[  FAILED  \]' "$log" | head -n 20
    grep -E '^\[ RUN      \]' "$log" | tail -n 1
    echo "their first failures, and a sanitizer's report:"
    grep -E -A8 ': Failure$' "$log" | head -n 60
    grep -E -A40 -m1 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$log"
    echo "the log's end:"
    tail -n 30 "$log"
  fi
  rm -f "$log"
  return "$rc"
}
stage "C++ tests" logged_tests ./build/tests/cpp/qsp_tests
stage "C++ tests with QSP_MAX_CPU_ISA=ref from the environment" \
  logged_tests env QSP_MAX_CPU_ISA=ref ./build/tests/cpp/qsp_tests

# The library at -O1 with line tables only (-g1): the sanitizers' advice,
# and half the build of -O2 -g; the tests at -O0 (tests/cpp/CMakeLists.txt).
# Configured every time (0.7 s) so an existing build-asan takes changed
# flags.
sanitized() {
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" -DQSP_SANITIZE=ON \
    -DQSP_BUILD_TOOLS=OFF -DCMAKE_PREFIX_PATH="$ROOT/.venv" >/dev/null || return 1
  ninja -C build-asan | tail -n 1 &&
    logged_tests env ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ./build-asan/tests/cpp/qsp_tests
}
stage "C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer" sanitized

# qemu-user runs the x86-64 program on a CPU model of our choice: an
# instruction above the model's ISA ends the run with SIGILL (which
# QSP_MAX_CPU_ISA alone cannot show: it caps our dispatch, not the compiler).
# numpy's OpenBLAS (0.3.31) takes its Haswell kernels under qemu on some
# hosts whatever model is emulated (a Zen 5 host: OPENBLAS_VERBOSE=2 says
# "Core: Haswell" under -cpu Nehalem, and numpy's import-time dot faults on
# a VEX instruction); told the emulated model, it keeps to that ISA. Our
# code finds the ISA itself: that is what these stages test.
emulated() { # CPU model, then the command
  local cpu=$1; shift
  OPENBLAS_CORETYPE=$cpu qemu-x86_64 -cpu "$cpu" "$@" \
    2> >(grep -v "TCG doesn't support requested feature" >&2)
}
stage "C++ tests on an emulated AVX2-only CPU (qemu -cpu Haswell)" \
  logged_tests emulated Haswell ./build/tests/cpp/qsp_tests
stage "C++ tests on an emulated CPU without AVX (qemu -cpu Nehalem)" \
  logged_tests emulated Nehalem ./build/tests/cpp/qsp_tests
stage "Python modules on the emulated AVX2-only CPU" \
  emulated Haswell .venv/bin/python tests/emulated/every_module_forward_backward.py avx2
stage "Python modules on the emulated CPU without AVX" \
  emulated Nehalem .venv/bin/python tests/emulated/every_module_forward_backward.py ref

isa_hygiene() {
  python scripts/check_isa_hygiene.py build/libqsparseprop.so \
    "$(python -c 'import qsparseprop._C as c; print(c.__file__)')"
}
stage "ISA hygiene of the built code (objdump)" isa_hygiene
stage "include layering (arrows one way)" python scripts/check_layering.py

consumer() {
  cmake --install build --prefix build/install >/dev/null &&
    cmake -S tests/cmake_consumer -B build/consumer -G Ninja \
      -DCMAKE_PREFIX_PATH="$ROOT/build/install;$ROOT/.venv" >/dev/null &&
    ninja -C build/consumer >/dev/null &&
    ./build/consumer/consumer
}
stage "C++ user project: find_package(qsparseprop)" consumer

# libFuzzer targets (tests/fuzz, built with clang against the installed
# library): the committed seeds and regressions replayed, then each target
# fuzzed for QSP_FUZZ_SECONDS (default 20) from them, under ASan + UBSan.
fuzzing() {
  local secs=${QSP_FUZZ_SECONDS:-20} work
  CXX=clang++ cmake -S tests/fuzz -B build-fuzz -G Ninja \
    -DCMAKE_PREFIX_PATH="$ROOT/build/install;$ROOT/.venv" >/dev/null &&
    ninja -C build-fuzz >/dev/null || return 1
  work=$(mktemp -d)
  for t in csr_pattern persistent_cache patterns_file primitives; do
    mkdir -p "$work/$t"
    ./build-fuzz/fuzz_$t -runs=0 tests/fuzz/corpus/$t tests/fuzz/regressions/$t 2>/dev/null ||
      { echo "fuzz_$t: a committed input fails"; rm -rf "$work"; return 1; }
    ./build-fuzz/fuzz_$t -max_total_time="$secs" -print_final_stats=1 "$work/$t" tests/fuzz/corpus/$t \
      >"$work/$t.log" 2>&1 ||
      { tail -n 40 "$work/$t.log"; echo "fuzz_$t found a crash: add the input to tests/fuzz/regressions/$t"; rm -rf "$work"; return 1; }
    printf '   fuzz_%s: %s runs, no finding\n' "$t" "$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$')"
  done
  rm -rf "$work"
}
stage "fuzz targets (libFuzzer + ASan/UBSan, bounded time)" fuzzing

lint() {
  local py_dirs=(python tests scripts)
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
