"""Pure-PyTorch emulation of the int8 layers (``prototype=True``).

Same numerics as the C++ kernels, bit for bit (see quantization.py), but
computed with dense torch operations: a tool for accuracy studies of the
scheme on any machine, not for speed. Bit for bit: outputs, input gradients
and weight gradients. The bias gradient is no int8 quantity in either: an
f32 sum of the output gradient, whose terms torch's ``sum`` and the kernels'
pass add in different orders, so it agrees within f32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import quantization as q
from .modules import QuantizedSparseConv2d, QuantizedSparseLinear, _batch_norm_after


def _gather(dense2d: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    rows = torch.repeat_interleave(torch.arange(dense2d.shape[0]), row_ptr.diff())
    return dense2d[rows, col_idx.long()]


class _PrototypeLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, w_dense, row_ptr, col_idx, seed):
        wq, sw = q.quantize_weight_rows(w_dense)
        xq, sx = q.quantize_rne(x)
        acc = (xq.double() @ wq.double().t()).float()
        y = acc * (sx * sw)
        y = y + (bias if bias is not None else 0.0)
        ctx.save_for_backward(xq, sx, wq, sw, row_ptr, col_idx)
        ctx.seed, ctx.has_bias = seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        xq, sx, wq, sw, row_ptr, col_idx = ctx.saved_tensors
        key_dw, key_dx = q.gradient_keys(ctx.seed)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            g2, sg2 = q.quantize_stochastic(gy, key_dx, sw)
            dx = (g2.double() @ wq.double()).float() * sg2
        if ctx.needs_input_grad[1]:
            g1, sg1 = q.quantize_stochastic(gy, key_dw)
            dw = (g1.double().t() @ xq.double()).float() * (sg1 * sx)
            dv = _gather(dw, row_ptr, col_idx)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum(0)
        return dx, dv, db, None, None, None, None


class _PrototypeConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, w_dense, row_ptr, col_idx, seed, pads, stride, dilation, groups):
        wq, sw = q.quantize_weight_rows(w_dense)
        xq, sx = q.quantize_rne(x)
        top, left, bottom, right = pads
        xpad = F.pad(xq.double(), (left, right, top, bottom))
        acc = F.conv2d(xpad, wq.double(), None, stride, 0, dilation, groups).float()
        y = acc * (sx * sw).reshape(1, -1, 1, 1)
        y = y + (bias.reshape(1, -1, 1, 1) if bias is not None else 0.0)
        ctx.save_for_backward(xq, sx, wq, sw, row_ptr, col_idx)
        ctx.conf = (seed, pads, stride, dilation, groups, bias is not None, xpad.shape)
        return y

    @staticmethod
    def backward(ctx, gy):
        xq, sx, wq, sw, row_ptr, col_idx = ctx.saved_tensors
        seed, (top, left, bottom, right), stride, dilation, groups, has_bias, pad_shape = ctx.conf
        key_dw, key_dx = q.gradient_keys(seed)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            g2, sg2 = q.quantize_stochastic(gy, key_dx, sw)
            dxp = torch.nn.grad.conv2d_input(pad_shape, wq.double(), g2.double(), stride, 0, dilation, groups)
            dx = dxp[:, :, top : pad_shape[2] - bottom, left : pad_shape[3] - right].float() * sg2
        if ctx.needs_input_grad[1]:
            g1, sg1 = q.quantize_stochastic(gy, key_dw)
            xpad = F.pad(xq.double(), (left, right, top, bottom))
            dw = torch.nn.grad.conv2d_weight(xpad, wq.shape, g1.double(), stride, 0, dilation, groups)
            dv = _gather(dw.float().reshape(wq.shape[0], -1) * (sg1 * sx), row_ptr, col_idx)
        if has_bias and ctx.needs_input_grad[2]:
            db = gy.sum((0, 2, 3))
        return dx, dv, db, None, None, None, None, None, None, None, None


class _PrototypeBatchNormS8Fn(torch.autograd.Function):
    """BatchNorm2d (+ ReLU) with batch statistics keeping y's int8 copy, as
    ``qsp::batch_norm_relu_forward/backward`` compute it: statistics in
    double rounded once, z = y * scale + shift, per channel centered =
    round((y - mean) * inv) over the scheme's step of max |y - mean|; the
    backward reads y - mean as centered * step. A residual is added to z
    before the ReLU; its gradient is the masked incoming one."""

    @staticmethod
    def forward(ctx, y, weight, bias, eps, relu, residual):
        c = y.shape[1]
        yd = y.double()
        mean_d = yd.mean((0, 2, 3))
        var_d = (yd - mean_d.view(1, c, 1, 1)).square().mean((0, 2, 3))
        mean, invstd = mean_d.float(), (1.0 / torch.sqrt(var_d + eps)).float()
        scale = invstd * (weight if weight is not None else 1.0)
        shift = (bias if bias is not None else 0.0) - mean * scale
        z = y * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
        if residual is not None:
            z = z + residual
        mask = ~(z <= 0) if relu else None
        if relu:
            z = torch.where(mask, z, z.new_zeros(()))
        centered_f = y - mean.view(1, c, 1, 1)
        step, inv = q._scale_of(q._abs_max(centered_f.transpose(0, 1).reshape(c, -1), dim=1))
        centered = torch.round(centered_f * inv.view(1, c, 1, 1)).clamp_(-q.QUANT_MAX, q.QUANT_MAX)
        # a channel without a usable step (NaN, or all values equal) keeps zeros
        centered = torch.where(inv.view(1, c, 1, 1) != 0, centered, centered.new_zeros(()))
        ctx.save_for_backward(centered.to(torch.int8), step, invstd, weight, mask)
        ctx.relu, ctx.has_residual = relu, residual is not None
        var = var_d.float()
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    def backward(ctx, gz, *_):
        centered, step, invstd, weight, mask = ctx.saved_tensors
        c = gz.shape[1]
        g = torch.where(mask, gz, gz.new_zeros(())) if ctx.relu else gz
        xc = centered.float() * step.view(1, c, 1, 1)
        sum_g = g.double().sum((0, 2, 3))
        dot = (g.double() * xc.double()).sum((0, 2, 3))
        count = g.numel() // c
        w = weight if weight is not None else torch.ones_like(invstd)
        a = invstd * w
        inv = invstd.double()
        b = (-dot * inv * inv / count * a.double()).float()
        k = (-sum_g / count * a.double()).float()
        dy = g * a.view(1, c, 1, 1) + xc * b.view(1, c, 1, 1) + k.view(1, c, 1, 1)
        affine = weight is not None
        dw = (dot * inv).float() if affine and ctx.needs_input_grad[1] else None
        db = sum_g.float() if affine and ctx.needs_input_grad[2] else None
        dres = g if ctx.has_residual and ctx.needs_input_grad[5] else None
        return dy, dw, db, None, None, dres


def _prototype_batch_norm_relu(
    y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8, residual=None, known=None
):
    """The prototype's (z, mean, var) of ``_ops.batch_norm_relu``: the int8
    copy with batch statistics, torch's own arithmetic otherwise (its
    statistics always from y in double: known, what the convolution took,
    is not read)."""
    if batch_statistics and keep_s8:
        return _PrototypeBatchNormS8Fn.apply(y, weight, bias, float(eps), bool(relu), residual)
    z = F.batch_norm(y, running_mean, running_var, weight, bias, batch_statistics, 0.0, eps)
    if residual is not None:
        z = z + residual
    return (torch.relu(z) if relu else z), running_mean, y.new_empty(0)


class PrototypeQuantizedSparseLinear(QuantizedSparseLinear):
    """``QuantizedSparseLinear`` numerics in pure PyTorch (no C++ kernels)."""

    prototype = True

    def _compute(self, x2: torch.Tensor) -> torch.Tensor:
        return _PrototypeLinearFn.apply(
            x2,
            self.values,
            self.bias,
            self._dense_weight_2d().detach(),
            self.row_ptr,
            self.col_idx,
            int(self._next_seed()),
        )


class PrototypeQuantizedSparseConv2d(QuantizedSparseConv2d):
    """``QuantizedSparseConv2d`` numerics in pure PyTorch (no C++ kernels)."""

    prototype = True

    def _batch_norm(self, bn, y: torch.Tensor, residual: torch.Tensor | None = None, known=None) -> torch.Tensor:
        relu = self.fused_relu or residual is not None
        return _batch_norm_after(bn, y, relu, keep_s8=True, chain=_prototype_batch_norm_relu, residual=residual)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return _PrototypeConv2dFn.apply(
            x,
            self.values,
            self.bias,
            self.weight.detach(),
            self.row_ptr,
            self.col_idx,
            int(self._next_seed()),
            self._pads,
            self._kernel_stride(),
            self.dilation,
            self.groups,
        )
