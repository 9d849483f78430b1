"""Cold vs warm persistent cache: converting and deciding a whole model.

    python -m qsparseprop.bench_cache                 # resnet18-sized CNN and a 6-layer encoder
    python -m qsparseprop.bench_cache --models encoder --json out.json

Each phase runs in a fresh process (nothing shared in memory): "cold" with
an empty cache directory, "warm" with the one the cold run filled. A phase
prunes the model to 90 % (per layer, magnitude of a seeded init), swaps it
to int8 (``swap_modules_with_sparse`` with its default repeats: timings, or
the cache's) and runs one training step (kernel generation and tuning, or
the cache's decisions); the time of a second, steady step is subtracted,
so what is compared is the cost of converting and deciding. Printed: seconds per phase, the ratio, whether both made the
same decisions, and the warm first-call cost per layer (generating its
kernels from the stored decisions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from copy import deepcopy

import torch
from torch import nn
from torch.nn.utils import prune

MODELS = ("resnet18", "encoder")


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.down(x))


def resnet18() -> nn.Module:
    """ResNet-18's layers (torchvision's topology, 11.7 M parameters)."""
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1), *layers,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000),
    )  # fmt: skip


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)


def _model_and_shape(name: str):
    torch.manual_seed(0)
    if name == "resnet18":
        m, shape = resnet18(), (16, 3, 112, 112)
    else:
        m, shape = encoder(), (16, 64, 384)
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.numel() >= 4096:
            prune.l1_unstructured(mod, "weight", amount=0.9)
            prune.remove(mod, "weight")
    return m.train(), shape


def _phase(name: str) -> dict:
    """One process's conversion and first step (the cache dir comes from the
    environment)."""
    from . import _C
    from .modules import _SparseModule
    from .swap import swap_modules_with_sparse
    from .warmup import implementations

    model, shape = _model_and_shape(name)
    x = torch.randn(shape)
    t0 = time.perf_counter()
    model = swap_modules_with_sparse(model, shape, scheme="s8", verbose=False)  # default repeats, as users call it
    t_swap = time.perf_counter() - t0
    model(x).float().square().mean().backward()  # kernels built, tuner decides (or reads)
    t_total = time.perf_counter() - t0
    t = time.perf_counter()
    model(x).float().square().mean().backward()  # a steady step: what the first one cost beyond it is deciding
    t_step = time.perf_counter() - t
    impls, first_ms = {}, {}
    sparse = [(n, m) for n, m in model.named_modules() if isinstance(m, _SparseModule)]
    # the first call of each layer alone, from the stored decisions: generation + plans
    _C.clear_caches()
    _C.clear_tuning_decisions()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, a[0].detach())) for n, m in sparse]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for n, m in sparse:
        copy = deepcopy(m)  # a cache slot of its own: its kernels are built on first use
        xi = inputs[n].clone().requires_grad_()
        t = time.perf_counter()
        copy(xi).sum().backward()
        first = time.perf_counter() - t
        t = time.perf_counter()
        copy(xi).sum().backward()
        first_ms[n] = 1e3 * (first - (time.perf_counter() - t))
        impls[n] = implementations(copy, xi.shape, torch.get_num_threads())
    return dict(
        swap_s=t_swap, total_s=t_total - t_step, step_s=t_step,
        swapped=[r.name for r in model.qsparseprop_swap_report if r.swapped], implementations=impls,
        first_call_ms=first_ms,
    )  # fmt: skip


def _run_phase(name: str, cache: str) -> dict:
    env = dict(os.environ, QSP_CACHE_DIR=cache)
    out = subprocess.run(
        [sys.executable, "-m", "qsparseprop.bench_cache", "--phase", name], env=env, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--phase", choices=MODELS, help=argparse.SUPPRESS)  # internal: one phase, JSON out
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.phase:
        print(json.dumps(_phase(a.phase)))
        return
    from . import _C
    from .bench import machine

    models = [m.strip() for m in a.models.split(",")]
    if any(m not in MODELS for m in models):
        p.error(f"--models takes {', '.join(MODELS)}")
    m = machine()
    print(f"qsparseprop {_C.version()} bench_cache: cpu={m['cpu']!r} amx={'yes' if m['amx'] else 'no'} "
          f"threads={torch.get_num_threads()} isa={_C.effective_cpu_isa()}", flush=True)  # fmt: skip
    rows = []
    for name in models:
        with tempfile.TemporaryDirectory() as tmp:
            cache = os.path.join(tmp, "cache")
            cold = _run_phase(name, cache)
            warm = _run_phase(name, cache)
        same = cold["swapped"] == warm["swapped"] and cold["implementations"] == warm["implementations"]
        gen = list(warm["first_call_ms"].values())
        row = dict(
            model=name, layers=len(gen), cold_s=cold["total_s"], warm_s=warm["total_s"],
            ratio=cold["total_s"] / warm["total_s"], cold_swap_s=cold["swap_s"], warm_swap_s=warm["swap_s"],
            same_decisions=same, first_call_ms_mean=sum(gen) / max(len(gen), 1), first_call_ms_max=max(gen, default=0),
        )  # fmt: skip
        rows.append(row)
        print(f"{name:<9} {row['layers']:>3} sparse layers: cold {row['cold_s']:.2f} s (swap {row['cold_swap_s']:.2f})"
              f", warm {row['warm_s']:.2f} s (swap {row['warm_swap_s']:.2f}): {row['ratio']:.1f}x; same decisions: "
              f"{same}; warm first call per layer (generation + plans) mean {row['first_call_ms_mean']:.1f} ms, "
              f"max {row['first_call_ms_max']:.1f} ms", flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
