"""MaskedReLU (one bit per element saved) vs torch.relu, forward + backward,
interleaved, medians; and the bytes each saves for the backward.

    .venv/bin/python benchmarks/bench_masked_relu.py
"""

import statistics
import time

import torch

from qsparseprop import MaskedReLU
from qsparseprop.bench import machine
from qsparseprop.memory import saved_activation_bytes


def main(repeats: int = 31) -> None:
    m = machine()
    print(f"bench_masked_relu: cpu={m['cpu']!r} threads={torch.get_num_threads()}")
    print(f"{'shape':<20} {'torch.relu ms':>13} {'MaskedReLU ms':>14} {'ratio':>6} {'saved: torch':>13} {'masked':>9}")
    for shape in [(128, 24, 28, 28), (128, 48, 14, 14), (128, 96, 7, 7), (256, 4096)]:
        x, g = torch.randn(shape, requires_grad=True), torch.randn(shape)
        times = {"torch": [], "masked": []}
        for _ in range(repeats):  # interleaved: both see the same machine state
            for name, f in (("torch", torch.relu), ("masked", MaskedReLU())):
                t = time.perf_counter()
                f(x).backward(g)
                times[name].append(time.perf_counter() - t)
        a, b = (1e3 * statistics.median(times[k]) for k in ("torch", "masked"))
        sa = saved_activation_bytes(torch.nn.ReLU(), x) / 2**20
        sb = saved_activation_bytes(MaskedReLU(), x) / 2**20
        print(f"{str(shape):<20} {a:>13.3f} {b:>14.3f} {a / b:>6.2f} {sa:>9.2f} MiB {sb:>5.2f} MiB")


if __name__ == "__main__":
    main()
