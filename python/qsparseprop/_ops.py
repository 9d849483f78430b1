"""torch.library custom ops over the C++ primitives, with autograd.

Every op receives what defines its layer: the pattern (``row_ptr``,
``col_idx``), the shapes and geometry as ints, the scheme, and the step's
rounding seed as a tensor. The C++ kernel object (the pattern's copy and
the cached primitives) is only a cache behind the op, in the slot named by
the layer's ``handle`` (a one-element int64 tensor buffer): built on first
use under a lock (first calls from several threads build it once), keyed by
the geometry, and compared with the pattern buffers on every call (a
memcmp), so a pattern edited in place (``.data[...]``, ``.numpy()``) is
picked up instead of silently ignored. No Python int names a layer in a
graph and no step counter lives in Python: ``torch.compile`` and
``torch.export`` see tensors and constants only.

Saved for backward: the f32 input (f32) or the int8 workspace (s8: the
quantized input, a quarter of the memory, and the quantized weights, which
backward-data reads instead of quantizing the weights again).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
import time
import weakref
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import _C

# ---- the kernel cache ---------------------------------------------------------

_cache: dict[int, tuple[tuple, Any]] = {}
_cache_lock = threading.Lock()
_next_slot = itertools.count(1)


def new_handle(owner: object) -> torch.Tensor:
    """A cache slot for ``owner``'s kernel, emptied when ``owner`` is freed."""
    slot = next(_next_slot)
    weakref.finalize(owner, _cache.pop, slot, None)
    return torch.tensor([slot], dtype=torch.int64, device="cpu")  # (also under a torch.device("meta") block)


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().numpy()


def _empty(dtype=torch.float32) -> torch.Tensor:
    return torch.empty(0, dtype=dtype)


def transformed() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active.
    It follows torch's ops and the autograd.Functions written for it only:
    the library then runs unfused, as torch's modules would, each sparse
    layer through _SparseFunctionForTransforms. False while torch.compile
    traces (it cannot follow the query; it takes the custom ops)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def traced() -> bool:
    """Whether torch.compile is tracing or a torch.func transform is active:
    neither can follow the eager fast paths' autograd.Functions (state on
    their ctx, kernels called on numpy views)."""
    return torch.compiler.is_compiling() or transformed()


def _threads() -> int:
    """The team size for the next primitive call: torch's, or 1 while other
    processes keep every core busy (see _contended). Results do not depend
    on it (the kernels' sums and rounding streams are thread-count
    independent, the s8 workspace has one layout, and on a smaller team a
    layer runs a shape with its larger team's implementations), so forward
    and backward may differ."""
    n = torch.get_num_threads()
    return 1 if n > 1 and _contended(n) else n


# Under a competing load, an OpenMP team's threads wait for each other at
# every region's end; on taken cores each wait can cost a scheduler quantum,
# and one of our steps crosses many regions (packs, kernels, reductions):
# measured, 4 busy processes on 2 cores made a 2-thread int8 step 33x slower,
# a 1-thread one 13x (dense torch: 15x). So while the other processes'
# runnable threads alone fill twice the cores, we run on one thread.
# QSP_ADAPT_THREADS=0 turns this off.
_ADAPT = os.environ.get("QSP_ADAPT_THREADS", "1") != "0"
_CONTENTION = {"checked": -1.0, "busy": False}
try:
    _CPUS = len(os.sched_getaffinity(0))
except (AttributeError, OSError):  # pragma: no cover - not Linux
    _CPUS = os.cpu_count() or 1


