"""One layer's training step (forward + backward, the input needing its
gradient too) dense fp32, ours in f32 and ours in int8, interleaved in one
process: rounds of a few steps of each in turn, medians, and the ratios
taken per round (a host that is busier in one round slows all three). A
Linear shape of ``python -m qsparseprop.bench`` (L1-L4) or, despite the
file's name, a Conv2d one (C1-C4, S2, P1, DW, STEM).

    .venv/bin/python benchmarks/linear_schemes_interleaved.py [--shape L1] [--sparsity 0.9] [--rounds 15]
    .venv/bin/python benchmarks/linear_schemes_interleaved.py --shape C3 --steps 2 --rounds 12

Prints the machine, the median step of each and the median ratios: int8
over our f32 (issue: >= 1.2x on CPUs without VNNI), our f32 and int8 over
dense fp32 (issue: f32 >= 4x on L1 and C3).
"""

import argparse
import statistics
import time

import torch
from torch.nn.utils import prune

import qsparseprop as q
from qsparseprop.bench import CONV_SHAPES, LINEAR_SHAPES, machine


def _layers_and_data(shape: str, sparsity: float):
    """(dense layer, its input, an output gradient) for one bench shape,
    the layer pruned at random to ``sparsity``."""
    if shape in LINEAR_SHAPES:
        batch, k, n = LINEAR_SHAPES[shape]
        dense = torch.nn.Linear(k, n)
        x, g = torch.randn(batch, k), torch.randn(batch, n)
    else:
        batch, cin, cout, hw, kernel, stride, pad, groups = CONV_SHAPES[shape]
        dense = torch.nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False)
        x = torch.randn(batch, cin, hw, hw)
        g = torch.randn(dense(x).shape)
    prune.random_unstructured(dense, "weight", amount=sparsity)
    prune.remove(dense, "weight")
    return dense, x.requires_grad_(), g


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="L1", choices=sorted(LINEAR_SHAPES) + sorted(CONV_SHAPES))
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=10, help="steps of each per round")
    a = p.parse_args()
    torch.manual_seed(0)
    dense, x, g = _layers_and_data(a.shape, a.sparsity)
    linear = isinstance(dense, torch.nn.Linear)
    layers = {
        "dense fp32": dense,
        "our f32": (q.SparseLinear if linear else q.SparseConv2d).from_dense(dense),
        "our int8": (q.QuantizedSparseLinear if linear else q.QuantizedSparseConv2d).from_dense(dense),
    }

    def step_ms(m, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            m(x).backward(g)
        return (time.perf_counter() - t) / steps * 1e3

    for m in layers.values():  # warm-up: tuning, plans, pools
        step_ms(m, a.steps)
    times = {name: [] for name in layers}
    for _ in range(a.rounds):
        for name, m in layers.items():
            times[name].append(step_ms(m, a.steps))

    def ratio(num: str, den: str) -> float:
        return statistics.median(x / y for x, y in zip(times[num], times[den], strict=True))

    m = machine()
    print(
        f"linear_schemes_interleaved: cpu={m['cpu']!r} isa={q.cpu_isa()} threads={torch.get_num_threads()} "
        f"shape={a.shape} (input {tuple(x.shape)}, weight {tuple(dense.weight.shape)}) sparsity={a.sparsity} "
        f"rounds={a.rounds} steps={a.steps}"
    )
    print("median step ms: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
    print(
        f"int8 x our f32 {ratio('our f32', 'our int8'):.3f}, our f32 x dense fp32 "
        f"{ratio('dense fp32', 'our f32'):.2f}, int8 x dense fp32 {ratio('dense fp32', 'our int8'):.2f}"
    )


if __name__ == "__main__":
    main()
