"""The outlier-robust int8 scheme (OutlierQuantizedSparseLinear,
scheme "s8_outliers"): its error on activations with outlier channels, bit
for bit against its prototype, calibration, state and swapping."""

import pytest
import torch

import qsparseprop as q
from conftest import prune_random_


def _outlier_data(batch=256, k=512, n=256, fraction=0.01, factor=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g)
    channels = torch.randperm(k, generator=g)[: max(1, int(fraction * k))]
    x[:, channels] *= factor
    return x, torch.randn(batch, n, generator=g), channels


def _run(module, x, g):
    xx = x.clone().requires_grad_(True)
    y = module(xx)
    y.backward(g)
    return y.detach(), xx.grad, module.values.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_forward_and_input_gradient_within_2_percent_where_per_tensor_is_not():
    torch.manual_seed(0)
    dense = prune_random_(torch.nn.Linear(512, 256), 0.9)
    x, g, _ = _outlier_data()
    xd = x.clone().requires_grad_(True)
    yd = dense(xd)
    yd.backward(g)
    errors = {}
    for cls in (q.QuantizedSparseLinear, q.OutlierQuantizedSparseLinear):
        y, dx, _ = _run(cls.from_dense(dense), x, g)
        errors[cls.scheme] = (_rel(y, yd.detach()), _rel(dx, xd.grad))
    fwd, dx = errors["s8_outliers"]
    assert fwd <= 0.02 and dx <= 0.02, errors
    assert errors["s8"][0] > 0.05, f"the per-tensor scheme was expected to fail here: {errors}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.05])
def test_bit_for_bit_against_its_prototype(bias, fraction):
    dense = prune_random_(torch.nn.Linear(96, 40, bias=bias), 0.8)
    x, g, _ = _outlier_data(33, 96, 40, fraction=max(fraction, 0.01), seed=3)
    if not fraction:  # no outliers: the plain s8 scheme, one part
        x = torch.randn(33, 96)
    kern = q.OutlierQuantizedSparseLinear.from_dense(dense, seed=7)
    proto = q.PrototypeOutlierQuantizedSparseLinear.from_dense(dense, seed=7)
    for step in range(2):  # calibration, then a second step with its own rounding stream
        a, b = _run(kern, x, g), _run(proto, x, g)
        for u, v, what in zip(a, b, ("y", "dx", "dvalues"), strict=True):
            assert torch.equal(u, v), f"step {step}: {what}"
        kern.values.grad = proto.values.grad = None
    assert torch.equal(kern.outlier_idx, proto.outlier_idx)


def test_calibration_finds_the_outlier_channels_and_the_state_keeps_them():
    dense = prune_random_(torch.nn.Linear(200, 16), 0.7)
    x, _, channels = _outlier_data(64, 200, 16, fraction=0.02)
    layer = q.OutlierQuantizedSparseLinear.from_dense(dense)
    layer.train()(x)
    assert torch.equal(layer.outlier_idx, channels.sort().values)
    # The first batch calibrates in any mode: evaluation under no_grad too (a
    # user measures accuracy right after swapping); it used to refuse.
    for mode in ("eval", "no_grad"):
        other = q.OutlierQuantizedSparseLinear.from_dense(dense)
        if mode == "eval":
            y = other.eval()(x)
        else:
            with torch.no_grad():
                y = other(x)
        assert bool(other.outliers_set) and torch.equal(other.outlier_idx, layer.outlier_idx), mode
        assert torch.equal(y, layer.eval()(x)), mode
        layer.train()
    fresh = q.OutlierQuantizedSparseLinear.from_dense(dense)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.outlier_idx, layer.outlier_idx) and bool(fresh.outliers_set)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match="outlier channels must be in"):
        layer.set_outlier_channels([500])


def test_swap_with_the_outlier_scheme():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    for m in net:
        if isinstance(m, torch.nn.Linear):
            prune_random_(m, 0.9)
    swapped = q.swap_modules_with_sparse(net, (16, 64), verbose=False, min_speedup=0.0, scheme="s8_outliers")
    assert all(isinstance(swapped[i], q.OutlierQuantizedSparseLinear) for i in (0, 2))
    assert [r.scheme for r in swapped.qsparseprop_swap_report] == ["s8_outliers", "s8_outliers"]
    assert not bool(swapped[0].outliers_set), "timing noise must not calibrate it"
    x, _, _ = _outlier_data(16, 64, 8, fraction=0.05)
    swapped(x).sum().backward()
    assert bool(swapped[0].outliers_set) and swapped[0].outlier_idx.numel() > 0
