"""Before / after a change that should not change speed: the same layer
training steps (forward + backward of our layer, and of the dense fp32 torch
layer beside it) timed in alternating fresh processes, one importing the
installed qsparseprop (after) and one another build of it (before).

    # the other build, e.g. of the commit before the change:
    git worktree add /tmp/before <commit> && cd /tmp/before &&
        .venv/bin/pip install --no-deps --no-build-isolation --target /tmp/qsp_before .
    python benchmarks/bench_before_after.py --before /tmp/qsp_before linear
    python benchmarks/bench_before_after.py --before /tmp/qsp_before conv --shapes C1,C3   # shapes: qsparseprop.bench's

Per case it prints the median over rounds of our step time on each side, the
ratio before/after (>= 1: after is as fast or faster), and the same ratio
normalised by the dense fp32 step timed in the same process (which cancels
a machine that is busier in one process than in the other).
Both sides run with the persistent cache off (QSP_CACHE_DIR="").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _shapes():
    """The layer shapes of ``python -m qsparseprop.bench`` (its L1-L4, C1-C4, ...):
    both builds have the table, each side reads its own."""
    from qsparseprop.bench import CONV_SHAPES, LINEAR_SHAPES

    return LINEAR_SHAPES, CONV_SHAPES


def _step_ms(layer, x, g) -> float:
    xg = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    layer(xg).backward(g)
    return (time.perf_counter() - t0) * 1e3


def measure(what: str, shapes: list[str], sparsity: float, schemes: list[str], repeats: int) -> dict:
    """One side, in this process: {case: [our median ms, dense fp32 median ms]}."""
    import torch

    import qsparseprop as q

    linear, conv = _shapes()
    out = {}
    for name in shapes:
        for scheme in schemes:
            torch.manual_seed(0)
            if what == "linear":
                b, k, n = linear[name]
                dense = torch.nn.Linear(k, n)
                x, g = torch.randn(b, k), torch.randn(b, n)
                cls = q.QuantizedSparseLinear if scheme == "s8" else q.SparseLinear
            else:
                b, c, oc, hw, k, s, p, groups = conv[name]
                dense = torch.nn.Conv2d(c, oc, k, stride=s, padding=p, groups=groups)
                o = (hw + 2 * p - k) // s + 1
                x, g = torch.randn(b, c, hw, hw), torch.randn(b, oc, o, o)
                cls = q.QuantizedSparseConv2d if scheme == "s8" else q.SparseConv2d
            with torch.no_grad():
                dense.weight.mul_(torch.rand(dense.weight.shape) >= sparsity)
            ours = cls.from_dense(dense)
            for _ in range(2):  # tuning, plans, code, page faults
                _step_ms(ours, x, g)
                _step_ms(dense, x, g)
            mine, theirs = [], []
            for r in range(repeats):
                pair = ((ours, mine), (dense, theirs))
                for layer, times in pair if r % 2 == 0 else pair[::-1]:
                    layer.zero_grad(set_to_none=True)
                    times.append(_step_ms(layer, x, g))
            out[f"{name} {sparsity:g} {scheme}"] = [statistics.median(mine), statistics.median(theirs)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["linear", "conv"])
    p.add_argument("--before", help="folder holding the other build's qsparseprop package")
    p.add_argument("--shapes", default=None, help="names of qsparseprop.bench's shapes; default all of the family")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--schemes", default="f32,s8")
    p.add_argument("--repeats", type=int, default=9, help="timed steps per case and process")
    p.add_argument("--rounds", type=int, default=3, help="processes per side, alternating")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    known = _shapes()[0 if a.what == "linear" else 1]
    shapes = a.shapes.split(",") if a.shapes else list(known)
    if any(s not in known for s in shapes):
        p.error(f"--shapes: known {', '.join(known)}")
    schemes = a.schemes.split(",")
    if a.measure:
        print(json.dumps(measure(a.what, shapes, a.sparsity, schemes, a.repeats)))
        return
    if not a.before or not os.path.isdir(os.path.join(a.before, "qsparseprop")):
        p.error("--before must name a folder holding a qsparseprop package")
    args = [sys.executable, os.path.abspath(__file__), a.what, "--measure", "--shapes", ",".join(shapes),
            "--sparsity", str(a.sparsity), "--schemes", a.schemes, "--repeats", str(a.repeats)]  # fmt: skip
    env = dict(os.environ, QSP_CACHE_DIR="")
    sides = {"before": dict(env, PYTHONPATH=a.before), "after": env}
    runs = {"before": [], "after": []}
    for r in range(a.rounds):
        for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
            res = subprocess.run(args, env=sides[side], capture_output=True, text=True, check=True)
            runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {side} done", file=sys.stderr, flush=True)
    import torch

    print(f"{a.what}: threads={torch.get_num_threads()} rounds={a.rounds} repeats={a.repeats} cpu=", end="")
    with open("/proc/cpuinfo") as f:
        print(next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown"))
    print(f"{'case':<14} {'before ms':>10} {'after ms':>10} {'before/after':>13} {'normalised':>11}")
    ratios, norm = [], []
    for case in runs["after"][0]:
        b = statistics.median(run[case][0] for run in runs["before"])
        f = statistics.median(run[case][0] for run in runs["after"])
        nb = statistics.median(run[case][0] / run[case][1] for run in runs["before"])
        nf = statistics.median(run[case][0] / run[case][1] for run in runs["after"])
        ratios.append(b / f)
        norm.append(nb / nf)
        print(f"{case:<14} {b:>10.3f} {f:>10.3f} {b / f:>13.3f} {nb / nf:>11.3f}")
    print(f"median before/after {statistics.median(ratios):.3f}, normalised {statistics.median(norm):.3f}")


if __name__ == "__main__":
    main()