def _runnable_threads() -> int | None:
    """Threads runnable on the whole machine now (/proc/loadavg), or None."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _contended(team: int) -> bool:
    if not _ADAPT:
        return False
    now = time.monotonic()
    if now - _CONTENTION["checked"] > 0.25:  # /proc read at most 4 times a second
        _CONTENTION["checked"] = now
        running = _runnable_threads()
        # our own team may be spinning (counted as running): the rest is the others'
        _CONTENTION["busy"] = running is not None and running - team >= 2 * _CPUS
    return _CONTENTION["busy"]


def _build(key: tuple, rp, ci):
    op, spec, scheme, has_bias, vectorization = key
    if op == "linear":
        k = _C.LinearKernel(spec[0], spec[1], rp, ci, scheme, has_bias)
        return _KernelHandle(k, in_features=spec[0], out_features=spec[1], with_bias=has_bias)
    ic, oc, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups = spec
    k = _C.Conv2dKernel(
        ic, oc, [kh, kw], [sh, sw], [pt, pl, pb, pr], [dh, dw], groups, rp, ci, scheme, has_bias, vectorization
    )
    return _KernelHandle(k, in_channels=ic, out_channels=oc, with_bias=has_bias)


def kernel_for(handle: torch.Tensor, key: tuple, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> Any:
    """The C++ kernel of the layer in slot ``handle``: the cached one when it
    was built for ``key`` and holds exactly this pattern, else a new one."""
    slot = int(handle[0])
    rp, ci = _np(row_ptr), _np(col_idx)
    entry = _cache.get(slot)
    if entry is None or entry[0] != key or not entry[1].same_pattern(rp, ci):
        with _cache_lock:
            entry = _cache.get(slot)
            if entry is None or entry[0] != key or not entry[1].same_pattern(rp, ci):
                try:
                    built = _build(key, rp, ci)
                except ValueError as e:
                    if entry is not None and entry[0] == key:  # valid at its last call: written since
                        raise ValueError(f"{e} ({_PATTERN_WRITTEN})") from e
                    raise
                entry = (key, built)
                _cache[slot] = entry
    return entry[1]


_PATTERN_WRITTEN = (
    "the layer's row_ptr / col_idx were valid at its last call and have been written since: an average over "
    "every buffer (torch.optim.swa_utils.AveragedModel(use_buffers=True) with an EMA, an EMA over the whole "
    "state_dict) rounds integer buffers; average the floating-point tensors only, e.g. use_buffers=False"
)


class _KernelHandle:
    """The C++ kernel plus the facts the ops need about the layer."""

    def __init__(self, kernel, **facts):
        self._k = kernel
        self.__dict__.update(facts)
        self.scheme = kernel.scheme

    def __getattr__(self, name):
        return getattr(self._k, name)


def _linear_key(spec, scheme, has_bias):
    return ("linear", tuple(spec), scheme, bool(has_bias), "")


def _conv_key(spec, scheme, has_bias, vectorization):
    return ("conv2d", tuple(spec), scheme, bool(has_bias), vectorization)


def _workspace_bytes(scheme: str, x: torch.Tensor, values: torch.Tensor, channels: int):
    # the size the forward's descriptor gives it (fake tensors have no kernel)
    return _C.s8_workspace_bytes(x.numel(), values.numel(), channels) if scheme == "s8" else 0


# ---- the op bodies (shared by the custom ops and the eager fast path) ----------------


def _forward_body(k, x, values, bias, x_abs_max=None, statistics=False):
    # One call into C++: it allocates y and the workspace (the int8 input
    # saved for backward by s8 training; empty otherwise) from pooled memory.
    # statistics (Conv2d): also y's batch statistics for the BatchNorm after
    # the convolution (4 x C floats: mean, biased variance, lowest and
    # highest per channel; the third output, else absent).
    abs_max = None if x_abs_max is None else _np(x_abs_max)
    if not statistics:
        y, ws = k.forward(_np(x), _np(values), _np(bias), _threads(), abs_max)
        return torch.from_numpy(y), torch.from_numpy(ws)
    y, ws, found = k.forward(_np(x), _np(values), _np(bias), _threads(), abs_max, True)
    return torch.from_numpy(y), torch.from_numpy(ws), torch.from_numpy(found)


def _backward_body(
    k, grad_y, x, workspace, values, seed, input_shape, need_dx, need_dv, need_db, grad_y_channel_abs_max=None
):
    dx, dv, db = _empty(), _empty(), _empty()
    seed = int(seed)
    conv = input_shape is not None
    shape = (list(input_shape),) if conv else ()
    ws = _np(workspace) if workspace.numel() else None
    if need_dv or need_db:
        dv = torch.empty_like(values)
        db = torch.empty(k.out_channels if conv else k.out_features, dtype=torch.float32) if k.with_bias else _empty()
        common = (_np(x) if k.scheme == "f32" else None, ws, _np(grad_y))
        outs = (dv.detach().numpy(), db.numpy() if k.with_bias else None)
        maxima = None if grad_y_channel_abs_max is None else _np(grad_y_channel_abs_max)
        if need_dx:  # one call: the fused backward shares the packed gradient
            dx = torch.from_numpy(k.backward(*common, _np(values), *outs, *shape, seed, _threads(), maxima))
        else:  # a first layer: its gradient rounded in one read where the maxima came along
            k.backward_weights(*common, *outs, *shape, seed, _threads(), maxima)
    elif need_dx:
        dx = torch.from_numpy(k.backward_data(ws, _np(grad_y), _np(values), *shape, seed, _threads()))
    return dx, dv, db


def _eager_backward(k, grad_y, x, workspace, values, seed, input_shape, need_dx, need_dv, need_db):
    """_backward_body of an eager autograd function: an s8 layer takes its
    gradient's channel maxima where the BatchNorm after it handed them over."""
    maxima = _channel_maxima_of(grad_y) if k.scheme == "s8" else None
    return _backward_body(
        k, grad_y.contiguous(), x, workspace, values, seed, input_shape, need_dx, need_dv, need_db, maxima
    )


# ---- Linear -------------------------------------------------------------------


@torch.library.custom_op("qsparseprop::linear_forward", mutates_args=())
def linear_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    handle: torch.Tensor,
    seed: torch.Tensor,
    spec: list[int],
    scheme: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x @ W.T + bias for a 2-D contiguous float32 x; returns (y, workspace).
    spec: [in_features, out_features]."""
    k = kernel_for(handle, _linear_key(spec, scheme, bias is not None), row_ptr, col_idx)
    return _forward_body(k, x, values, bias)


@linear_forward.register_fake
def _(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme):
    return x.new_empty(x.shape[0], spec[1]), x.new_empty(
        _workspace_bytes(scheme, x, values, spec[1]), dtype=torch.uint8
    )


@torch.library.custom_op("qsparseprop::linear_backward", mutates_args=())
def linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    workspace: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    handle: torch.Tensor,
    seed: torch.Tensor,
    spec: list[int],
    scheme: str,
    has_bias: bool,
    need_input_grad: bool,
    need_values_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = kernel_for(handle, _linear_key(spec, scheme, has_bias), row_ptr, col_idx)
    return _backward_body(
        k, grad_y, x, workspace, values, seed, None, need_input_grad, need_values_grad, need_bias_grad
    )


@linear_backward.register_fake
def _(grad_y, x, workspace, values, row_ptr, col_idx, handle, seed, spec, scheme, has_bias, need_dx, need_dv, need_db):
    need_w = need_dv or need_db
    dx = grad_y.new_empty(grad_y.shape[0], spec[0]) if need_dx else grad_y.new_empty(0)
    dv = values.new_empty(values.shape) if need_w else values.new_empty(0)
    db = grad_y.new_empty(spec[1]) if has_bias and need_w else grad_y.new_empty(0)
    return dx, dv, db


# ---- Conv2d -------------------------------------------------------------------


@torch.library.custom_op("qsparseprop::conv2d_forward", mutates_args=())
def conv2d_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    handle: torch.Tensor,
    seed: torch.Tensor,
    spec: list[int],
    scheme: str,
    vectorization: str,
    statistics: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse conv2d of a 4-D contiguous float32 NCHW x; returns (y,
    workspace, y's batch statistics for a BatchNorm after it: 4 x C floats
    with statistics, else empty).
    spec: [in_c, out_c, kh, kw, sh, sw, pad top, left, bottom, right, dh, dw, groups]."""
    k = kernel_for(handle, _conv_key(spec, scheme, bias is not None, vectorization), row_ptr, col_idx)
    out = _forward_body(k, x, values, bias, None, statistics)
    return out if statistics else (*out, _empty())


def _conv_out_hw(spec, h, w):
    _, _, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, _ = spec
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


@conv2d_forward.register_fake
def _(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization, statistics=False):
    oh, ow = _conv_out_hw(spec, x.shape[2], x.shape[3])
    ws = x.new_empty(_workspace_bytes(scheme, x, values, spec[1]), dtype=torch.uint8)
    return x.new_empty(x.shape[0], spec[1], oh, ow), ws, x.new_empty(4 * spec[1] if statistics else 0)


@torch.library.custom_op("qsparseprop::conv2d_backward", mutates_args=())
def conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    workspace: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    handle: torch.Tensor,
    seed: torch.Tensor,
    spec: list[int],
    scheme: str,
    vectorization: str,
    has_bias: bool,
    input_shape: list[int],
    need_input_grad: bool,
    need_values_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = kernel_for(handle, _conv_key(spec, scheme, has_bias, vectorization), row_ptr, col_idx)
    return _backward_body(
        k, grad_y, x, workspace, values, seed, input_shape, need_input_grad, need_values_grad, need_bias_grad
    )


