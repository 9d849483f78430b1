"""The layer-specialised SpMM code (``jit:<isa>:pattern``) against the
generic kernels it competes with, per Linear shape, sparsity, scheme and
direction, as the tuner measured them (median of 7 whole-primitive runs
each, back to back in one process, on the benchmark's shapes).

    .venv/bin/python benchmarks/bench_pattern_vs_generic.py [--shapes L1,L3] [--isa avx512_vnni]

Runs ``python -m qsparseprop.bench linear --repeats 1`` with
``QSP_VERBOSE=dispatch`` and the persistent cache off, and reads the
tuner's lines (``tune,sparse_linear_forward,...,jit:avx512_core=0.98ms,
jit:avx512_core:pattern=0.75ms,...``).
"""

import argparse
import os
import re
import subprocess
import sys

SHAPES = {"mb256ic768oc3072": "L1", "mb256ic3072oc768": "L2", "mb128ic4096oc4096": "L3", "mb64ic512oc1000": "L4"}
LINE = re.compile(r"qsp_verbose,tune,sparse_linear_(\w+),(mb\w+),density=([0-9.e-]+),.*?threads=\d+,(.*),runs=")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="L1,L2,L3,L4")
    ap.add_argument("--isa", choices=["avx512_vnni"], default=None)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "qsparseprop.bench", "linear", "--repeats", "1", "--shapes", args.shapes]
    if args.isa:
        cmd += ["--isa", args.isa]
    env = dict(os.environ, QSP_VERBOSE="dispatch", QSP_CACHE_DIR="")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    print(out.splitlines()[0].replace("bench linear", "bench_pattern_vs_generic"))
    print(f"{'shape':<6} {'sp':>5} {'direction':<15} {'generic ms':>11} {'pattern ms':>11} {'ratio':>6}  scheme")
    ratios = []
    for m in LINE.finditer(out):
        direction, shape, density, times = m.groups()
        t = dict(kv.split("=") for kv in times.split(","))
        t = {k: float(v.rstrip("ms")) for k, v in t.items()}
        pattern = [k for k in t if k.endswith(":pattern")]
        if not pattern:
            continue
        generic = pattern[0][: -len(":pattern")]
        if generic not in t:
            continue
        scheme = "s8" if "vnni" in generic or "dense:onednn_s8" in t else "f32"
        r = t[generic] / t[pattern[0]]
        ratios.append(r)
        sp = 1 - float(density)
        name = SHAPES.get(shape, shape)
        print(f"{name:<6} {sp:5.2f} {direction:<15} {t[generic]:11.3f} {t[pattern[0]]:11.3f} {r:6.2f}  {scheme}")
    if ratios:
        ratios.sort()
        print(f"generic / pattern: median {ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
