"""Per-sample gradients (torch.func: vmap of grad through functional_call)
of a swapped model against the dense one: the main job's CNN, pruned, in
eval mode (BatchNorm's running statistics, as DP-SGD needs), a batch of
per-sample gradients. Under a torch.func transform the model runs unfused
and vmap folds the samples into one call for forward and backward-data
(f32) but computes the weights' gradients once per sample (``docs/design.md``):
this says what that costs. Interleaved rounds in one process, medians.

    .venv/bin/python benchmarks/bench_per_sample_grads.py [--scheme s8] [--batch 32] [--rounds 9]
"""

import argparse
import copy
import statistics
import time

import torch
from torch.func import functional_call, grad, vmap

from qsparseprop import cpu_isa, swap_modules_with_sparse
from qsparseprop.bench import machine
from qsparseprop.finetune import make_model


def _prune(model: torch.nn.Module, sparsity: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight[0].numel() > 9:
            keep = torch.rand(m.weight.shape, generator=gen) >= sparsity
            with torch.no_grad():
                m.weight.mul_(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="f32", choices=["f32", "s8"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    m = machine()
    print(f"bench_per_sample_grads: cpu={m['cpu']!r} isa={cpu_isa()} amx={m['amx']} threads={torch.get_num_threads()}")
    torch.manual_seed(0)
    dense = make_model("cnn", 28, 24)
    _prune(dense, args.sparsity)
    ours = swap_modules_with_sparse(
        copy.deepcopy(dense), (args.batch, 1, 28, 28), verbose=False, scheme=args.scheme, min_speedup=0.0,
        repeats=1, persistent=False,
    )  # fmt: skip
    x, labels = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))

    def per_sample(model):
        model.eval()
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(p, xs, ys):
            out = functional_call(model, (p, buffers), (xs.unsqueeze(0),))
            return torch.nn.functional.cross_entropy(out, ys.unsqueeze(0))

        def run():
            t = time.perf_counter()
            vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)
            return time.perf_counter() - t

        return run

    runs = {"dense fp32": per_sample(dense), f"swapped {args.scheme}": per_sample(ours)}
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(run())
    base = statistics.median(times["dense fp32"])
    print(f"per-sample gradients of a batch of {args.batch}, {args.sparsity:.0%} sparse, {args.rounds} rounds:")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:<14} {med * 1e3:9.1f} ms   {base / med:5.2f}x dense fp32")


if __name__ == "__main__":
    main()
