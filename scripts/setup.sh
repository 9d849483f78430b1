#!/usr/bin/env bash
# Installs what qsparseprop needs on a fresh Debian 12/13 machine (as root,
# Python 3.11) and builds it: Debian packages, a virtualenv (.venv) with the
# pinned Python packages of requirements.txt, the C++ library and tests
# (build/), and the Python package into the venv. Idempotent: a second run
# installs nothing and rebuilds only what changed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '== %s\n' "$*"; }

# Python 3.11 (the torch==2.13.0 CPU wheel on this machine kind is for 3.11).
PY=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PY=$(command -v "$cand"); break
  fi
done
[[ -n $PY ]] || { echo "setup: Python 3.11 is required (python3.11 or python3 on PATH)" >&2; exit 1; }

# Debian packages: compiler, Xbyak, GoogleTest, Google Benchmark, clang-format,
# qemu-user (the emulated-CPU test runs), binutils (objdump: the ISA check),
# Fashion-MNIST (the main job's default data set), nlohmann-json (qsp-warmup
# reads patterns files), clang with its runtimes (libFuzzer and the sanitizers
# of the fuzz targets live in libclang-rt-dev, not in clang itself), ccache
# (below).
APT_PACKAGES=(g++ git libxbyak-dev libgtest-dev libbenchmark-dev clang-format qemu-user binutils
  dataset-fashion-mnist nlohmann-json3-dev clang libclang-rt-dev ccache)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=("python3-venv")
fi
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Virtualenv with the pinned packages (skipped when requirements.txt is unchanged).
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $PY"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
req_sha=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$req_sha" ]]; then
  log "pip install -r requirements.txt"
  pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v '^WARNING: Location' || true
  python -c 'import torch, sklearn, pybind11, scikit_build_core, idx2numpy, tqdm' # fail loudly if pip did not deliver
  echo "$req_sha" > .venv/.requirements.sha256
fi

# `pip install .` builds the library again in its own directory
# (build/python), the same sources with the same flags: through ccache the
# second build takes its objects from the first (a fresh clone on 2 Zen 3
# cores: the library's 63 objects in under a second instead of about 90 s).
# CMake takes the launcher and the compiler from the environment when it
# configures a build directory for the first time; the compiler by the name
# pip's build calls it (Python's sysconfig: g++), as ccache hashes the name
# (c++ and g++, the same file, missed every object).
if command -v ccache >/dev/null; then
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache CXX=${CXX:-g++}
fi

# C++ library, tools and GoogleTest suite.
if [[ ! -f build/build.ninja ]]; then
  log "configuring build/"
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$ROOT/.venv" >/dev/null
fi
log "building the C++ library and tests"
ninja -C build | tail -n 1

# The Python package (scikit-build-core; reuses build/python incrementally).
log "pip install . (qsparseprop + its _C module)"
pip install -q --disable-pip-version-check --no-build-isolation --no-deps . 2>&1 | grep -v '^WARNING: Location' || true
python -c 'import qsparseprop' # fail loudly if the install did not work
