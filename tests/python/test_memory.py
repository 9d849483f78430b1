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
    x = torch.randn(64, 256, requires_grad=True)
    b_f32, b_s8 = saved_activation_bytes(f32, x), saved_activation_bytes(s8, x)
    assert b_s8 <= 0.30 * b_f32, (b_s8, b_f32)
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
