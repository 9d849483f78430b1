"""Where a transformer MLP block's training step goes, fused and unfused.

    python benchmarks/mlp_block_parts.py [--sparsity 0.9] [--steps 60]

The block of `python -m qsparseprop.bench block` (256 tokens, 768 -> 3072 ->
768, ReLU), pruned by magnitude, as the two swapped layers with a
MaskedReLU between them (unfused) and as `qsparseprop.fuse` makes it, f32
and int8: per step the median wall time, the time inside the library's
primitives split into kernels and passes (`qsparseprop.profile_info`), and
the rest (autograd, torch ops, Python). Ratios, not absolute times, on a
shared machine.
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import prune

import qsparseprop as q


def _dense_block(sparsity: float) -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(768, 3072), nn.ReLU(), nn.Linear(3072, 768))
    for layer in (block[0], block[2]):
        prune.l1_unstructured(layer, "weight", amount=sparsity)
        prune.remove(layer, "weight")
    return block


def _parts(block: nn.Module, x: torch.Tensor, steps: int) -> tuple[float, float, float]:
    """(median step ms, primitives ms, kernels ms) per step."""
    x = x.clone().requires_grad_()

    def step():
        block(x).sum().backward()

    for _ in range(10):
        step()
    q.set_profiling(True)
    q.clear_profile()
    times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        info = q.profile_info()
    finally:
        q.set_profiling(False)
    inside = sum(e["total_ms"] for e in info) / steps
    kernels = sum(e["kernel_ms"] for e in info) / steps
    return statistics.median(times) * 1e3, inside, kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    x = torch.randn(256, 768)
    print(f"{'':22s}{'step ms':>9s}{'kernels':>9s}{'passes':>9s}{'outside':>9s}")
    for scheme, cls in (("f32", q.SparseLinear), ("int8", q.QuantizedSparseLinear)):
        dense = _dense_block(a.sparsity)
        swapped = nn.Sequential(cls.from_dense(dense[0]), nn.ReLU(), cls.from_dense(dense[2]))
        fused = q.fuse(copy.deepcopy(swapped))
        q.use_masked_relus(swapped)
        for name, block in (("unfused", swapped), ("fused", fused)):
            step, inside, kernels = _parts(block, x, a.steps)
            print(f"{scheme + ' ' + name:22s}{step:9.2f}{kernels:9.2f}{inside - kernels:9.2f}{step - inside:9.2f}")


if __name__ == "__main__":
    main()
