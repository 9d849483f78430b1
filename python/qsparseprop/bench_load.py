"""Training under a competing CPU load: how much slower a step of dense
torch and of the same model swapped to qsparseprop int8 gets when other
processes busy the same cores.

    python -m qsparseprop.bench_load                  # 2 busy processes, both wait policies

Each configuration runs in a fresh process (the OpenMP wait policy is read
at start-up): the step time is measured idle, then with the busy processes
running, interleaving dense and ours; printed are the medians and the
slow-down factors. ``OMP_WAIT_POLICY=passive`` makes waiting OpenMP threads
sleep instead of spinning, which is what oversubscribed cores need; GNU
OpenMP's default spins for a while first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def _burn(stop) -> None:  # a competing process: one core busy until told to stop
    x = 0
    while not stop.is_set():
        for _ in range(100000):
            x += 1


def _model():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    for layer in (m[0], m[3]):
        prune.l1_unstructured(layer, "weight", amount=0.9)
        prune.remove(layer, "weight")
    return m


def _phase(busy: int, repeats: int) -> dict:
    from .swap import swap_modules_with_sparse

    shape = (32, 16, 28, 28)
    x, y = torch.randn(shape), torch.randint(0, 10, (32,))
    dense = _model().train()
    ours = swap_modules_with_sparse(_model(), shape, scheme="s8", verbose=False, persistent=False).train()

    def step(m):
        t = time.perf_counter()
        nn.functional.cross_entropy(m(x), y).backward()
        return time.perf_counter() - t

    for m in (dense, ours):
        for _ in range(3):
            step(m)
    out = {}
    for label, n in (("idle", 0), ("loaded", busy)):
        stop = multiprocessing.Event()
        procs = [multiprocessing.Process(target=_burn, args=(stop,)) for _ in range(n)]
        for p in procs:
            p.start()
        time.sleep(0.5)
        d, o = [], []
        for _ in range(repeats):  # interleaved: both see the same load
            d.append(step(dense))
            o.append(step(ours))
        stop.set()
        for p in procs:
            p.join()
        out[label] = dict(dense_ms=1e3 * statistics.median(d), ours_ms=1e3 * statistics.median(o))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=2, help="competing busy processes")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.phase:
        print(json.dumps(_phase(a.busy, a.repeats)))
        return
    from .bench import machine

    m = machine()
    print(f"bench_load: cpu={m['cpu']!r} threads={torch.get_num_threads()} busy processes={a.busy}", flush=True)
    rows = []
    for policy in ("default", "passive"):
        env = dict(os.environ)
        if policy == "passive":
            env["OMP_WAIT_POLICY"] = "passive"
        else:
            env.pop("OMP_WAIT_POLICY", None)
        res = subprocess.run(
            [sys.executable, "-m", "qsparseprop.bench_load", "--phase", "--busy", str(a.busy), "--repeats",
             str(a.repeats)], env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(res.stdout.strip().splitlines()[-1])
        row = dict(
            policy=policy, **{f"{k}_{s}": v for s, d in r.items() for k, v in d.items()},
            dense_slowdown=r["loaded"]["dense_ms"] / r["idle"]["dense_ms"],
            ours_slowdown=r["loaded"]["ours_ms"] / r["idle"]["ours_ms"],
        )  # fmt: skip
        rows.append(row)
        print(f"OMP_WAIT_POLICY={policy:<8} dense {row['dense_ms_idle']:.1f} -> {row['dense_ms_loaded']:.1f} ms "
              f"({row['dense_slowdown']:.1f}x), qsparseprop int8 {row['ours_ms_idle']:.1f} -> "
              f"{row['ours_ms_loaded']:.1f} ms ({row['ours_slowdown']:.1f}x)", flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
