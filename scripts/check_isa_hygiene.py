#!/usr/bin/env python3
"""Every ISA tier runs only on the CPU it claims: a static check of built code.

Disassembles the given shared objects (objdump) and fails when a function
holds instructions above what its name admits:

- names containing ``avx512``: anything;
- names containing ``avx2`` (and not ``avx512``): AVX/AVX2 (VEX, ymm), no
  AVX-512 (zmm, opmask registers, xmm/ymm16-31, {k} masking);
- every other function: baseline x86-64 only (no VEX/EVEX instruction at all),
  because a portable caller may reach it on any CPU.

This catches what QSP_MAX_CPU_ISA cannot: a portable loop or an inline
function of a shared header compiled with AVX-512 enabled, which crashes
with SIGILL on AVX2-only CPUs. Generated (JIT) code is not in these files;
the emulated-CPU test runs cover it.

    python scripts/check_isa_hygiene.py build/libqsparseprop.so [more.so ...]
"""

from __future__ import annotations

import re
import subprocess
import sys

AVX512_OPERAND = re.compile(r"%zmm\d+|%k[0-7]\b|\{%k[0-7]\}|%[xy]mm(1[6-9]|2\d|3[01])\b|\{1to\d+\}")
FUNC_HEADER = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def tier_of(instruction: str) -> int:
    """0 baseline, 1 AVX/AVX2 (VEX), 2 AVX-512 (EVEX)."""
    parts = instruction.split(None, 1)
    if not parts:
        return 0
    mnemonic, operands = parts[0], parts[1] if len(parts) > 1 else ""
    if AVX512_OPERAND.search(operands) or mnemonic.startswith("k"):
        # kmov/kand... are AVX-512 opmask instructions
        if mnemonic.startswith("k") and not AVX512_OPERAND.search(operands):
            return 2 if re.match(r"k(mov|and|or|xor|not|shift|test|ortest|add|unpck)", mnemonic) else 0
        return 2
    if mnemonic.startswith("v") or "%ymm" in operands:
        return 1
    return 0


def allowed_tier(function: str) -> int:
    name = function.lower()
    if "avx512" in name:
        return 2
    if "avx2" in name:
        return 1
    return 0


def check(path: str) -> list[str]:
    out = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", "-M", "att", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    problems: dict[str, tuple[int, str]] = {}
    function = None
    for line in out.splitlines():
        m = FUNC_HEADER.match(line)
        if m:
            function = m.group(1)
            continue
        if function is None or "\t" not in line:
            continue
        instruction = line.split("\t", 1)[1].strip()
        tier = tier_of(instruction)
        if tier > allowed_tier(function) and function not in problems:
            problems[function] = (tier, instruction)
    names = {1: "AVX/AVX2", 2: "AVX-512"}
    return [
        f"{path}: {fn}: {names[t]} instruction `{ins}` in a function whose name does not admit it"
        for fn, (t, ins) in sorted(problems.items())
    ]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    problems = [p for path in argv for p in check(path)]
    for p in problems:
        print(p)
    if problems:
        print(
            f"{len(problems)} function(s) hold instructions above their tier: move portable code out of "
            "the target regions, or name the function after its tier",
            file=sys.stderr,
        )
        return 1
    print(f"ISA hygiene: ok ({', '.join(argv)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