@conv2d_backward.register_fake
def _(
    grad_y, x, workspace, values, row_ptr, col_idx, handle, seed, spec, scheme, vectorization, has_bias,
    input_shape, need_dx, need_dv, need_db,
):  # fmt: skip
    need_w = need_dv or need_db
    dx = grad_y.new_empty(input_shape) if need_dx else grad_y.new_empty(0)
    dv = values.new_empty(values.shape) if need_w else values.new_empty(0)
    db = grad_y.new_empty(spec[1]) if has_bias and need_w else grad_y.new_empty(0)
    return dx, dv, db


# ---- autograd of the custom ops (what torch.compile traces) --------------------------


def _setup(ctx, inputs, output, conv: bool):
    x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme = inputs[:9]
    ctx.vectorization = inputs[9] if conv else ""
    # s8 keeps only the int8 workspace (input and weights); f32 keeps the input.
    ctx.save_for_backward(x if scheme == "f32" else _empty(), output[1], values, row_ptr, col_idx, handle, seed)
    ctx.spec, ctx.scheme, ctx.has_bias, ctx.input_shape = list(spec), scheme, bias is not None, list(x.shape)


def _grads(ctx, grad_y, conv: bool):
    x, ws, values, row_ptr, col_idx, handle, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_db = ctx.has_bias and need[2]
    common = (grad_y.contiguous(), x, ws, values, row_ptr, col_idx, handle, seed, ctx.spec, ctx.scheme)
    if conv:
        dx, dv, db = conv2d_backward(
            *common, ctx.vectorization, ctx.has_bias, ctx.input_shape, need[0], need[1], want_db
        )
    else:
        dx, dv, db = linear_backward(*common, ctx.has_bias, need[0], need[1], want_db)
    rest = (None,) * (len(need) - 3)
    return (dx if need[0] else None, dv if need[1] else None, db if want_db else None, *rest)


torch.library.register_autograd(
    "qsparseprop::linear_forward",
    lambda ctx, grad_y, grad_ws: _grads(ctx, grad_y, False),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, False),
)
torch.library.register_autograd(
    "qsparseprop::conv2d_forward",
    lambda ctx, grad_y, grad_ws, grad_statistics: _grads(ctx, grad_y, True),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, True),
)


# ---- vmap of the custom ops (torch.func) ------------------------------------------
#
# A vmapped dimension is a batch of batches. Where only the input (and the
# output's gradient) are vmapped and the scheme is f32, the rules fold it
# into the layer's batch: forward and backward-data are one call each, row
# for row what each sample's call computes. The weights' gradient of each
# sample (per-sample gradients), s8 (its scales are per call) and stacked
# models (vmapped weights) run once per sample: no kernel computes those in
# one call. The rules say so themselves instead of torch's fallback warning
# that asks to report a missing batching rule to PyTorch.


def _per_sample(info, in_dims, args, op) -> tuple:
    results = []
    for i in range(info.batch_size):
        sample = [a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims, strict=True)]
        results.append(op(*sample))
    return tuple(torch.stack(parts) for parts in zip(*results, strict=True))


def _once_per_sample(info, in_dims, *args, op):
    stacked = _per_sample(info, in_dims, args, op)
    return stacked, (0,) * len(stacked)


def _foldable(in_dims, vmapped: int, scheme: str) -> bool:
    """f32, and exactly the first ``vmapped`` arguments vmapped."""
    return (
        scheme == "f32" and all(isinstance(d, int) for d in in_dims[:vmapped])
        and not any(isinstance(d, int) for d in in_dims[vmapped:])
    )  # fmt: skip


def _fold(t: torch.Tensor, dim: int) -> torch.Tensor:
    t = t.movedim(dim, 0)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).contiguous()


