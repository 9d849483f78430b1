#!/usr/bin/env python3
"""One folder, one job, and the arrows point one way.

    python -> primitives core -> implementations -> (jit | passes) -> runtime
                   core -> passes (the post-op chain)

Fails when a source file includes a project header its room may not use.
The rooms and what each may include (besides itself and system headers):

  include/qsparseprop (api)        nothing else
  runtime/                         api
  jit/                             api, runtime
  primitives/passes/               api, runtime, jit/tile_abi.hpp (the tile ABI, not the generators)
  primitives/core/                 api, runtime, passes  (it names no implementation; it applies
                                   the post-op chain, a pass, to every implementation's output)
  primitives/<family>/             api, runtime, jit, passes, core (not another family)
    families: ref, sparse_jit, dense_onednn
  primitives/implementation_list.cpp  api, core and every family: the one place they meet
  python/                          api, core (its test hooks)
  tools/, benchmarks/              api only (what a user can use)
  tests/                           anything

    python scripts/check_layering.py          # from the repository root
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

FAMILIES = ("ref", "sparse_jit", "dense_onednn")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def room_of(path: str) -> str | None:
    """The room of a repository path (a file, or an included header)."""
    if path.startswith("include/qsparseprop/") or path.startswith("qsparseprop/"):
        return "api"
    if path == "jit/tile_abi.hpp":
        return "tile_abi"
    for prefix, room in (
        ("runtime/", "runtime"),
        ("jit/", "jit"),
        ("python/", "python"),
        ("tools/", "tools"),
        ("benchmarks/", "tools"),
        ("tests/", "tests"),
        ("primitives/core/", "core"),
        ("primitives/passes/", "passes"),
    ):
        if path.startswith(prefix):
            return room
    if path == "primitives/implementation_list.cpp":
        return "list"
    for family in FAMILIES:
        if path.startswith(f"primitives/{family}/"):
            return f"family:{family}"
    return None


def allowed(src_room: str, dst_room: str) -> bool:
    if src_room == "tests" or src_room == dst_room:
        return True
    rules = {
        "api": set(),
        "runtime": {"api"},
        "tile_abi": set(),
        "jit": {"api", "runtime", "tile_abi"},
        "passes": {"api", "runtime", "tile_abi"},
        "core": {"api", "runtime", "passes", "tile_abi"},
        "list": {"api", "core"} | {f"family:{f}" for f in FAMILIES},
        "python": {"api", "core"},
        "tools": {"api"},
    }
    for family in FAMILIES:
        rules[f"family:{family}"] = {"api", "runtime", "jit", "tile_abi", "passes", "core"}
    return dst_room in rules[src_room]


def check(root: Path) -> list[str]:
    files = subprocess.run(
        ["git", "ls-files", "*.cpp", "*.hpp", "*.h"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.split()
    problems = []
    for f in files:
        src_room = room_of(f)
        if src_room is None:
            if f.startswith(("primitives/", "jit/", "runtime/", "include/")):
                problems.append(
                    f"{f}: not in a known room (primitives/core, primitives/passes, "
                    f"primitives/<family>, jit, runtime): add it to scripts/check_layering.py"
                )
            continue
        text = (root / f).read_text()
        for m in INCLUDE.finditer(text):
            header = m.group(1)
            dst_room = room_of(header)
            if dst_room is None:
                continue  # a header next to the file, or not the project's
            if dst_room == "tile_abi" and src_room not in ("jit",) and allowed(src_room, "jit"):
                continue  # whoever may use jit/ may use its ABI header
            if not allowed(src_room, dst_room):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{f}:{line}: {src_room} may not include {header} ({dst_room})")
    return problems


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    problems = check(root)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} include(s) cross a forbidden arrow (see scripts/check_layering.py)", file=sys.stderr)
        return 1
    print("layering: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
