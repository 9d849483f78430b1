"""torch.library custom ops over the C++ primitives, with autograd.

Each layer owns a C++ kernel object (its pattern and cached primitives);
ops find it by an integer id, so the op schemas hold only tensors and
scalars (``torch.compile`` and ``gradcheck`` work on them). Saved for
backward: the f32 input (f32) or the int8 workspace (s8: a quarter of the
memory).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import torch

from . import _C

_registry: dict[int, Any] = {}
_registry_lock = threading.Lock()
_next_id = itertools.count(1)


def register_kernel(owner: object, kernel: Any) -> int:
    """Registers ``kernel`` for as long as ``owner`` lives; returns its id."""
    kid = next(_next_id)
    with _registry_lock:
        _registry[kid] = kernel
    weakref.finalize(owner, _registry.pop, kid, None)
    return kid


def unregister_kernel(kid: int) -> None:
    with _registry_lock:
        _registry.pop(kid, None)


def kernel_of(kid: int) -> Any:
    try:
        return _registry[kid]
    except KeyError:
        raise ValueError(f"qsparseprop kernel id {kid} is not registered (its layer was freed)") from None


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().numpy()


def _empty(dtype=torch.float32) -> torch.Tensor:
    return torch.empty(0, dtype=dtype)


def _threads() -> int:
    return torch.get_num_threads()


# ---- Linear -------------------------------------------------------------------


def _forward_impl(x, values, bias, kid):
    # One call into C++: it allocates y and the workspace (the int8 input
    # saved for backward by s8 training; empty otherwise).
    y, ws = kernel_of(kid).forward(_np(x), _np(values), _np(bias), _threads())
    return torch.from_numpy(y), torch.from_numpy(ws)


_linear_forward_impl = _forward_impl


@torch.library.custom_op("qsparseprop::linear_forward", mutates_args=())
def linear_forward(
    x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, kid: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x @ W.T + bias for a 2-D contiguous float32 x; returns (y, workspace)."""
    return _linear_forward_impl(x, values, bias, kid)


@linear_forward.register_fake
def _(x, values, bias, kid, seed):
    k = kernel_of(kid)
    return x.new_empty(x.shape[0], k.out_features), x.new_empty(0, dtype=torch.uint8)


def _linear_backward_impl(grad_y, x, workspace, values, kid, seed, need_input_grad, need_values_grad, need_bias_grad):
    k = kernel_of(kid)
    dx, dv, db = _empty(), _empty(), _empty()
    if need_input_grad:
        dx = torch.from_numpy(k.backward_data(_np(grad_y), _np(values), seed, _threads()))
    if need_values_grad or need_bias_grad:
        dv = torch.empty_like(values)
        db = torch.empty(k.out_features, dtype=torch.float32) if k.with_bias else _empty()
        k.backward_weights(
            _np(x) if x.numel() or k.scheme == "f32" else None,
            _np(workspace) if workspace.numel() else None,
            _np(grad_y),
            dv.detach().numpy(),
            db.numpy() if k.with_bias else None,
            seed,
            _threads(),
        )
    return dx, dv, db


@torch.library.custom_op("qsparseprop::linear_backward", mutates_args=())
def linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    workspace: torch.Tensor,
    values: torch.Tensor,
    kid: int,
    seed: int,
    need_input_grad: bool,
    need_values_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_backward_impl(
        grad_y, x, workspace, values, kid, seed, need_input_grad, need_values_grad, need_bias_grad
    )


@linear_backward.register_fake
def _(grad_y, x, workspace, values, kid, seed, need_input_grad, need_values_grad, need_bias_grad):
    k = kernel_of(kid)
    dx = grad_y.new_empty(grad_y.shape[0], k.in_features) if need_input_grad else grad_y.new_empty(0)
    dv = values.new_empty(values.shape) if (need_values_grad or need_bias_grad) else values.new_empty(0)
    db = (
        grad_y.new_empty(k.out_features)
        if k.with_bias and (need_values_grad or need_bias_grad)
        else grad_y.new_empty(0)
    )
    return dx, dv, db


def _save_for_backward(ctx, x, ws, values, bias, kid, seed):
    # s8 keeps only the int8 workspace; f32 keeps the input.
    k = kernel_of(kid)
    ctx.save_for_backward(x if k.scheme == "f32" else _empty(), ws, values)
    ctx.kid, ctx.seed, ctx.has_bias, ctx.input_shape = kid, seed, bias is not None, list(x.shape)


def _input_grads(ctx, grad_y, backward, *extra):
    """(dx, dvalues, dbias, None, None) from `backward` (the op or its body)."""
    x, ws, values = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_db = ctx.has_bias and need[2]
    dx, dv, db = backward(grad_y.contiguous(), x, ws, values, *extra, ctx.kid, ctx.seed, need[0], need[1], want_db)
    return (dx if need[0] else None, dv if need[1] else None, db if want_db else None, None, None)


def _linear_setup(ctx, inputs, output):
    x, values, bias, kid, seed = inputs
    _save_for_backward(ctx, x, output[1], values, bias, kid, seed)


def _linear_backward(ctx, grad_y, grad_ws):
    return _input_grads(ctx, grad_y, linear_backward)


torch.library.register_autograd("qsparseprop::linear_forward", _linear_backward, setup_context=_linear_setup)


# ---- Conv2d -------------------------------------------------------------------


_conv2d_forward_impl = _forward_impl


