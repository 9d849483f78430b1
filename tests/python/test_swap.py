"""swap_modules_with_sparse on a small CNN + MLP."""

import torch
from torch import nn
from torch.nn.utils import prune

from qsparseprop import (
    PrototypeQuantizedSparseConv2d,
    QuantizedSparseConv2d,
    QuantizedSparseLinear,
    SparseConv2d,
    SparseLinear,
    swap_modules_with_sparse,
)


def _model(sparsity=0.9):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    for mod in m:
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(mod, "weight", amount=sparsity)
    return m


def test_swap_f32_keeps_outputs_and_reports(capsys):
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    want = model(x)
    out = swap_modules_with_sparse(model, (4, 3, 8, 8), quantize=False, min_speedup=0.0, repeats=2, warmup=1)
    assert out is model
    assert [type(model[i]) for i in (0, 2, 5, 7)] == [SparseConv2d, SparseConv2d, SparseLinear, SparseLinear]
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    table = capsys.readouterr().out
    assert "dense ms" in table and "swap" in table and "(4, 256)" in table


def test_swap_int8_within_error_and_not_inplace():
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    want = model(x)
    out = swap_modules_with_sparse(model, (4, 3, 8, 8), inplace=False, verbose=False, min_speedup=0.0, repeats=1)
    assert out is not model and isinstance(model[0], nn.Conv2d)
    assert isinstance(out[0], QuantizedSparseConv2d) and isinstance(out[7], QuantizedSparseLinear)
    err = ((out(x) - want).norm() / want.norm()).item()
    assert err < 0.05


def test_min_sparsity_and_min_speedup_are_respected():
    model = _model(sparsity=0.5)
    swap_modules_with_sparse(model, (2, 3, 8, 8), verbose=False, min_speedup=0.0, repeats=1)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model)
    report = model.qsparseprop_swap_report
    assert all(not r.swapped and "min_sparsity" in r.reason for r in report)

    model = _model(sparsity=0.9)
    swap_modules_with_sparse(model, (2, 3, 8, 8), verbose=False, min_speedup=1e9, repeats=1)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model)
    assert all(r.dense_ms > 0 and r.sparse_ms > 0 for r in model.qsparseprop_swap_report)


def test_prototype_swap():
    model = _model()
    swap_modules_with_sparse(model, (2, 3, 8, 8), verbose=False, prototype=True)
    assert isinstance(model[0], PrototypeQuantizedSparseConv2d)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
