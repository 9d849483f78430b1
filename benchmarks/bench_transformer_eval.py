"""A pruned transformer encoder evaluated (eval mode, autograd off) dense, and
swapped to qsparseprop's layers — as swapped now, and with torch's fused
inference path let back in (what it did before the swap kept its layers off
that path: the path reads linear1.weight / linear2.weight itself and ran
them dense on the weights rebuilt every call). Interleaved, medians.

    .venv/bin/python benchmarks/bench_transformer_eval.py [--scheme f32|s8]
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from qsparseprop import swap_modules_with_sparse
from qsparseprop.bench import machine
from qsparseprop.swap import _restore_torchs_fast_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", choices=("f32", "s8"), default="f32")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    m = machine()
    print(f"bench_transformer_eval: cpu={m['cpu']!r} amx={m['amx']} threads={torch.get_num_threads()}")
    torch.manual_seed(0)
    d, ff, batch, tokens = 256, 1024, 32, 64
    layer = nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True)
    dense = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    for mod in dense.modules():
        if isinstance(mod, nn.Linear) and mod.weight.shape in ((ff, d), (d, ff)):
            with torch.no_grad():
                mod.weight.mul_(torch.rand(mod.weight.shape) >= args.sparsity)
    x = torch.randn(batch, tokens, d)
    swapped = swap_modules_with_sparse(
        copy.deepcopy(dense), (batch, tokens, d), verbose=False, scheme=args.scheme, min_speedup=0.0, persistent=False
    )
    torchs_path = copy.deepcopy(swapped)
    _restore_torchs_fast_path(torchs_path)  # what to_dense does: torch's path in again
    models = {"dense": dense, "swapped": swapped, "swapped, torch's path": torchs_path}
    times = {k: [] for k in models}
    with torch.no_grad():
        for k in models:
            models[k].eval()(x)  # warm-up
        for _ in range(args.repeats):
            for k, model in models.items():
                t = time.perf_counter()
                model(x)
                times[k].append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"2 x TransformerEncoderLayer({d}, 4, {ff}), {args.sparsity:.0%} sparse, {args.scheme}, x {batch}x{tokens}")
    for k, v in ms.items():
        print(f"{k:<24} {v:8.2f} ms  {ms['dense'] / v:5.2f}x dense")


if __name__ == "__main__":
    main()
