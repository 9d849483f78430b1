"""The cost of a new input shape: a Linear fed batches of varying size, as a
language model with dynamic padding feeds its layers (tokens = sequences x
a length that changes every step).

    python benchmarks/bench_dynamic_shapes.py [--steps 60] [--sparsity 0.9]

A 768 -> 3072 Linear pruned by magnitude, f32 and int8, trained one
forward+backward per step on 8 sequences of 40-80 tokens: the first pass
over the step sizes (each new one built and tuned) and a second pass (all
known). Set QSP_CACHE_DIR to an empty folder to measure a first run: the
persistent cache would otherwise hand over the decisions of a run before.
"""

import argparse
import time

import torch
from torch import nn
from torch.nn.utils import prune

import qsparseprop as q


def _step(layer: nn.Module, tokens: int) -> float:
    """Seconds of one forward+backward on ``tokens`` rows."""
    x = torch.randn(tokens, 768, requires_grad=True)
    t = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sparsity", type=float, default=0.9)
    a = p.parse_args()
    torch.manual_seed(0)
    dense = nn.Linear(768, 3072)
    prune.l1_unstructured(dense, "weight", a.sparsity)
    prune.remove(dense, "weight")
    lengths = torch.randint(40, 81, (a.steps,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens = [8 * n for n in lengths]
    print(f"cpu isa {q.cpu_isa()}, threads {torch.get_num_threads()}; {a.steps} steps of "
          f"{min(tokens)}-{max(tokens)} tokens ({len(set(tokens))} distinct)")  # fmt: skip
    for cls in (q.SparseLinear, q.QuantizedSparseLinear):
        layer = cls.from_dense(dense)
        first = sum(_step(layer, n) for n in tokens)
        second = sum(_step(layer, n) for n in tokens)
        print(f"{cls.__name__:24s} first pass {first:6.2f} s   second pass {second:6.2f} s")


if __name__ == "__main__":
    main()
