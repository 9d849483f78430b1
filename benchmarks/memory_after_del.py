"""Memory left behind by deleted layers: N small sparse Linear layers, one
training step each, then ``del`` + ``gc.collect()``. Prints what the caches
hold and what the allocator and the process still hold.

    python benchmarks/memory_after_del.py                  # the default cache bound
    python benchmarks/memory_after_del.py --limit-mib 0    # keep nothing not in use
"""

from __future__ import annotations

import argparse
import ctypes
import gc

import torch
from torch import nn

import qsparseprop as q


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=500)
    p.add_argument("--limit-mib", type=float, default=None, help="qsparseprop.set_cache_memory_limit (MiB)")
    a = p.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    if a.limit_mib is not None:
        q.set_cache_memory_limit(int(a.limit_mib * 2**20))
    torch.manual_seed(0)
    x = torch.randn(8, 64)

    def layer():
        d = nn.Linear(64, 64)
        with torch.no_grad():
            d.weight.mul_(torch.rand_like(d.weight) > 0.9)
        s = q.SparseLinear.from_dense(d)
        s(x).sum().backward()
        return s

    del_first = layer()  # what the first layer sets up once (pools, threads)
    del del_first
    gc.collect()
    libc.malloc_trim(0)
    rss0, used0 = _resident(), libc.mallinfo2().uordblks
    layers = [layer() for _ in range(a.layers)]
    rss1 = _resident()
    del layers
    gc.collect()
    rss2 = _resident()
    libc.malloc_trim(0)
    rss3, used3 = _resident(), libc.mallinfo2().uordblks
    mib = 2**20
    print(f"qsparseprop {q._C.version()}: {a.layers} Linear 64->64 layers at 90 %, cache bound "
          f"{q._C.cache_memory_limit() / mib:.0f} MiB, isa={q.cpu_isa()}")  # fmt: skip
    print(f"resident: +{(rss1 - rss0) / mib:.1f} MiB with the layers, +{(rss2 - rss0) / mib:.1f} MiB after del, "
          f"+{(rss3 - rss0) / mib:.1f} MiB after malloc_trim; allocated: +{(used3 - used0) / mib:.1f} MiB")  # fmt: skip
    for c in q.cache_info():
        print(
            f"  {c['name']:<24} held {c['size']:>5} ({c['bytes'] / mib:7.2f} MiB)  "
            f"in use elsewhere {c['in_use_elsewhere']}"
        )


if __name__ == "__main__":
    main()
