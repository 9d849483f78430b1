"""The main job's training step against dense PyTorch with torch.compile: our
int8 and f32 layers (eager; compiling them changes nothing, their ops are
opaque to inductor) against dense fp32 and bf16 autocast, eager and
compiled (inductor, the default mode). The main job's table compares with
eager dense only; a user who compiles the dense model gets a faster rival,
and this says by how much. The main job's CNN at its defaults (90 % per
layer, batch 128), pruned by magnitude. Interleaved rounds in one process,
median step times; the compiled variants' compile time printed apart.

    .venv/bin/python benchmarks/bench_dense_compiled.py [--rounds 9] [--steps 5]
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from qsparseprop import cpu_isa, swap_modules_with_sparse, use_masked_relus
from qsparseprop.bench import compiled_output_problem, inductor_caches_off_under_aten_cap, machine
from qsparseprop.finetune import make_model, prune_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    m = machine()
    if line := inductor_caches_off_under_aten_cap():
        print(line)
    print(f"bench_dense_compiled: cpu={m['cpu']!r} isa={cpu_isa()} amx={m['amx']} "
          f"bf16_native={m['bf16_native']} threads={torch.get_num_threads()} torch={torch.__version__}")  # fmt: skip
    torch.manual_seed(0)
    pruned = make_model("cnn", 28, 24)
    prune_model(pruned, args.sparsity, "layer")
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    variants = {}  # name: (model, autocast dtype)
    for scheme, name in (("s8", "qsparseprop int8"), ("f32", "qsparseprop f32")):
        ours = swap_modules_with_sparse(
            copy.deepcopy(pruned), tuple(x.shape), verbose=False, scheme=scheme, min_sparsity=0.0, mask_kept=False
        )
        use_masked_relus(ours)
        variants[name] = (ours, None)
    dtypes = [("fp32", None)] + ([("bf16 autocast", torch.bfloat16)] if m["bf16_native"] else [])
    for label, dtype in dtypes:
        variants[f"dense {label}"] = (copy.deepcopy(pruned), dtype)
        variants[f"dense {label} compiled"] = (torch.compile(copy.deepcopy(pruned)), dtype)
    optimizers = {k: torch.optim.SGD(v[0].parameters(), lr=0.01, momentum=0.9) for k, v in variants.items()}

    def step(name: str) -> None:
        model, dtype = variants[name]
        opt = optimizers[name]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for name in list(variants):  # compiles (the compiled ones), plans and tunes (ours)
        t = time.perf_counter()
        if name.endswith("compiled"):  # a compiled model computing something else is no rival
            model, dtype = variants[name]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(x)  # (with autograd: the graph the steps run)
                with torch.no_grad():
                    why = compiled_output_problem(out, model._orig_mod(x), dtype is not None)
            if why:
                print(f"{name}: not timed, {why}")
                del variants[name]
                continue
        step(name)
        step(name)
        if name.endswith("compiled"):
            print(f"{name}: compiled in {time.perf_counter() - t:.1f} s (its first two steps)")
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name in variants:
            t = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - t) / args.steps)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    dense = {k: v for k, v in ms.items() if k.startswith("dense")}
    best_eager = min((k for k in dense if not k.endswith("compiled")), key=dense.get)
    best = min(dense, key=dense.get)
    print(f"a training step of the main job's CNN, {args.sparsity:.0%} sparse, batch 128, "
          f"{args.rounds} rounds of {args.steps} steps, medians")  # fmt: skip
    print(f"{'variant':<30} {'ms':>7} {'x best eager dense':>18} {'x best dense':>13}")
    for k, v in ms.items():
        print(f"{k:<30} {v:7.1f} {ms[best_eager] / v:18.2f} {ms[best] / v:13.2f}")
    print(f"best eager dense: {best_eager}; best dense: {best}")


if __name__ == "__main__":
    main()
