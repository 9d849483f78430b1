"""One Linear layer's training step (forward + backward, the input needing
its gradient too) dense fp32, ours in f32 and ours in int8, interleaved in
one process: rounds of a few steps of each in turn, medians, and the ratios
taken per round (a host that is busier in one round slows all three).

    .venv/bin/python benchmarks/linear_schemes_interleaved.py [--shape L1] [--sparsity 0.9] [--rounds 15]

Prints the machine, the median step of each and the median ratios: int8
over our f32 (issue: >= 1.2x on CPUs without VNNI), our f32 and int8 over
dense fp32.
"""

import argparse
import statistics
import time

import torch
from torch.nn.utils import prune

import qsparseprop as q
from qsparseprop.bench import LINEAR_SHAPES, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="L1", choices=sorted(LINEAR_SHAPES))
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=10, help="steps of each per round")
    a = p.parse_args()
    batch, k, n = LINEAR_SHAPES[a.shape]
    torch.manual_seed(0)
    dense = torch.nn.Linear(k, n)
    prune.random_unstructured(dense, "weight", amount=a.sparsity)
    prune.remove(dense, "weight")
    layers = {
        "dense fp32": dense,
        "our f32": q.SparseLinear.from_dense(dense),
        "our int8": q.QuantizedSparseLinear.from_dense(dense),
    }
    x = torch.randn(batch, k, requires_grad=True)
    g = torch.randn(batch, n)

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
        f"shape={a.shape} ({batch} x {k} -> {n}) sparsity={a.sparsity} rounds={a.rounds}"
    )
    print("median step ms: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
    print(
        f"int8 x our f32 {ratio('our f32', 'our int8'):.3f}, our f32 x dense fp32 "
        f"{ratio('dense fp32', 'our f32'):.2f}, int8 x dense fp32 {ratio('dense fp32', 'our int8'):.2f}"
    )


if __name__ == "__main__":
    main()
