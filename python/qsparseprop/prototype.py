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
from .modules import QuantizedSparseConv2d, QuantizedSparseLinear


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
        seed_dw, seed_dx = q.gradient_seeds(ctx.seed)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            g2, sg2 = q.quantize_stochastic(gy, seed_dx, sw)
            dx = (g2.double() @ wq.double()).float() * sg2
        if ctx.needs_input_grad[1]:
            g1, sg1 = q.quantize_stochastic(gy, seed_dw)
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
        seed_dw, seed_dx = q.gradient_seeds(seed)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            g2, sg2 = q.quantize_stochastic(gy, seed_dx, sw)
            dxp = torch.nn.grad.conv2d_input(pad_shape, wq.double(), g2.double(), stride, 0, dilation, groups)
            dx = dxp[:, :, top : pad_shape[2] - bottom, left : pad_shape[3] - right].float() * sg2
        if ctx.needs_input_grad[1]:
            g1, sg1 = q.quantize_stochastic(gy, seed_dw)
            xpad = F.pad(xq.double(), (left, right, top, bottom))
            dw = torch.nn.grad.conv2d_weight(xpad, wq.shape, g1.double(), stride, 0, dilation, groups)
            dv = _gather(dw.float().reshape(wq.shape[0], -1) * (sg1 * sx), row_ptr, col_idx)
        if has_bias and ctx.needs_input_grad[2]:
            db = gy.sum((0, 2, 3))
        return dx, dv, db, None, None, None, None, None, None, None, None


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
            self.stride,
            self.dilation,
            self.groups,
        )
