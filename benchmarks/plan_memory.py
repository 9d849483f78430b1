"""The heap a sparse Linear layer's plans take, per nonzero.

    python benchmarks/plan_memory.py [--features 4096] [--sparsity 0.9] [--batch 64]

One layer (features x features, pruned at random), f32 and int8, each in
a fresh process: the heap (malloc's bytes in use, mmapped blocks included)
before and after its first training step, which builds the forward,
backward-data and backward-weights plans and the layer's generated code;
the step's tensors are freed before the second reading. Also what the
plan cache reports for the plans (``memory_bytes()``, the figure its byte
bound counts), per nonzero.
"""

import argparse
import ctypes
import gc
import json
import subprocess
import sys

import torch

import qsparseprop as q


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _heap(libc) -> int:
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _one(scheme: str, features: int, sparsity: float, batch: int) -> dict:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    torch.manual_seed(0)
    dense = torch.nn.Linear(features, features)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) >= sparsity)
    layer = (q.QuantizedSparseLinear if scheme == "s8" else q.SparseLinear).from_dense(dense)
    del dense
    x = torch.randn(batch, features, requires_grad=True)
    gc.collect()
    before = _heap(libc)
    layer(x).sum().backward()
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    gc.collect()
    grown = _heap(libc) - before
    plans = next(c for c in q.cache_info() if c["name"] == "jit_plan")
    nnz = layer.values.numel()
    return {"scheme": scheme, "nnz": nnz, "heap_per_nnz": grown / nnz, "cache_per_nnz": plans["bytes"] / nnz}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--one", choices=("f32", "s8"), help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    if a.one:
        print(json.dumps(_one(a.one, a.features, a.sparsity, a.batch)))
        return
    print(f"Linear {a.features}x{a.features}, {a.sparsity:.0%} sparse, batch {a.batch}, isa={q.cpu_isa()}")
    print(f"{'scheme':8s}{'nonzeros':>10s}{'heap B/nnz':>12s}{'cache says':>12s}")
    for scheme in ("f32", "s8"):
        args = [sys.executable, __file__, "--one", scheme, "--features", str(a.features),
                "--sparsity", str(a.sparsity), "--batch", str(a.batch)]  # fmt: skip
        r = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
        print(f"{scheme:8s}{r['nnz']:>10d}{r['heap_per_nnz']:>12.1f}{r['cache_per_nnz']:>12.1f}")


if __name__ == "__main__":
    main()
