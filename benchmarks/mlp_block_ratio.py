"""The MLP block's unfused / fused training-step ratio, interleaved in one process.

    python benchmarks/mlp_block_ratio.py [--scheme int8] [--rounds 30]

The block of `python -m qsparseprop.bench block` (256 tokens, 768 -> 3072 ->
768, ReLU, 90 %), as the two swapped layers with a MaskedReLU between them
and as `qsparseprop.fuse` makes it: rounds of 5 steps each, alternating,
medians. The unfused block is the yardstick a library change to the fused
path is read against (compare the ratio between two builds, each run in
its own process: on a shared machine the absolute times of two processes
differ by more than such a change).
"""

import argparse
import copy
import statistics
import time

import torch
from mlp_block_parts import _dense_block
from torch import nn

import qsparseprop as q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", choices=("f32", "int8"), default="int8")
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    cls = q.QuantizedSparseLinear if a.scheme == "int8" else q.SparseLinear
    dense = _dense_block(0.9)
    unfused = nn.Sequential(cls.from_dense(dense[0]), nn.ReLU(), cls.from_dense(dense[2]))
    fused = q.fuse(copy.deepcopy(unfused))
    q.use_masked_relus(unfused)
    x = torch.randn(256, 768).requires_grad_()
    for block in (unfused, fused):
        for _ in range(10):
            block(x).sum().backward()
    times = ([], [])
    for _ in range(a.rounds):
        for i, block in enumerate((unfused, fused)):
            t = time.perf_counter()
            for _ in range(5):
                block(x).sum().backward()
            times[i].append((time.perf_counter() - t) / 5 * 1e3)
    u, f = statistics.median(times[0]), statistics.median(times[1])
    print(f"{a.scheme} unfused {u:.2f} ms  fused {f:.2f} ms  unfused / fused {u / f:.3f}")


if __name__ == "__main__":
    main()