def _unfold(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(batch, t.shape[0] // batch, *t.shape[1:])


def _forward_vmap(info, in_dims, *args, op):
    """x vmapped, f32: one folded call; y unfolded, the rest (f32's empty
    workspace, no statistics) as they are."""
    statistics = len(args) > 10 and args[10]  # conv's: of the whole folded batch, not per sample
    if statistics or not _foldable(in_dims, 1, args[8]) or args[0].numel() == 0:
        return _once_per_sample(info, in_dims, *args, op=op)
    y, *rest = op(_fold(args[0], in_dims[0]), *args[1:])
    return (_unfold(y, info.batch_size), *rest), (0,) + (None,) * len(rest)


def _backward_vmap(info, in_dims, *args, op, need_at: int, shape_at: int | None):
    """grad_y and x vmapped, f32: the input's gradient in one folded call,
    each sample's weight gradients in its own. need_at: the index of
    need_input_grad (need_values_grad, need_bias_grad follow); shape_at:
    conv's input_shape argument (folded too)."""
    need_dx, need_dv, need_db = args[need_at : need_at + 3]
    if not _foldable(in_dims, 2, args[9]) or args[0].numel() == 0:
        return _once_per_sample(info, in_dims, *args, op=op)
    b, args = info.batch_size, list(args)
    dx = dv = db = args[0].new_empty(0)  # what the op gives for a gradient not asked for
    if need_dx:
        folded = _with(args, need_at, (True, False, False))
        folded[0], folded[1] = _fold(args[0], in_dims[0]), _fold(args[1], in_dims[1])
        if shape_at is not None:
            folded[shape_at] = [b * args[shape_at][0], *args[shape_at][1:]]
        dx = _unfold(op(*folded)[0], b)
    if need_dv or need_db:
        _, dv, db = _per_sample(info, in_dims, _with(args, need_at, (False, need_dv, need_db)), op)
    weights = 0 if need_dv or need_db else None
    return (dx, dv, db), (0 if need_dx else None, weights, weights)


def _with(args: list, at: int, values: tuple) -> list:
    out = list(args)
    out[at : at + len(values)] = values
    return out


torch.library.register_vmap(linear_forward, functools.partial(_forward_vmap, op=linear_forward))
torch.library.register_vmap(conv2d_forward, functools.partial(_forward_vmap, op=conv2d_forward))
torch.library.register_vmap(linear_backward, functools.partial(_backward_vmap, op=linear_backward, need_at=11,
                                                               shape_at=None))  # fmt: skip
torch.library.register_vmap(conv2d_backward, functools.partial(_backward_vmap, op=conv2d_backward, need_at=13,
                                                               shape_at=12))  # fmt: skip


# ---- eager fast path --------------------------------------------------------------
#
# The custom ops are what torch.compile traces; in eager mode an
# autograd.Function calls the same bodies without the dispatcher's per-call
# cost (about 0.1 ms per forward+backward, a quarter of a small layer's step).
# Second derivatives are not implemented: once_differentiable makes a double
# backward through a sparse layer raise instead of silently dropping terms.


class _SparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization, conv, statistics):
        key = (
            _conv_key(spec, scheme, bias is not None, vectorization)
            if conv
            else _linear_key(spec, scheme, bias is not None)
        )
        k = kernel_for(handle, key, row_ptr, col_idx)
        y, ws, *found = _forward_body(k, x, values, bias, _abs_max_of(x) if scheme == "s8" else None, statistics)
        ctx.save_for_backward(x if scheme == "f32" else _empty(), ws, values)
        ctx.k, ctx.seed, ctx.has_bias, ctx.conv = k, int(seed), bias is not None, conv
        ctx.input_shape = list(x.shape)
        if not statistics:
            return y
        ctx.mark_non_differentiable(found[0])
        return y, found[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *_):
        x, ws, values = ctx.saved_tensors
        need = ctx.needs_input_grad
        want_db = ctx.has_bias and need[2]
        dx, dv, db = _eager_backward(
            ctx.k, grad_y, x, ws, values, ctx.seed, ctx.input_shape if ctx.conv else None, need[0], need[1], want_db
        )
        return (dx if need[0] else None, dv if need[1] else None, db if want_db else None) + (None,) * 9


class _SparseFunctionForTransforms(torch.autograd.Function):
    """The custom ops with autograd in the form torch.func takes (forward
    without ctx, setup_context): torch.library's own autograd of the ops
    is not one it takes. vmap goes through the ops' rules (above)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization, conv, statistics):
        if conv:
            return conv2d_forward(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization,
                                  statistics)  # fmt: skip
        return (*linear_forward(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme), _empty())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.conv = inputs[10]
        _setup(ctx, inputs[:10], output, ctx.conv)
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *_):
        return _grads(ctx, grad_y, ctx.conv)


def linear(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme) -> torch.Tensor:
    """Sparse linear with autograd: the custom op under torch.compile, the
    Function for torch.func's transforms under them, the eager fast path
    otherwise."""
    if transformed():
        args = (x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, "", False, False)
        return _SparseFunctionForTransforms.apply(*args)[0]
    if torch.compiler.is_compiling():
        return linear_forward(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme)[0]
    return _SparseFunction.apply(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, "", False, False)


def conv2d(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization, statistics=False):
    """Sparse conv2d with autograd: as :func:`linear`. statistics: returns (y, y's batch
    statistics) for the BatchNorm after it (batch_norm_relu's known), else y."""
    statistics = bool(statistics)
    if transformed():
        args = (x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization, True, statistics)
        y, _, found = _SparseFunctionForTransforms.apply(*args)
        return (y, found) if statistics else y
    if torch.compiler.is_compiling():
        y, _, found = conv2d_forward(x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization,
                                     statistics)  # fmt: skip
        return (y, found) if statistics else y
    return _SparseFunction.apply(
        x, values, bias, row_ptr, col_idx, handle, seed, spec, scheme, vectorization, True, statistics
    )


# ---- the MLP block: Linear -> activation -> Linear, the hidden activation kept ----------
#
# _C.LinearActLinear runs the two layers with the hidden activation and its
# gradient in the kernels' tile layout between them where both read it
# natively (no transposes in between). With a ReLU (one bit per element
# kept; its pass also finds the maximum an int8 second layer needs) each
# direction is one C++ call; a GELU
# is torch's, applied between the layers' calls to the hidden tensor as it
# is (elementwise, so the layout does not matter and the values are torch's).
# Saved for backward: x and the hidden activation where the layer reading
# them is f32, the int8 workspaces where it is s8, the ReLU's mask or the
# GELU's input.


def _chain_of(k1, k2):
    # kept on the first layer's kernel, for its latest second layer: it goes
    # with the kernel (a deleted model leaves no chain holding its kernels)
    entry = k1.__dict__.get("_chain")
    if entry is None or entry[0] is not k2:
        entry = (k2, _C.LinearActLinear(k1._k, k2._k))
        k1.__dict__["_chain"] = entry
    return entry[1]


def _maybe(t: torch.Tensor, wanted: bool):
    return _np(t) if wanted and t.numel() else None


class _LinearReluLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v1, b1, v2, b2, chain, seed1, seed2, f32_first, f32_second, need_backward):
        y, hidden, mask, ws1, ws2 = chain.forward(_np(x), _np(v1), _np(b1), _np(v2), _np(b2), _threads(), need_backward)
        hidden, mask = torch.from_numpy(hidden), torch.from_numpy(mask)
        ws1, ws2 = torch.from_numpy(ws1), torch.from_numpy(ws2)
        ctx.save_for_backward(x if f32_first else _empty(), hidden if f32_second else _empty(), mask, ws1, ws2, v1, v2)
        ctx.chain, ctx.seeds, ctx.f32 = chain, (int(seed1), int(seed2)), (f32_first, f32_second)
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, hidden, mask, ws1, ws2, v1, v2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dv1, db1, dv2, db2 = ctx.chain.backward(
            _np(grad_y.contiguous()), _maybe(x, ctx.f32[0]), _maybe(hidden, ctx.f32[1]), _np(mask),
            _maybe(ws1, True), _maybe(ws2, True), _np(v1), _np(v2), *ctx.seeds, need[0], _threads(),
        )  # fmt: skip
        grads = [torch.from_numpy(g) for g in (dx, dv1, db1, dv2, db2)]
        return tuple(g if n else None for g, n in zip(grads, need[:5], strict=True)) + (None,) * 6


class _LinearGeluLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v1, b1, v2, b2, chain, seed1, seed2, f32_first, f32_second, need_backward, approximate):
        threads = _threads()
        z, ws1 = chain.first_forward(_np(x), _np(v1), _np(b1), threads, need_backward)
        z = torch.from_numpy(z)
        hidden = torch.nn.functional.gelu(z, approximate=approximate)
        y, ws2 = chain.second_forward(_np(hidden), _np(v2), _np(b2), x.shape[0], threads, need_backward)
        ws1, ws2 = torch.from_numpy(ws1), torch.from_numpy(ws2)
        ctx.save_for_backward(x if f32_first else _empty(), hidden if f32_second else _empty(), z, ws1, ws2, v1, v2)
        ctx.chain, ctx.seeds, ctx.f32 = chain, (int(seed1), int(seed2)), (f32_first, f32_second)
        ctx.approximate, ctx.batch = approximate, x.shape[0]
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, hidden, z, ws1, ws2, v1, v2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        threads = _threads()
        dh, dv2, db2 = ctx.chain.second_backward(
            _np(grad_y.contiguous()), _maybe(hidden, ctx.f32[1]), _maybe(ws2, True), _np(v2), ctx.seeds[1], threads
        )
        dz = torch.ops.aten.gelu_backward(torch.from_numpy(dh), z, approximate=ctx.approximate)
        dx, dv1, db1 = ctx.chain.first_backward(
            _np(dz), _maybe(x, ctx.f32[0]), _maybe(ws1, True), _np(v1), ctx.seeds[0], need[0], ctx.batch, threads
        )
        grads = [torch.from_numpy(g) for g in (dx, dv1, db1, dv2, db2)]
        return tuple(g if n else None for g, n in zip(grads, need[:5], strict=True)) + (None,) * 7


