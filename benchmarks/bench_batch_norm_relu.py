"""The fused BatchNorm2d+ReLU passes against torch's BatchNorm2d and ReLU,
forward and backward timed apart, at the main job's sizes: keeping the
fp32 input for the backward (f32 blocks) and keeping its int8 copy (int8
blocks, docs/quantization.md). Medians of interleaved rounds, one process.

    .venv/bin/python benchmarks/bench_batch_norm_relu.py [--rounds 15]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qsparseprop import _C, _ops
from qsparseprop.bench import machine

SHAPES = [(128, 24, 28, 28), (128, 48, 14, 14), (128, 96, 7, 7)]  # the main job's CNN at batch 128


def _ours(keep_s8: bool):
    def run(y, w, b, g):
        t0 = time.perf_counter()
        z, _, _ = _ops.batch_norm_relu(y, w, b, None, None, 1e-5, True, True, keep_s8)
        t1 = time.perf_counter()
        z.backward(g)
        return t1 - t0, time.perf_counter() - t1

    return run


def _torch(y, w, b, g):
    t0 = time.perf_counter()
    z = torch.relu(F.batch_norm(y, None, None, w, b, True, 0.1, 1e-5))
    t1 = time.perf_counter()
    z.backward(g)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    m = machine()
    print(f"cpu={m['cpu']!r} amx={'yes' if m['amx'] else 'no'} isa={_C.effective_cpu_isa()} "
          f"threads={torch.get_num_threads()}; forward + backward ms, medians of {a.rounds}")  # fmt: skip
    variants = {"ours, f32 input kept": _ours(False), "ours, int8 copy kept": _ours(True), "torch": _torch}
    torch.manual_seed(0)
    for shape in SHAPES:
        c = shape[1]
        y, g = torch.randn(shape) * 2 + 1, torch.randn(shape)
        w, b = torch.rand(c) + 0.5, torch.randn(c)
        times = {name: [] for name in variants}
        for _ in range(a.rounds):
            for name, run in variants.items():
                args = (t.clone().requires_grad_() for t in (y, w, b))
                times[name].append(run(*args, g))
        cells = []
        for name, t in times.items():
            fwd, bwd = (statistics.median(x[i] for x in t) * 1e3 for i in (0, 1))
            cells.append(f"{name} {fwd:.2f} + {bwd:.2f}")
        print(f"{'x'.join(map(str, shape)):<14} " + " | ".join(cells))


if __name__ == "__main__":
    main()