@torch.library.custom_op("qsparseprop::conv2d_forward", mutates_args=())
def conv2d_forward(
    x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, kid: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse conv2d of a 4-D contiguous float32 NCHW x; returns (y, workspace)."""
    return _conv2d_forward_impl(x, values, bias, kid)


@conv2d_forward.register_fake
def _(x, values, bias, kid, seed):
    k = kernel_of(kid)
    oh, ow = k.output_hw(x.shape[2], x.shape[3])
    return x.new_empty(x.shape[0], k.out_channels, oh, ow), x.new_empty(0, dtype=torch.uint8)


def _conv2d_backward_impl(
    grad_y, x, workspace, values, input_shape, kid, seed, need_input_grad, need_values_grad, need_bias_grad
):
    k = kernel_of(kid)
    dx, dv, db = _empty(), _empty(), _empty()
    if need_input_grad:
        dx = torch.from_numpy(k.backward_data(_np(grad_y), _np(values), list(input_shape), seed, _threads()))
    if need_values_grad or need_bias_grad:
        dv = torch.empty_like(values)
        db = torch.empty(k.out_channels, dtype=torch.float32) if k.with_bias else _empty()
        k.backward_weights(
            _np(x) if k.scheme == "f32" else None,
            _np(workspace) if workspace.numel() else None,
            _np(grad_y),
            dv.detach().numpy(),
            db.numpy() if k.with_bias else None,
            list(input_shape),
            seed,
            _threads(),
        )
    return dx, dv, db


@torch.library.custom_op("qsparseprop::conv2d_backward", mutates_args=())
def conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    workspace: torch.Tensor,
    values: torch.Tensor,
    input_shape: list[int],
    kid: int,
    seed: int,
    need_input_grad: bool,
    need_values_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _conv2d_backward_impl(
        grad_y, x, workspace, values, input_shape, kid, seed, need_input_grad, need_values_grad, need_bias_grad
    )


@conv2d_backward.register_fake
def _(grad_y, x, workspace, values, input_shape, kid, seed, need_input_grad, need_values_grad, need_bias_grad):
    k = kernel_of(kid)
    need_w = need_values_grad or need_bias_grad
    dx = grad_y.new_empty(input_shape) if need_input_grad else grad_y.new_empty(0)
    dv = values.new_empty(values.shape) if need_w else values.new_empty(0)
    db = grad_y.new_empty(k.out_channels) if k.with_bias and need_w else grad_y.new_empty(0)
    return dx, dv, db


def _conv_setup(ctx, inputs, output):
    x, values, bias, kid, seed = inputs
    _save_for_backward(ctx, x, output[1], values, bias, kid, seed)


def _conv_backward(ctx, grad_y, grad_ws):
    return _input_grads(ctx, grad_y, conv2d_backward, ctx.input_shape)


torch.library.register_autograd("qsparseprop::conv2d_forward", _conv_backward, setup_context=_conv_setup)


# ---- eager fast path --------------------------------------------------------------
#
# The custom ops are what torch.compile traces; in eager mode an
# autograd.Function calls the same bodies without the dispatcher's
# per-call cost (about 0.1 ms per forward+backward, a quarter of a small
# layer's step).


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, kid, seed):
        y, ws = _linear_forward_impl(x, values, bias, kid)
        _save_for_backward(ctx, x, ws, values, bias, kid, seed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _input_grads(ctx, grad_y, _linear_backward_impl)


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, kid, seed):
        y, ws = _conv2d_forward_impl(x, values, bias, kid)
        _save_for_backward(ctx, x, ws, values, bias, kid, seed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _input_grads(ctx, grad_y, _conv2d_backward_impl, ctx.input_shape)


def linear(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, kid: int, seed: int) -> torch.Tensor:
    """Sparse linear with autograd: the custom op under torch.compile, the eager fast path otherwise."""
    if torch.compiler.is_compiling():
        return linear_forward(x, values, bias, kid, seed)[0]
    return _LinearFunction.apply(x, values, bias, kid, seed)


def conv2d(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, kid: int, seed: int) -> torch.Tensor:
    """Sparse conv2d with autograd: the custom op under torch.compile, the eager fast path otherwise."""
    if torch.compiler.is_compiling():
        return conv2d_forward(x, values, bias, kid, seed)[0]
    return _Conv2dFunction.apply(x, values, bias, kid, seed)


def make_linear_kernel(in_features, out_features, row_ptr, col_idx, scheme, with_bias):
    k = _C.LinearKernel(in_features, out_features, _np(row_ptr), _np(col_idx), scheme, with_bias)
    return _KernelHandle(k, in_features=in_features, out_features=out_features, with_bias=with_bias)


def make_conv2d_kernel(
    in_channels,
    out_channels,
    kernel_size,
    stride,
    padding,
    dilation,
    groups,
    row_ptr,
    col_idx,
    scheme,
    with_bias,
    vectorization="any",
):
    k = _C.Conv2dKernel(
        in_channels,
        out_channels,
        list(kernel_size),
        list(stride),
        list(padding),
        list(dilation),
        groups,
        _np(row_ptr),
        _np(col_idx),
        scheme,
        with_bias,
        vectorization,
    )
    return _KernelHandle(k, in_channels=in_channels, out_channels=out_channels, with_bias=with_bias)


class _KernelHandle:
    """The C++ kernel plus the facts the ops need about the layer."""

    def __init__(self, kernel, **facts):
        self._k = kernel
        self.__dict__.update(facts)
        self.scheme = kernel.scheme

    def __getattr__(self, name):
        return getattr(self._k, name)