def linear_act_linear(first, second, x: torch.Tensor, gelu: str | None = None) -> torch.Tensor:
    """second(act(first(x))) for two swapped Linear layers (f32 or s8) and a
    2-D contiguous float32 x, eager mode: act the first layer's fused ReLU
    (gelu None) or torch's GELU (gelu: its ``approximate``, "none" or "tanh")."""
    chain = _chain_of(first._kernel(), second._kernel())
    tensors = (x, first.values, first.bias, second.values, second.bias)
    # no gradient to follow (torch.no_grad, nothing requiring one): the
    # layers' backward primitives are neither made nor tuned for this shape
    need_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (
        *tensors, chain, first._next_seed(), second._next_seed(), first.scheme == "f32", second.scheme == "f32",
        need_backward,
    )  # fmt: skip
    if gelu is None:
        return _LinearReluLinearFunction.apply(*args)
    return _LinearGeluLinearFunction.apply(*args, gelu)


# ---- the pixels a strided 1x1 convolution reads -------------------------------------


class _SubsampleFunction(torch.autograd.Function):
    """x[:, :, ::sh, ::sw] of a contiguous float32 x, and the spread of its
    gradient, each one pass into the library's pooled memory. torch's two
    slice backwards (one per dimension) zero-filled a half-size and a
    full-size fresh tensor and copied twice: the main job's int8 step is
    2.3-2.6 % faster without them (interleaved steps in one process)."""

    @staticmethod
    def forward(ctx, x, sh, sw):
        ctx.hw, ctx.sh, ctx.sw = x.shape[2:], sh, sw
        return torch.from_numpy(_C.subsample_pixels(_np(x), sh, sw, _threads()))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, w = ctx.hw
        spread = _C.subsample_pixels_backward(_np(grad.contiguous()), h, w, ctx.sh, ctx.sw, _threads())
        return torch.from_numpy(spread), None, None


def subsample_pixels(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """Every sh-th row and sw-th column of a 4-D x, contiguous, with
    autograd: the library's passes for a contiguous float32 x in eager
    mode, torch's slicing otherwise (and under torch.compile, which traces
    it)."""
    if traced() or x.dtype != torch.float32 or not x.is_contiguous() or x.numel() == 0:
        return x[:, :, ::sh, ::sw].contiguous()
    return _SubsampleFunction.apply(x, int(sh), int(sw))


# ---- two convolutions reading one input, the second through its subsample ----------
#
# A residual block that changes its size (torchvision's BasicBlock with a
# downsample) reads its input twice: the first convolution, and the strided
# 1x1 shortcut through the pixels it reads. Autograd would sum their input
# gradients by spreading the shortcut's into a full-size zero tensor and
# adding the two: writing the input's size three times and reading it
# twice. One function for both adds the shortcut's gradient into the first
# convolution's in place, touching only the pixels the shortcut read. The
# layers, their arguments and seeds are exactly those of the separate calls,
# so are every value and gradient.


class _SharedInputConvsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values_a, bias_a, values_b, bias_b, a, b, stride, statistics):
        def kernel_of(layer, bias):  # layer: (row_ptr, col_idx, handle, seed, spec, scheme, vectorization)
            row_ptr, col_idx, handle, _, spec, scheme, vectorization = layer
            return kernel_for(handle, _conv_key(spec, scheme, bias is not None, vectorization), row_ptr, col_idx)

        ka, kb = kernel_of(a, bias_a), kernel_of(b, bias_b)
        xs = torch.from_numpy(_C.subsample_pixels(_np(x), *stride, _threads()))
        abs_max = _abs_max_of(x) if ka.scheme == "s8" else None
        ya, ws_a, *found_a = _forward_body(ka, x, values_a, bias_a, abs_max, statistics[0])
        yb, ws_b, *found_b = _forward_body(kb, xs, values_b, bias_b, None, statistics[1])
        # the input each layer read where it is f32; the int8 workspaces where s8
        kept_x, kept_xs = (x if ka.scheme == "f32" else _empty()), (xs if kb.scheme == "f32" else _empty())
        ctx.save_for_backward(kept_x, ws_a, values_a, kept_xs, ws_b, values_b)
        ctx.k, ctx.seeds, ctx.stride = (ka, kb), (int(a[3]), int(b[3])), stride
        ctx.has_bias = (bias_a is not None, bias_b is not None)
        ctx.shapes = (list(x.shape), list(xs.shape))
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        found = (found_a[0] if found_a else _empty(), found_b[0] if found_b else _empty())
        ctx.mark_non_differentiable(*found)
        return ya, yb, *found

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, grad_b, *_):
        x, ws_a, values_a, xs, ws_b, values_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [None] * 9
        input_grads = [None, None]  # of x from the first layer, of its subsample from the second
        for i, (grad, k, inp, ws, values, seed, shape) in enumerate(
            ((grad_a, ctx.k[0], x, ws_a, values_a, ctx.seeds[0], ctx.shapes[0]),
             (grad_b, ctx.k[1], xs, ws_b, values_b, ctx.seeds[1], ctx.shapes[1]))
        ):  # fmt: skip
            if grad is None:
                continue
            want_db = ctx.has_bias[i] and need[2 + 2 * i]
            d, dv, db = _eager_backward(k, grad, inp, ws, values, seed, shape, need[0], need[1 + 2 * i], want_db)
            grads[1 + 2 * i], grads[2 + 2 * i] = (dv if need[1 + 2 * i] else None), (db if want_db else None)
            if need[0]:
                input_grads[i] = d
        dx, dxs = input_grads
        if dx is not None and dxs is not None:
            _C.subsample_pixels_backward_add(_np(dxs), dx.numpy(), *ctx.stride, _threads())
        elif dxs is not None:
            h, w = ctx.shapes[0][2:]
            dx = torch.from_numpy(_C.subsample_pixels_backward(_np(dxs), h, w, *ctx.stride, _threads()))
        grads[0] = dx
        return tuple(grads)


