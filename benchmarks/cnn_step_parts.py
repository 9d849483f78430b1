"""Where the main job's training step goes, per primitive call.

    python benchmarks/cnn_step_parts.py [--scheme s8] [--sparsity 0.9] [--steps 10]

The default CNN of ``qsparseprop finetune`` (width 24, 28x28 images, batch
128), pruned by magnitude per layer and swapped as the tool swaps it
(fused), trained on random data with SGD: per step the median wall time,
then every primitive the step executes (direction, implementation, shape),
each with its kernel and pass time per step (medians over the steps, from
``QSP_VERBOSE=profile``'s lines), and the totals. What is not inside a
primitive (BatchNorm passes the convolutions do not take, torch, Python) is
the step less the primitives.
"""

import argparse
import collections
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import qsparseprop as q
from qsparseprop import finetune


def _steps_with_profile_lines(step, steps: int) -> list[str]:
    """The verbose lines of `steps` calls of step() (C++ prints them to
    stdout, fd 1: caught through a temporary file)."""
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(1)
        sys.stdout.flush()
        os.dup2(f.fileno(), 1)
        try:
            q.set_profiling(True)
            q.set_verbose(1)
            for _ in range(steps):
                step()
        finally:
            q.set_verbose(0)
            q.set_profiling(False)
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return [line for line in f.read().splitlines() if line.startswith("qsp_verbose,exec,")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", choices=("f32", "s8"), default="s8")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    torch.manual_seed(0)
    model = finetune.make_model("cnn", 28, 24)
    finetune.prune_model(model, a.sparsity, "layer")
    shape = (128, 1, 28, 28)
    with contextlib.redirect_stdout(io.StringIO()):
        model = q.swap_modules_with_sparse(model, shape, verbose=False, scheme=a.scheme, min_sparsity=0.0)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    lines = _steps_with_profile_lines(step, a.steps)
    calls = collections.defaultdict(list)  # (direction, implementation, shape) -> [(total, kernel, passes)]
    for line in lines:
        f = line.split(",")
        kernel, passes = float(f[-2].split("=")[1]), float(f[-1].split("=")[1])
        calls[(f[2].removeprefix("sparse_"), f[3], f[5])].append((float(f[-3]), kernel, passes))
    print(f"cnn, {a.scheme}, {a.sparsity:.0%} sparse, batch 128, isa={q.cpu_isa()}, threads={torch.get_num_threads()}")
    print(f"step (median of {a.steps}): {statistics.median(times):.1f} ms\n")
    print(f"{'primitive':26s}{'implementation':18s}{'shape':58s}{'calls':>6s}{'kernel':>8s}{'passes':>8s}")
    totals = [0.0, 0.0]
    for (direction, impl, shape_str), v in calls.items():
        per_step = len(v) / a.steps
        kernel = statistics.median(c[1] for c in v) * per_step
        passes = statistics.median(c[2] for c in v) * per_step
        totals[0] += kernel
        totals[1] += passes
        print(f"{direction:26s}{impl:18s}{shape_str[:57]:58s}{per_step:6.0f}{kernel:8.2f}{passes:8.2f}")
    print(f"\ninside the primitives: kernels {totals[0]:.1f} ms, passes {totals[1]:.1f} ms a step (ms per step)")


if __name__ == "__main__":
    main()
