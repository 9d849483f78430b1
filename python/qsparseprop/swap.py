"""Swap a model's sparse enough *and measured faster* layers for ours."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .modules import QuantizedSparseConv2d, QuantizedSparseLinear, SparseConv2d, SparseLinear
from .prototype import PrototypeQuantizedSparseConv2d, PrototypeQuantizedSparseLinear


@dataclass
class SwapDecision:
    """One row of the swap table."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    sparsity: float
    dense_ms: float | None
    sparse_ms: float | None
    swapped: bool
    reason: str


def _sparsity(module: nn.Module) -> float:
    from .modules import _mask_and_weight

    mask, weight = _mask_and_weight(module)
    kept = mask if mask is not None else weight != 0
    return 1.0 - kept.sum().item() / kept.numel()


def _time_fwd_bwd(module: nn.Module, shape: tuple[int, ...], repeats: int, warmup: int) -> float:
    """Median ms of forward + backward (input and parameter gradients)."""
    x = torch.randn(shape, requires_grad=True)
    times = []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        y = module(x)
        y.backward(torch.ones_like(y))
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sparse_class(module: nn.Module, quantize: bool, prototype: bool):
    if isinstance(module, nn.Linear):
        return PrototypeQuantizedSparseLinear if prototype else QuantizedSparseLinear if quantize else SparseLinear
    return PrototypeQuantizedSparseConv2d if prototype else QuantizedSparseConv2d if quantize else SparseConv2d


def swap_modules_with_sparse(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    inplace: bool = True,
    verbose: bool = True,
    prototype: bool = False,
    quantize: bool = True,
    min_sparsity: float = 0.8,
    min_speedup: float = 1.0,
    repeats: int = 7,
    warmup: int = 2,
) -> nn.Module:
    """Replaces each ``nn.Linear`` / ``nn.Conv2d`` that is at least
    ``min_sparsity`` sparse and, timed forward+backward at its real input
    shape (median of ``repeats`` runs after ``warmup``), at least
    ``min_speedup`` times faster as a sparse layer.

    ``quantize`` picks the int8 layers, ``prototype`` their pure-PyTorch
    emulation (swapped on sparsity alone: it is for accuracy studies, not
    speed). ``verbose`` prints a table of the decisions. Returns the model
    (``model`` itself when ``inplace``, else a deep copy); the decisions are
    in its ``qsparseprop_swap_report`` attribute.

    Example:
        >>> import torch
        >>> from qsparseprop import swap_modules_with_sparse
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> for m in net:
        ...     if isinstance(m, torch.nn.Linear):
        ...         _ = torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.9)
        >>> net = swap_modules_with_sparse(net, (16, 32), verbose=False, min_speedup=0.0)
        >>> type(net[0]).__name__
        'QuantizedSparseLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(input_shape, (tuple, list)) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    target = model if inplace else _deepcopy_model(model)

    # Each candidate's real input shape, from one forward pass.
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: args unchanged

        return hook

    hooks = []
    for name, mod in target.named_modules():
        if type(mod) in (nn.Linear, nn.Conv2d):
            hooks.append(mod.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            target(torch.randn(tuple(input_shape)))
    finally:
        for h in hooks:
            h.remove()

    report: list[SwapDecision] = []
    for name, shape in shapes.items():
        mod = target.get_submodule(name)
        sp = _sparsity(mod)
        row = SwapDecision(name, type(mod).__name__, shape, sp, None, None, False, "")
        report.append(row)
        if sp < min_sparsity:
            row.reason = f"sparsity {sp:.3f} < min_sparsity {min_sparsity}"
            continue
        if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            row.reason = f"padding_mode={mod.padding_mode!r} unsupported"
            continue
        cls = _sparse_class(mod, quantize, prototype)
        sparse = cls.from_dense(mod).train(mod.training)
        if prototype:
            row.swapped, row.reason = True, "prototype (swapped on sparsity)"
        else:
            row.dense_ms = _time_fwd_bwd(mod, shape, repeats, warmup)
            row.sparse_ms = _time_fwd_bwd(sparse, shape, repeats, warmup)
            speedup = row.dense_ms / row.sparse_ms
            row.swapped = speedup >= min_speedup
            row.reason = f"{speedup:.2f}x {'>=' if row.swapped else '<'} min_speedup {min_speedup}"
        if row.swapped:
            parent_name, _, child = name.rpartition(".")
            setattr(target.get_submodule(parent_name) if parent_name else target, child, sparse)

    target.qsparseprop_swap_report = report
    if verbose:
        print(format_swap_report(report))
    return target


def _deepcopy_model(model: nn.Module) -> nn.Module:
    # torch.nn.utils.prune leaves `weight` as a computed (non-leaf) tensor
    # attribute, which deepcopy refuses; copy those as detached tensors (the
    # pruning hook recomputes them on the next forward).
    memo = {}
    for mod in model.modules():
        w = mod.__dict__.get("weight")
        if isinstance(w, torch.Tensor) and not w.is_leaf:
            memo[id(w)] = w.detach().clone()
    return copy.deepcopy(model, memo)


def format_swap_report(report: list[SwapDecision]) -> str:
    """The verbose table of ``swap_modules_with_sparse``."""
    head = f"{'layer':<24} {'kind':<7} {'input shape':<20} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9}  decision"
    lines = [head, "-" * len(head)]
    for r in report:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"{r.name:<24} {r.kind:<7} {str(r.input_shape):<20} {r.sparsity:>8.3f} {fmt(r.dense_ms):>9} "
            f"{fmt(r.sparse_ms):>9}  {'swap' if r.swapped else 'keep'} ({r.reason})"
        )
    return "\n".join(lines)