def convs_sharing_input(
    x, a: tuple, b: tuple, stride: tuple[int, int], statistics: tuple[bool, bool] = (False, False)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv a of x, conv b of x[:, :, ::sh, ::sw], and their outputs'
    batch statistics where `statistics` asks for them, else empty tensors)
    with autograd, as the two separate calls (conv2d, and conv2d of
    subsample_pixels) would make them, for a contiguous float32 4-D x with a
    batch, in eager mode. a, b: each layer's (values, bias, row_ptr,
    col_idx, handle, seed, spec, scheme, vectorization)."""
    return _SharedInputConvsFunction.apply(
        x, a[0], a[1], b[0], b[1], tuple(a[2:]), tuple(b[2:]), tuple(stride), tuple(statistics)
    )


# ---- relu keeping one bit per element -------------------------------------------------

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return ((bits.unsqueeze(1) & _BIT_WEIGHTS) != 0).view(-1)[:n].view(shape)


class _ReluBits(torch.autograd.Function):
    """relu(y) whose backward keeps one bit per element (not y <= 0) instead of the
    float output: int8 training then saves only the next sparse layer's int8
    copy of an activation and these bits (1/8 byte per element), not the fp32
    tensor nn.ReLU would keep. Same values and gradients as torch.relu, bit
    for bit (NaN propagates forward, and its gradient passes, as in torch).
    float32 runs one C++ pass each way (the output keeps the input's memory
    format); other dtypes (bf16
    under autocast) and traced graphs (torch.compile) take the same steps in
    torch ops."""

    @staticmethod
    def forward(ctx, y):
        ctx.shape = y.shape
        if y.dtype == torch.float32 and _dense_in_memory(y) and not torch.compiler.is_compiling():
            out = torch.empty_like(y)  # same strides: one elementwise pass over the same memory order
            bits = torch.empty((y.numel() + 7) // 8, dtype=torch.uint8)
            _C.relu_with_mask_forward(_flat(y), _flat(out), bits.numpy(), torch.get_num_threads())
            ctx.strides = y.stride()
            ctx.save_for_backward(bits)
            return out
        ctx.strides = None
        ctx.save_for_backward(_pack_bits(~(y <= 0)))  # set for NaN: torch passes its gradient
        return torch.relu(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        if ctx.strides is None or grad.dtype != torch.float32:
            return _relu_grad_torch(grad, bits, ctx)
        if grad.stride() != ctx.strides:  # the bits follow the forward input's memory order
            grad = torch.empty_strided(ctx.shape, ctx.strides, dtype=grad.dtype).copy_(grad)
        out = torch.empty_like(grad)
        _C.relu_with_mask_backward(_flat(grad), bits.numpy(), _flat(out), torch.get_num_threads())
        return out


def _dense_in_memory(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous in some dimension order, e.g.
    channels_last): its storage can be walked as one flat array."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _flat(t: torch.Tensor):
    """The tensor's elements in memory order, as a 1-D numpy view (no copy)."""
    return t.detach().as_strided((t.numel(),), (1,)).numpy()


def _relu_grad_torch(grad: torch.Tensor, bits: torch.Tensor, ctx) -> torch.Tensor:
    """The backward in torch ops: where, not a product, so a NaN gradient
    where the input was <= 0 becomes 0 as in torch's ReLU backward."""
    if ctx.strides is None:  # the bits are in logical (row-major) order
        return torch.where(_unpack_bits(bits, ctx.shape), grad, grad.new_zeros(()))
    # the bits are in the forward input's memory order
    g = torch.empty_strided(ctx.shape, ctx.strides, dtype=grad.dtype).copy_(grad)
    flat = g.as_strided((g.numel(),), (1,))
    flat.copy_(torch.where(_unpack_bits(bits, flat.shape), flat, flat.new_zeros(())))
    return g


def relu_bits(y: torch.Tensor) -> torch.Tensor:
    if transformed():  # (torch.compile traces it)
        return torch.relu(y)
    return _ReluBits.apply(y)


# ---- BatchNorm2d (+ ReLU) of a fused Conv2d block ------------------------------------
#
# The sparse convolution's NCHW output y goes through torch.nn.BatchNorm2d's
# arithmetic and the ReLU after it in one C++ call each way: forward one
# statistics pass and one pass that normalises, applies the ReLU and keeps
# its mask (1 bit per element); backward two passes that read the mask
# instead of a masked gradient. Saved for backward: y (BatchNorm's own
# input, as torch keeps it) or, in an int8 block with batch statistics
# (keep_s8), y's int8 copy — per channel round((y - mean) / step), one byte
# per element, docs/quantization.md — then the mask and per-channel mean
# (or step) and invstd: not the normalised or the ReLU's fp32 output. The
# running statistics are updated by the caller (modules.SparseConv2d) from
# the returned batch mean and biased variance.


def _optional_np(t: torch.Tensor | None):
    return None if t is None else t.detach().numpy()


def _batch_norm_forward_body(
    y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8, residual, known=None
):
    """The custom op's seven outputs, then max |z| (keep_s8: z feeds an s8
    convolution; else empty). known: y's batch
    statistics as the convolution that wrote it took them, or None."""
    out = _C.batch_norm_relu_forward(
        _np(y), _optional_np(weight), _optional_np(bias), _optional_np(running_mean), _optional_np(running_var),
        eps, batch_statistics, relu, keep_s8, _optional_np(residual), _threads(), _optional_np(known),
    )  # fmt: skip
    return tuple(torch.from_numpy(a) for a in out)


