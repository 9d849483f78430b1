"""Fine-tune demo: prune a small CNN to 90 % and fine-tune it dense, sparse-f32
and sparse-int8 on scikit-learn's bundled digits data (8x8 images, 10
classes; no download). Prints accuracy and time per epoch for each.

    python -m qsparseprop.demo            # the defaults
    python -m qsparseprop.demo --epochs 2 --sparsity 0.95 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import prune

from . import QuantizedSparseConv2d, QuantizedSparseLinear, SparseConv2d, SparseLinear, cpu_isa


def load_digits_tensors(seed: int = 0):
    """Train / test split (80 / 20) of sklearn's digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_epochs(model, x, y, epochs, lr, batch_size, seed) -> list[float]:
    """Trains in place; returns the seconds of each epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        t0 = time.perf_counter()
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times


def convert(model: nn.Sequential, quantize: bool) -> nn.Sequential:
    """Every (pruned) Linear / Conv2d becomes a sparse layer; the pruning masks define the patterns."""
    layers = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            layers.append((QuantizedSparseLinear if quantize else SparseLinear).from_dense(m, seed=i))
        elif isinstance(m, nn.Conv2d):
            layers.append((QuantizedSparseConv2d if quantize else SparseConv2d).from_dense(m, seed=i))
        else:
            layers.append(copy.deepcopy(m))
    return nn.Sequential(*layers)


def model_sparsity(model: nn.Module) -> float:
    total = zeros = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            total += m.weight.numel()
            zeros += (m.weight == 0).sum().item()
        elif isinstance(m, (SparseLinear, SparseConv2d)):
            total += m.weight.numel()
            zeros += m.weight.numel() - m.nnz
    return zeros / total


def run(
    epochs: int = 5,
    pretrain_epochs: int = 8,
    sparsity: float = 0.9,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[dict]:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_tensors(seed)
    dense = make_model()
    pre_times = train_epochs(dense, xtr, ytr, pretrain_epochs, lr, batch_size, seed)
    rows = [
        dict(
            variant="dense (unpruned)",
            sparsity=0.0,
            acc_before=None,
            acc_after=accuracy(dense, xte, yte),
            epoch_s=statistics.median(pre_times),
            epochs=pretrain_epochs,
        )
    ]

    pruned = copy.deepcopy(dense)
    for m in pruned.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(m, "weight", amount=sparsity)  # magnitude, per layer
    acc_pruned = accuracy(pruned, xte, yte)

    variants = [
        ("dense, masked (torch)", lambda: _masked_copy(pruned)),
        ("sparse f32 (qsparseprop)", lambda: convert(pruned, quantize=False)),
        ("sparse int8 (qsparseprop)", lambda: convert(pruned, quantize=True)),
    ]
    for name, make in variants:
        model = make()
        times = train_epochs(model, xtr, ytr, epochs, lr, batch_size, seed + 1)
        rows.append(
            dict(
                variant=name,
                sparsity=model_sparsity(model),
                acc_before=acc_pruned,
                acc_after=accuracy(model, xte, yte),
                epoch_s=statistics.median(times),
                epochs=epochs,
            )
        )
    return rows


def _masked_copy(pruned: nn.Module) -> nn.Module:
    # The dense baseline keeps torch's pruning hooks: weights stay masked.
    from .swap import _deepcopy_model

    return _deepcopy_model(pruned)


def format_table(rows: list[dict]) -> str:
    head = f"{'variant':<28} {'sparsity':>8} {'acc pruned':>10} {'acc after':>9} {'s/epoch':>8} {'epochs':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        before = "-" if r["acc_before"] is None else f"{r['acc_before']:.4f}"
        lines.append(
            f"{r['variant']:<28} {r['sparsity']:>8.3f} {before:>10} {r['acc_after']:>9.4f} "
            f"{r['epoch_s']:>8.3f} {r['epochs']:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="fine-tune epochs per variant (default 5)")
    p.add_argument("--pretrain-epochs", type=int, default=8, help="dense epochs before pruning (default 8)")
    p.add_argument("--sparsity", type=float, default=0.9, help="magnitude pruning per layer (default 0.9)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch / qsparseprop threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.pretrain_epochs < 1:
        p.error("--epochs and --pretrain-epochs must be >= 1")
    if not 0.0 <= a.sparsity < 1.0:
        p.error("--sparsity must be in [0, 1)")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(
        f"qsparseprop demo: digits (sklearn), CNN 2 conv + 2 linear, sparsity {a.sparsity}, "
        f"{torch.get_num_threads()} threads, kernels isa={cpu_isa()}"
    )
    rows = run(a.epochs, a.pretrain_epochs, a.sparsity, a.batch_size, seed=a.seed)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
