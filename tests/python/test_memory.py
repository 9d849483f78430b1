"""The int8 scheme's memory promise: a Linear -> ReLU stack saves its
activations as int8 copies (and one bit per ReLU output), not fp32."""

import torch
from torch import nn
from torch.nn.utils import prune

import qsparseprop as q
from qsparseprop.memory import saved_activation_bytes


def _stack():
    torch.manual_seed(0)
    m = nn.Sequential(*[layer for _ in range(3) for layer in (nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 10))
    for layer in m:
        if isinstance(layer, nn.Linear):
            prune.l1_unstructured(layer, "weight", amount=0.9)
    return m


def _swap(m, **kw):
    return q.swap_modules_with_sparse(m, (64, 256), inplace=False, verbose=False, min_speedup=0.0, **kw)


def test_int8_saves_activations_at_under_30_percent_of_fp32_sparse():
    m = _stack()
    f32 = _swap(m, quantize=False, fuse_relu=False)
    s8 = _swap(m)

    def saved(model, batch):
        return saved_activation_bytes(model, torch.randn(batch, 256, requires_grad=True))

    # What grows with the batch (the activations): int8 copies and ReLU bits.
    f32_per_64 = saved(f32, 128) - saved(f32, 64)
    s8_per_64 = saved(s8, 128) - saved(s8, 64)
    assert s8_per_64 <= 0.30 * f32_per_64, (s8_per_64, f32_per_64)
    # What does not: each s8 layer's workspace also keeps the step's int8
    # weights and their scales (backward-data reads them instead of
    # quantizing the weights again), at most nnz + 4 * out + 2 cache lines.
    linears = [layer for layer in s8 if isinstance(layer, q.SparseLinear)]
    weight_copies = sum(lay.values.numel() + 4 * lay.out_features + 128 for lay in linears)
    fixed = saved(s8, 64) - s8_per_64
    assert 0 < fixed <= weight_copies, (fixed, weight_copies)
    assert sum(isinstance(layer, q.FusedReLU) for layer in s8) == 3


def test_a_fused_relu_computes_what_nn_relu_does():
    m = _stack()
    plain, fused = _swap(m, quantize=False, fuse_relu=False), _swap(m, quantize=False)
    assert all(fused[i].fused_relu for i in (0, 2, 4)) and not fused[6].fused_relu
    x = torch.randn(64, 256)
    x[0, :5] = 0.0
    outs = []
    for model in (plain, fused):
        xx = x.clone().requires_grad_(True)
        y = model(xx)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xx.grad, [p.grad for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2], strict=True):
        assert torch.equal(a, b)
    dense = q.to_dense(fused)
    assert [type(layer).__name__ for layer in dense] == [type(layer).__name__ for layer in m]
    torch.testing.assert_close(dense(x), fused(x))