def _batch_norm_backward_body(
    grad_z, mask, src, weight, mean, step, invstd, batch_statistics, relu, need_dy, need_affine, need_residual
):
    """(dy, dgamma, dbeta, dresidual, dy's max |.| per channel); the
    maxima only from an int8 copy (an int8 block: dy feeds an s8
    convolution's backward), else empty."""
    out = _C.batch_norm_relu_backward(
        _np(grad_z), _np(mask) if relu else None, _np(src), _optional_np(weight), _np(mean), _optional_np(step),
        _np(invstd), batch_statistics, relu, need_dy, need_affine, need_residual, _threads(),
    )  # fmt: skip
    return tuple(torch.from_numpy(a) for a in out)


# ---- a tensor's maxima, from its writer to its s8 reader ----------------------------
#
# An int8 block's BatchNorm knows the maxima an s8 convolution would read a
# tensor once more to find: forward, max |z| of its output (from the
# channels' ranges at no cost, or after a residual's add in registers as it
# writes z), backward, max |dy| per channel of the
# gradient it writes (in registers as it writes). In eager mode they ride on
# the tensor itself, with its version: the convolution takes them only from
# the very tensor the BatchNorm returned, unmodified (a view or a copy, a
# gradient summed with another one, replaced or changed in place by a hook
# is a tensor without them, or of another version, and the convolution
# finds its maxima itself). The integers are the same either way.

_ABS_MAX_ATTR, _CHANNEL_MAXIMA_ATTR = "_qsp_abs_max", "_qsp_channel_abs_max"


def _hand_over(t: torch.Tensor, attr: str, maxima: torch.Tensor) -> None:
    # an inference tensor (torch.inference_mode) keeps no version to check
    # the maxima against: the reader finds them itself
    if maxima.numel() and not t.is_inference():
        setattr(t, attr, (maxima, t._version))


def _handed_over(t: torch.Tensor, attr: str, count: int) -> torch.Tensor | None:
    handed = getattr(t, attr, None)
    if handed is None:
        return None
    maxima, version = handed
    return maxima if version == t._version and maxima.numel() == count and t.is_contiguous() else None


def _hand_over_abs_max(z: torch.Tensor, abs_max: torch.Tensor) -> None:
    _hand_over(z, _ABS_MAX_ATTR, abs_max)


def _abs_max_of(x: torch.Tensor) -> torch.Tensor | None:
    return _handed_over(x, _ABS_MAX_ATTR, 1)


def _hand_over_channel_maxima(dy: torch.Tensor, maxima: torch.Tensor) -> None:
    _hand_over(dy, _CHANNEL_MAXIMA_ATTR, maxima)


def _channel_maxima_of(grad: torch.Tensor) -> torch.Tensor | None:
    return _handed_over(grad, _CHANNEL_MAXIMA_ATTR, grad.shape[1]) if grad.dim() >= 2 else None


