"""What keeping BatchNorm's input as int8 costs in accuracy (docs/quantization.md,
"BatchNorm's saved input"): Conv 3x3 -> BatchNorm2d -> ReLU with the
convolution swapped for the int8 one, unfused (torch's BatchNorm keeps its
fp32 input) and fused (the int8 copy), each against dense fp32 torch.

    .venv/bin/python benchmarks/batch_norm_int8_copy_error.py
"""

import copy

import torch
from torch import nn

import qsparseprop as q

SHAPES = [(32, 64, 16, 8, 0.9), (64, 64, 14, 16, 0.9), (16, 32, 14, 8, 0.8)]  # cin, cout, H=W, batch, sparsity


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _gradients(model: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_()
    model(x).backward(g)
    return x.grad, [p.grad for p in model.parameters()]


def main() -> None:
    torch.manual_seed(0)
    print("relative Frobenius error against dense fp32: input grad, weight grad, BatchNorm weight grad")
    for cin, cout, hw, batch, sparsity in SHAPES:
        conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        with torch.no_grad():  # magnitude pruning
            w = conv.weight.view(-1)
            w[w.abs().argsort()[: int(sparsity * w.numel())]] = 0
        dense = nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())
        x, g = torch.randn(batch, cin, hw, hw), torch.randn(batch, cout, hw, hw)
        ref_dx, (ref_dw, ref_dgamma, _) = _gradients(copy.deepcopy(dense), x, g)
        ref_dw = ref_dw[dense[0].weight != 0]  # the pattern's entries, in CSR order
        row = []
        for fused in (False, True):
            model = copy.deepcopy(dense)
            model[0] = q.QuantizedSparseConv2d.from_dense(model[0], seed=1)
            if fused:
                model = q.fuse(model)
            dx, (dv, dgamma, _) = _gradients(model, x, g)
            row.append(f"{_relative(dx, ref_dx):.2%} {_relative(dv, ref_dw):.2%} {_relative(dgamma, ref_dgamma):.2%}")
        print(f"{cin} -> {cout}, {batch} x {hw} x {hw}, {sparsity}: unfused {row[0]} | fused (int8 copy) {row[1]}")


if __name__ == "__main__":
    main()