@torch.library.custom_op("qsparseprop::batch_norm_relu_forward", mutates_args=())
def batch_norm_relu_forward(
    y: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    batch_statistics: bool,
    relu: bool,
    keep_s8: bool,
    residual: torch.Tensor | None,
    known: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, mask, mean, invstd, batch_var, centered, step) for a contiguous
    NCHW float32 y (and residual, added before the ReLU, when given);
    centered and step are empty without keep_s8. known: y's batch
    statistics as the convolution that wrote it took them (conv2d_forward's
    third output), used instead of a pass over y."""
    return _batch_norm_forward_body(
        y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8, residual, known
    )[:7]


@batch_norm_relu_forward.register_fake
def _(y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8, residual, known=None):
    c = y.shape[1]
    mask = y.new_empty((y.numel() + 7) // 8 if relu else 0, dtype=torch.uint8)
    centered = y.new_empty(y.shape if keep_s8 else (0,), dtype=torch.int8)
    return (y.new_empty(y.shape), mask, y.new_empty(c), y.new_empty(c), y.new_empty(c if batch_statistics else 0),
            centered, y.new_empty(c if keep_s8 else 0))  # fmt: skip


@torch.library.custom_op("qsparseprop::batch_norm_relu_backward", mutates_args=())
def batch_norm_relu_backward(
    grad_z: torch.Tensor,
    mask: torch.Tensor,
    src: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    step: torch.Tensor | None,
    invstd: torch.Tensor,
    batch_statistics: bool,
    relu: bool,
    need_input_grad: bool,
    need_affine_grad: bool,
    need_residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """src: the forward's y (with mean), or its int8 copy (with step).
    (dy, dgamma, dbeta, dresidual), each empty where not needed."""
    return _batch_norm_backward_body(
        grad_z, mask, src, weight, mean, step, invstd, batch_statistics, relu, need_input_grad, need_affine_grad,
        need_residual_grad,
    )[:4]  # fmt: skip


@batch_norm_relu_backward.register_fake
def _(grad_z, mask, src, weight, mean, step, invstd, batch_statistics, relu, need_dy, need_affine, need_residual):
    c = src.shape[1]
    dy = grad_z.new_empty(src.shape) if need_dy else grad_z.new_empty(0)
    dres = grad_z.new_empty(src.shape) if need_residual else grad_z.new_empty(0)
    return dy, grad_z.new_empty(c if need_affine else 0), grad_z.new_empty(c if need_affine else 0), dres


def _batch_norm_grads(ctx, grad_z):
    src, mask, weight, mean, step, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_affine = ctx.affine and (need[1] or need[2])
    need_residual = ctx.has_residual and need[9]
    args = (grad_z.contiguous(), mask, src, weight if ctx.affine else None, mean, step if ctx.keep_s8 else None,
            invstd, ctx.batch_statistics, ctx.relu)  # fmt: skip
    if torch.compiler.is_compiling() or not ctx.eager:
        dy, dw, db, dres = batch_norm_relu_backward(*args, need[0], need_affine, need_residual)
    else:
        dy, dw, db, dres, maxima = _batch_norm_backward_body(*args, need[0], need_affine, need_residual)
        _hand_over_channel_maxima(dy, maxima)
    return (
        dy if need[0] else None, dw if need_affine and need[1] else None, db if need_affine and need[2] else None,
        None, None, None, None, None, None, dres if need_residual else None, None,
    )  # fmt: skip


def _batch_norm_setup(ctx, inputs, output, eager: bool):
    y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8, residual = inputs[:10]
    _, mask, mean, invstd, _, centered, step = output
    # with keep_s8, y itself is not kept: the int8 copy stands in for it
    ctx.save_for_backward(centered if keep_s8 else y, mask, weight if weight is not None else _empty(), mean, step,
                          invstd)  # fmt: skip
    ctx.affine, ctx.batch_statistics, ctx.relu, ctx.eager = weight is not None, batch_statistics, relu, eager
    ctx.keep_s8, ctx.has_residual = keep_s8, residual is not None


torch.library.register_autograd(
    "qsparseprop::batch_norm_relu_forward",
    lambda ctx, grad_z, *_: _batch_norm_grads(ctx, grad_z),
    setup_context=lambda ctx, inputs, output: _batch_norm_setup(ctx, inputs, output, False),
)


class _BatchNormReLUFunction(torch.autograd.Function):
    """The eager path of batch_norm_relu_forward (no dispatcher cost)."""

    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8, residual, known):
        args = (y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8, residual)
        *out, z_abs_max = _batch_norm_forward_body(*args, known)
        out = tuple(out)
        _hand_over_abs_max(out[0], z_abs_max)
        _batch_norm_setup(ctx, args, out, True)
        ctx.mark_non_differentiable(*out[1:])
        # the six outputs nobody differentiates (the mask, the statistics,
        # the int8 copy) get None, not zero tensors autograd would fill
        # (0.8 ms of the main job's int8 step); so may z's gradient
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z, *_):
        if grad_z is None:
            return (None,) * 11
        return _batch_norm_grads(ctx, grad_z)


# ---- a block's inner activation, kept as the next convolution's int8 input ------------
#
# Inside an int8 residual block the first convolution's BatchNorm + ReLU
# output feeds only the second convolution, which reads it only to round it
# to int8. _BatchNormReLUConvFunction runs the two as one step each way:
# forward, the BatchNorm (its statistics from the first convolution) writes
# that output only as the second layer's int8 input, into its workspace
# (qsp::batch_norm_relu_forward_quantized), then the second layer runs on
# it; the fp32 activation never goes to memory (one pass over the first
# convolution's output instead of a BatchNorm pass writing the activation
# and a convolution pass reading it). Backward: the second layer's
# backward, then the BatchNorm's, from the same saved int8 copy and mask as
# the unfused pair. The same integers, outputs and gradients as the two
# functions run apart (eager only; a traced graph runs them apart).


def _recorded(name: str):
    """A profiler range named ``name`` while torch's profiler runs, else nothing."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class _BatchNormReLUConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias_bn, eps, known, values, bias, row_ptr, col_idx, handle, seed, spec, scheme,
                vectorization, statistics):  # fmt: skip
        k = kernel_for(handle, _conv_key(spec, scheme, bias is not None, vectorization), row_ptr, col_idx)
        out, *bn = k.forward_after_batch_norm(
            _np(y), _optional_np(weight), _optional_np(bias_bn), eps, _np(known), _np(values), _np(bias), _threads(),
            statistics,
        )  # fmt: skip
        z, ws, *found = (torch.from_numpy(a) for a in out)
        mask, mean, invstd, var, centered, step = (torch.from_numpy(a) for a in bn)
        found = found[0] if statistics else _empty()
        ctx.save_for_backward(ws, values, centered, mask, weight if weight is not None else _empty(), mean, step,
                              invstd)  # fmt: skip
        ctx.k, ctx.seed, ctx.has_bias, ctx.affine = k, int(seed), bias is not None, weight is not None
        ctx.input_shape = list(y.shape)
        ctx.mark_non_differentiable(found, mean, var)
        ctx.set_materialize_grads(False)
        return z, found, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z, *_):
        none = (None,) * 15
        if grad_z is None:
            return none
        ws, values, centered, mask, weight, mean, step, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad  # y, weight, bias_bn, eps, known, values, bias, ...
        need_affine = ctx.affine and (need[1] or need[2])
        want_db = ctx.has_bias and need[6]
        # the BatchNorm's gradient input: the second layer's input gradient
        need_dz = need[0] or need_affine
        dz, dv, db = _eager_backward(ctx.k, grad_z, _empty(), ws, values, ctx.seed, ctx.input_shape, need_dz,
                                     need[5], want_db)  # fmt: skip
        dy = dw = dbb = None
        if need_dz:
            with _recorded("batch_norm_relu_backward"):  # the step table's BatchNorm part
                dy, dw, dbb, _, maxima = _batch_norm_backward_body(
                    dz, mask, centered, weight if ctx.affine else None, mean, step, invstd, True, True, need[0],
                    need_affine, False,
                )  # fmt: skip
            _hand_over_channel_maxima(dy, maxima)
        return (dy if need[0] else None, dw if need_affine and need[1] else None,
                dbb if need_affine and need[2] else None, None, None, dv if need[5] else None,
                db if want_db else None) + none[7:]  # fmt: skip


def batch_norm_relu_conv2d(y, weight, bias_bn, eps, known, values, bias, row_ptr, col_idx, handle, seed, spec,
                           scheme, vectorization, statistics=False):  # fmt: skip
    """(z, z's batch statistics (4 x C floats) or empty, the BatchNorm's batch
    mean, biased variance) of an s8 convolution (values ... vectorization,
    as conv2d's) over relu(batch_norm(y)) in training mode, the BatchNorm's
    statistics ``known`` (y's, as conv2d(statistics=True) took them): its
    output goes to the convolution only as its int8 input. The running
    statistics are the caller's to update. Eager mode only."""
    return _BatchNormReLUConvFunction.apply(
        y, weight, bias_bn, float(eps), known, values, bias, row_ptr, col_idx, handle, seed, spec, scheme,
        vectorization, bool(statistics),
    )  # fmt: skip


def batch_norm_relu(
    y, weight, bias, running_mean, running_var, eps, batch_statistics, relu, keep_s8=False, residual=None, known=None
):
    """(z, mean, biased batch variance) of BatchNorm2d (+ ReLU) over a
    contiguous NCHW float32 y, with autograd. With batch statistics, mean
    and variance are the batch's (for the running-statistics update); else
    the mean is the running mean and the variance empty. keep_s8 (batch
    statistics only) keeps y's int8 copy for the backward in place of y.
    residual (contiguous float32, y's shape) is added before the ReLU: z =
    relu(batch_norm(y) + residual), a residual block's end. known (with
    batch statistics): y's statistics as conv2d(statistics=True) gave them,
    instead of a pass over y."""
    keep_s8 = bool(keep_s8) and bool(batch_statistics)
    args = (
        y, weight, bias, running_mean, running_var, float(eps), bool(batch_statistics), bool(relu), keep_s8, residual,
        known if batch_statistics else None,
    )  # fmt: skip
    if traced():
        z, _, mean, _, var, _, _ = batch_norm_relu_forward(*args)
    else:
        z, _, mean, _, var, _, _ = _BatchNormReLUFunction.apply(*args)
    return z, mean, var
