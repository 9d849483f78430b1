"""Swap a model's sparse enough *and measured faster* layers for ours, make
the same swaps again from a saved plan, and go back to dense."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import operator
import os
import statistics
import sys
import time
import types
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import _C, _ops
from .attention import _PROJECTIONS, ProjectedMultiheadAttention
from .modules import (
    _TRANSFORMER_LAYERS,
    BatchNormReLU2d,
    FusedBatchNorm2d,
    FusedReLU,
    MaskedReLU,
    QuantizedSparseConv2d,
    QuantizedSparseLinear,
    SparseConv2d,
    SparseLinear,
    _applied_by,
    _chain_activation,
    _conv_add_relu,
    _conv_deferring,
    _conv_reading_deferred,
    _convs_sharing_input,
    _linear_act_linear,
    _mlp_pair,
    _passes_through,
    _record_places,
    _relu_marker,
    _shares_input_with,
    _SparseModule,
    _transformer_activation,
    _transformer_ff_block,
    _with_hooks_of,
)
from .prototype import PrototypeQuantizedSparseConv2d, PrototypeQuantizedSparseLinear

_PLAN_VERSION = 1


@dataclass
class SwapDecision:
    """One row of the swap table, and one entry of a swap plan."""

    name: str
    kind: str  # the dense module's class
    input_shape: tuple[int, ...]
    sparsity: float
    dense_ms: float | None
    sparse_ms: float | None
    swapped: bool
    reason: str
    scheme: str = ""  # what it was swapped to: "f32", "s8" or "prototype"
    pattern_hash: str = ""  # of the CSR pattern (validate_csr's hash), for plans
    fused_relu: bool = False  # the nn.ReLU right after it (or after its fused BatchNorm) is applied by the layer
    fused_batch_norm: bool = False  # the nn.BatchNorm2d right after it is applied by the layer
    fused_residual: bool = False  # and the residual add + ReLU after that BatchNorm (a traced block's end)
    # it runs as one block with the next swapped Linear (a ReLU or GELU between them), the hidden
    # activation in the kernels' tile layout where both layers read it
    fused_kept_layout: bool = False
    # it and the strided 1x1 shortcut reading the same input run as one function (a traced residual
    # block's first convolution and its downsample), the shortcut's input gradient added in place
    fused_shared_input: bool = False
    # its BatchNorm + ReLU output feeds one swapped s8 convolution alone (a traced block's inner
    # activation): the BatchNorm writes it only as that layer's int8 input, no fp32 activation
    fused_int8_activation: bool = False


def _describe(module: nn.Module) -> str:
    """The module's class and configuration (a block's: each member's)."""
    if isinstance(module, nn.Sequential):
        return "; ".join(_describe(m) for m in module)
    return f"{type(module).__name__}({module.extra_repr()})"


def _timing_key(dense: nn.Module, sparse: nn.Module, shape, autocast) -> bytes:
    """Everything the two timings depend on, the pattern in full: equal keys
    time the same work on the same kind of machine. ``dense`` and ``sparse``
    are layers or blocks (an nn.Sequential whose first member is the layer)."""
    layer = sparse[0] if isinstance(sparse, nn.Sequential) else sparse
    first = dense[0] if isinstance(dense, nn.Sequential) else dense
    meta = {
        "format": 2, "kind": type(first).__name__, "dense": _describe(dense), "sparse": _describe(sparse),
        "class": type(layer).__name__, "shape": list(shape), "autocast": str(autocast),
        "threads": torch.get_num_threads(), "isa": _C.effective_cpu_isa(), "torch": torch.__version__,
        "training": first.training,
    }  # fmt: skip
    pattern = layer.row_ptr.numpy().tobytes() + layer.col_idx.numpy().tobytes()
    return json.dumps(meta, sort_keys=True).encode() + b"\0" + pattern


def _load_timings(key: bytes) -> tuple[float, float] | None:
    raw = _C.persistent_cache_load("swap", key)
    if raw is None:
        return None
    try:  # checked by the store (checksum, versions, key); still data from disk
        d = json.loads(raw)
        dense_ms, sparse_ms = float(d["dense_ms"]), float(d["sparse_ms"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (0.0 < dense_ms < float("inf") and 0.0 < sparse_ms < float("inf")):
        return None
    return dense_ms, sparse_ms


def _sparsity(module: nn.Module) -> float:
    from .modules import _mask_and_weight

    mask, weight = _mask_and_weight(module)
    kept = mask if mask is not None else weight != 0
    return 1.0 - kept.sum().item() / kept.numel()


def _mask_kept_layers(model: nn.Module, decisions: list[SwapDecision], state_dict: dict | None = None) -> None:
    """Masks the layers the decisions keep dense (see ``mask_kept``) and notes
    it in their reasons. Layers not called in the probe forward are left
    alone (a pruning hook recomputes ``.weight`` on the layer's own forward:
    a parent reading it directly would read it stale), except a
    MultiheadAttention's projections (:func:`_mask_kept_attention`). With a
    checkpoint about to be loaded, the
    checkpoint decides: a layer is masked where it holds ``<name>.weight_mask``
    (a model swapped without masks, or by an earlier version, loads as it was
    saved). A layer whose parameter another module also holds (tied) is not
    masked: the other holder would go on reading the unmasked weight."""
    note = "; pattern kept as a pruning mask (weight_mask)"
    owners = _parameter_owners(model)
    for d in decisions:
        if d.swapped or not d.input_shape:
            continue
        module = _submodule(model, d.name)
        if module is None:  # a projection of an attention given back to torch's (masked below)
            continue
        if _tied_elsewhere(module, owners):
            continue  # a mask on one holder of a tied weight would untie them too
        masked = _mask_kept_weight(module, state_dict, f"{d.name}.weight_mask")
        if masked and note not in d.reason:
            d.reason += note
    rows = {d.name: d for d in decisions}
    for name, mha in model.named_modules():
        if isinstance(mha, nn.MultiheadAttention):
            masked = _mask_kept_attention(mha, name, owners, state_dict)
            row = rows.get(f"{name}.out_proj" if name else "out_proj")
            attention_note = f"; its attention's pattern kept as pruning masks ({', '.join(masked)})"
            if masked and row is not None and attention_note not in row.reason:
                row.reason += attention_note


# ---- kept-dense attention ----------------------------------------------------------
#
# nn.MultiheadAttention is no layer the swap can replace: it reads its
# projections' weights itself (in_proj_weight, or q/k/v_proj_weight, and
# out_proj.weight, never calling out_proj). Pruned, they trained densely and
# their zeros regrew: a 90 % pruned encoder layer's attention had none left
# after 5 SGD steps while its swapped MLP stayed 90 % sparse. Each pruned
# projection now gets its pattern as a pruning mask like a kept-dense layer;
# out_proj's is applied by a pre-hook on the attention, as its own hook
# never runs.


def _refresh_out_proj(mha: nn.Module, args) -> None:
    """A forward pre-hook of a MultiheadAttention whose out_proj holds a
    pruning mask: out_proj.weight recomputed from it before the attention
    reads it (what out_proj's own hook would do on a forward it never
    gets); nothing once ``prune.remove`` made it plain."""
    out = mha.out_proj
    for hook in list(out._forward_pre_hooks.values()):
        if isinstance(hook, prune.BasePruningMethod):
            hook(out, args)


def _mask_kept_attention(mha: nn.MultiheadAttention, name: str, owners: dict, state_dict: dict | None) -> list[str]:
    """Masks a MultiheadAttention's pruned projections (its input projection
    weights, out_proj.weight) as _mask_kept_layers masks a layer, the
    checkpoint deciding where one is about to be loaded; returns the masks'
    names. A projection with a mask or parametrization of its own, tied to
    another module, or without a zero weight is left as it is."""
    prefix = f"{name}." if name else ""
    masked = []
    projections = ["in_proj_weight"] if mha._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    for pname in projections:
        weight = mha._parameters.get(pname)
        if weight is None or pname in getattr(mha, "parametrizations", {}):
            continue
        if any(m is not mha for _, _, m in owners.get(id(weight), [])):
            continue
        if state_dict is not None:
            mask = state_dict.get(f"{prefix}{pname}_mask")
            if mask is None:
                continue
            mask = mask.to(torch.bool)
        elif bool((weight == 0).any()):
            mask = weight != 0
        else:
            continue
        _KeptPattern.apply(mha, pname, mask)
        masked.append(f"{pname}_mask")
    out = mha.out_proj
    if not _tied_elsewhere(out, owners) and _mask_kept_weight(out, state_dict, f"{prefix}out_proj.weight_mask"):
        masked.append("out_proj.weight_mask")
    # whoever masked it (here, as a layer called elsewhere too, or its owner)
    if prune.is_pruned(out) and not any(h is _refresh_out_proj for h in mha._forward_pre_hooks.values()):
        mha.register_forward_pre_hook(_refresh_out_proj)
    return masked


# ---- attentions with projections of their own -------------------------------------
#
# A pruned attention whose projections are to be swapped becomes a
# ProjectedMultiheadAttention (its q/k/v_proj and out_proj layers it calls),
# so each projection is a Linear the swap times, swaps or keeps like any
# other; one where no projection was swapped goes back to torch's, masked.


def _projectable(mha: nn.Module, owners: dict, min_sparsity: float) -> bool:
    """Whether the swap turns ``mha`` into a ProjectedMultiheadAttention: an
    nn.MultiheadAttention (not a subclass: its own forward might differ)
    with a projection at least ``min_sparsity`` sparse, whose weights
    nothing recomputes (a pruning mask excepted) and no other module holds."""
    if type(mha) is not nn.MultiheadAttention or _reparametrizations(mha) or _tied_elsewhere(mha, owners):
        return False
    out = mha.out_proj
    if _reparametrizations(out) or _tied_elsewhere(out, owners):
        return False
    if mha._qkv_same_embed_dim:
        weights = list(mha.in_proj_weight.detach().chunk(3))
    else:
        weights = [mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()]
    weights.append(out.weight.detach())
    return any(1.0 - float((w != 0).float().mean()) >= min_sparsity for w in weights if w.numel())


def _project_attention(root: nn.Module, name: str) -> nn.MultiheadAttention:
    """Puts the ProjectedMultiheadAttention of the attention ``name`` in its
    place (under every name it has); returns the attention."""
    mha = root.get_submodule(name)
    _replace(root, name, ProjectedMultiheadAttention.from_attention(mha))
    return mha


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _project_attentions(root: nn.Module, min_sparsity: float) -> dict[str, nn.MultiheadAttention]:
    """Projects every attention _projectable finds; returns them by name.
    A model that is an attention itself stays as it is (nothing to put it
    in)."""
    owners = _parameter_owners(root)
    names = [n for n, m in root.named_modules() if n and _projectable(m, owners, min_sparsity)]
    return {name: _project_attention(root, name) for name in names}


def _unproject_unswapped(root: nn.Module, originals: dict, report: list[SwapDecision]) -> None:
    """Puts back each attention of ``originals`` (name -> torch's attention)
    none of whose projections was swapped — the very module, as it was
    (nothing trained it meanwhile), masked later like any kept attention —
    and says so in its projections' rows."""
    for name, original in originals.items():
        projections = {f"{name}.{p}" for p in _PROJECTIONS}
        rows = [r for r in report if r.name in projections]
        if any(r.swapped for r in rows):
            continue
        _replace(root, name, original)
        for r in rows:
            r.reason += "; no projection of its attention swapped: the attention stays torch's"


class _KeptPattern(prune.CustomFromMask):
    """``prune.custom_from_mask``'s method (so ``prune.is_pruned``,
    ``prune.remove``, the state_dict keys and a second pruning behave as
    torch's) whose masked weight also deep-copies. torch's pruning leaves
    ``module.weight`` a non-leaf tensor, weight_orig * weight_mask, which
    ``copy.deepcopy`` refuses: a model that deep-copied before the swap
    (``copy.deepcopy(best)``, ``AveragedModel``) would not after it once a
    layer was kept dense with its mask."""

    def apply_mask(self, module):
        weight = super().apply_mask(module)
        if weight.grad_fn is not None and not torch.compiler.is_compiling():
            # copy.deepcopy looks __deepcopy__ up on the object itself
            weight.__deepcopy__ = _MaskedOnCopy(module, self._tensor_name)
        return weight


class _MaskedOnCopy:
    """A masked weight's deep copy: the same product of the copy's own
    weight_orig and weight_mask (the memo hands out those the copy holds),
    so the copy's weight trains the copy's parameter, as the original's
    does. It reads the module's parameters as they are now, not the
    tensors the weight was made from: after ``torch.func.functional_call``
    those were its stand-ins. A plain object, so a pickled model loads."""

    __slots__ = ("module", "name")

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name

    def __call__(self, memo: dict) -> torch.Tensor:
        module = self.module
        orig = module._parameters.get(self.name + "_orig")
        mask = module._buffers.get(self.name + "_mask")
        if orig is None or mask is None:  # unpruned since: its weight as it is now
            return copy.deepcopy(getattr(module, self.name), memo)
        weight = copy.deepcopy(mask, memo).to(dtype=orig.dtype) * copy.deepcopy(orig, memo)
        twin = memo.get(id(module))  # the module's copy, where the module is what is copied
        if isinstance(twin, nn.Module):
            weight.__deepcopy__ = _MaskedOnCopy(twin, self.name)
        return weight


def _mask_kept_weight(module: nn.Module, state_dict: dict | None, key: str) -> bool:
    """Masks a kept-dense layer's weight, or says False: with a checkpoint
    about to be loaded, where it holds the mask ``key`` (and the layer has
    none yet); else by the weight's zeros (:func:`_mask_kept_layer`)."""
    if state_dict is None:
        return _mask_kept_layer(module)
    saved = state_dict.get(key)
    if saved is None or prune.is_pruned(module):
        return False
    _KeptPattern.apply(module, "weight", saved.to(torch.bool))
    return True


def _mask_kept_layer(module: nn.Module) -> bool:
    """Registers a kept-dense pruned layer's pattern as a torch pruning mask
    (its zeros), so training does not regrow them; False where the layer has
    a mask, a parametrization or a weight_norm / spectral_norm hook already,
    or no zero weight."""
    from .modules import _mask_and_weight

    mask, weight = _mask_and_weight(module)
    if mask is not None or hasattr(module, "parametrizations") or _reparametrizations(module):
        return False
    if not bool((weight == 0).any()):
        return False
    _KeptPattern.apply(module, "weight", weight != 0)
    return True


def _time_fwd_bwd(module: nn.Module, shape: tuple[int, ...], repeats: int, warmup: int, autocast) -> float:
    """Median ms of forward + backward (input and parameter gradients)."""
    x = torch.randn(shape, requires_grad=True)
    times = []
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        with ctx:
            y = module(x)
        y.float().backward(torch.ones(y.shape))
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    module.zero_grad(set_to_none=True)
    return statistics.median(times)


# scheme="auto": int8 is kept unless f32 is faster by more than this share
# (int8 also saves activation memory); the order in which they are timed.
AUTO_INT8_MARGIN = 0.05
_AUTO_ORDER = {"auto": ("s8", "f32")}


def _fused_followers(root: nn.Module, name: str, layer: nn.Module, relu: bool) -> list[nn.Module]:
    """Copies of what fuse() would hand the layer ``name`` (an nn.BatchNorm2d
    after a convolution, then, with ``relu``, an nn.ReLU / MaskedReLU), in
    its nn.Sequential or its parent's traced forward; empty when nothing
    would be fused. Copies: timing them changes no statistics of the
    model's own."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not _plain_sequential(parent):
        if not isinstance(layer, nn.Conv2d):
            return []
        for conv_name, bn_name, relu_name in _traced_chains(root, parent, _is_dense_conv):
            if conv_name == child:
                bn = copy.deepcopy(parent.get_submodule(bn_name))
                return [bn, nn.ReLU()] if relu and relu_name is not None else [bn]
        return []
    names = list(parent._modules)
    rest = [parent._modules[n] for n in names[names.index(child) + 1 :]]
    out = []
    if isinstance(layer, nn.Conv2d) and rest and _is_batch_norm(rest[0]):
        if rest[0].num_features == layer.out_channels:
            out.append(copy.deepcopy(rest[0]))
            rest = rest[1:]
    if relu and out and rest and _is_relu(rest[0]):
        out.append(nn.ReLU())
    return out


def _fused_block(sparse: _SparseModule, after: list[nn.Module]) -> nn.Sequential:
    """The fused block of a copy of ``sparse`` and copies of ``after``."""
    return fuse(nn.Sequential(copy.deepcopy(sparse), *copy.deepcopy(after)))


class _LayerTiming:
    """The dense layer's and its sparse versions' forward+backward times at
    one input shape, each read from the persistent cache when stored there
    (under the exact configuration: see _timing_key) and stored after being
    measured. The dense layer is timed at most once; ``progress`` is printed
    (to stderr) before the first measurement, if any."""

    def __init__(self, dense: nn.Module, shape, repeats: int, warmup: int, autocast, persistent: bool, progress: str):
        self.dense, self.shape, self.repeats, self.warmup = dense, shape, repeats, warmup
        self.autocast, self.persistent, self.progress = autocast, persistent, progress
        self.from_cache = False
        self._dense_ms = None

    def _time(self, module: nn.Module) -> float:
        if self.progress:
            print(self.progress, file=sys.stderr)
            self.progress = ""
        return _time_fwd_bwd(module, self.shape, self.repeats, self.warmup, self.autocast)

    def dense_ms(self) -> float:
        if self._dense_ms is None:
            self._dense_ms = self._time(self.dense)
        return self._dense_ms

    def sparse_ms(self, sparse: _SparseModule) -> float:
        key = _timing_key(self.dense, sparse, self.shape, self.autocast) if self.persistent else None
        stored = _load_timings(key) if key else None
        if stored:
            self.from_cache = True
            if self._dense_ms is None:
                self._dense_ms = stored[0]
            return stored[1]
        dense_ms = self.dense_ms()
        ms = self._time(sparse)
        layer = sparse[0] if isinstance(sparse, nn.Sequential) else sparse
        layer.rounding_step.zero_()  # timing steps do not count: the rounding streams start where a fresh layer's do
        if hasattr(layer, "outliers_set"):
            layer.outliers_set.fill_(False)  # calibrated on the first real batch, not on the timing noise
        if key:
            _C.persistent_cache_store("swap", key, json.dumps({"dense_ms": dense_ms, "sparse_ms": ms}).encode())
        return ms


def _layer_seed(name: str) -> int:
    """A swapped layer's rounding seed, from its name: every layer of a model
    draws its own stochastic-rounding stream (with one seed, all layers'
    gradients of a step rounded with the same noise at the same flat index,
    and a layer's gradient, computed from the next one's rounded gradient,
    met the noise that rounding had used), and a plan applied elsewhere or
    after a restart gives each layer the same seed again."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _sparse_class(module: nn.Module, scheme: str):
    from .outliers import OutlierQuantizedSparseLinear, PrototypeOutlierQuantizedSparseLinear

    linear = isinstance(module, nn.Linear)
    if scheme in ("s8_outliers", "prototype_s8_outliers"):
        if not linear:  # the outlier split is a Linear scheme; convolutions use s8
            scheme = "prototype" if scheme.startswith("prototype") else "s8"
        else:
            return (
                PrototypeOutlierQuantizedSparseLinear
                if scheme.startswith("prototype")
                else OutlierQuantizedSparseLinear
            )
    return {
        ("prototype", True): PrototypeQuantizedSparseLinear,
        ("s8", True): QuantizedSparseLinear,
        ("f32", True): SparseLinear,
        ("prototype", False): PrototypeQuantizedSparseConv2d,
        ("s8", False): QuantizedSparseConv2d,
        ("f32", False): SparseConv2d,
    }[(scheme, linear)]


def _pattern_hash(sparse: _SparseModule) -> str:
    return (
        f"{_ops._C.validate_csr(sparse._rows(), sparse._cols(), sparse.row_ptr.numpy(), sparse.col_idx.numpy()):016x}"
    )


def _aliases(root: nn.Module, module: nn.Module) -> list[str]:
    """Every name under which ``module`` is reachable from ``root`` (a module
    shared by two attributes, tied layers, has several; named_modules() lists
    only the first)."""
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is module and n]


def _replace(root: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Puts ``new`` under ``name`` and under every other name of the same
    module, so tied layers stay tied; returns those other names."""
    names = _aliases(root, root.get_submodule(name)) or [name]
    for alias in names:
        parent_name, _, child = alias.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return [n for n in names if n != name]


@contextlib.contextmanager
def model_state_kept(model: nn.Module):
    """Every module's mode and every buffer (BatchNorm statistics, counters,
    int8 rounding steps) put back as they were when the block ends: for a
    probe forward. Only what changed is copied back: a copy would bump the
    version of buffers that autograd graphs hold (pruning masks)."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and not torch.equal(b, buffers[name]):
                    b.copy_(buffers[name])


class _Example(NamedTuple):
    args: tuple
    kwargs: dict
    input_shape: tuple[int, ...] | None  # the args are a float input of this shape


def _example_call(input_shape, example_inputs, who: str) -> _Example:
    """The probe forward's arguments: a float input of ``input_shape``, or
    ``example_inputs`` (a tensor, a tuple of positional arguments, or a dict
    of keyword arguments), its tensors copied (the probe must not change
    the caller's)."""
    if (input_shape is None) == (example_inputs is None):
        raise ValueError(f"{who}: pass input_shape (the shape of one float input) or example_inputs (the model's "
                         "arguments: a tensor, a tuple, or a dict of keyword arguments), one of them")  # fmt: skip
    if input_shape is not None:
        if not isinstance(input_shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and d > 0 for d in input_shape
        ):
            raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
        return _Example((torch.randn(tuple(input_shape)),), {}, tuple(input_shape))

    def copied(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    if isinstance(example_inputs, torch.Tensor):
        return _Example((copied(example_inputs),), {}, None)
    if isinstance(example_inputs, (tuple, list)):
        return _Example(tuple(copied(v) for v in example_inputs), {}, None)
    if isinstance(example_inputs, dict) and all(isinstance(k, str) for k in example_inputs):
        return _Example((), {k: copied(v) for k, v in example_inputs.items()}, None)
    raise TypeError(f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
                    f"arguments, got {type(example_inputs).__name__}")  # fmt: skip


# What a model raises on an input it does not take (a float tensor where it
# wants token ids): the probe on input_shape's float input adds a hint.
_PROBE_ERRORS = (RuntimeError, TypeError, ValueError, IndexError)


def _probe_shapes(
    model: nn.Module,
    example: _Example,
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    readers: list | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Each ``kinds`` module's input shape, from one forward pass on
    ``example`` (see _example_call) that leaves no trace: eval
    mode and no_grad during the probe, every buffer (BatchNorm statistics,
    counters) and every module's mode restored afterwards. With ``readers``
    (a list), appends the names of each group of two or more candidates
    whose first call read one tensor object (a residual block's first
    convolution and its shortcut)."""
    shapes: dict[str, tuple[int, ...]] = {}
    candidates = [name for name, mod in model.named_modules() if isinstance(mod, kinds)]
    first_inputs: list[tuple[str, torch.Tensor]] = []  # held: ids are not reused meanwhile

    def record(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor) and name not in shapes:
                shapes[name] = tuple(args[0].shape)
                first_inputs.append((name, args[0]))

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in candidates]
    try:
        with model_state_kept(model), torch.no_grad():
            model.eval()
            try:
                model(*example.args, **example.kwargs)
            except _PROBE_ERRORS as e:
                if example.input_shape is None or type(e) not in _PROBE_ERRORS:  # a subclass: its own constructor
                    raise
                raise type(e)(f"the probe forward on a float input of shape {example.input_shape} failed: {e}. "
                              "A model whose input is not one float tensor (token ids, several inputs) takes "
                              "example_inputs=... instead of input_shape") from e  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    if readers is not None:
        groups: dict[int, list[str]] = {}
        for name, tensor in first_inputs:
            groups.setdefault(id(tensor), []).append(name)
        readers.extend(g for g in groups.values() if len(g) > 1)
    return shapes, candidates


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """Every parameter's holders: id -> [(module name, parameter name, module)]."""
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, pname, m))
    return owners


def _tied_elsewhere(module: nn.Module, owners: dict) -> str:
    """Which of ``module``'s parameters another module also holds (a
    language model's output layer sharing the embedding's weight), as
    "weight is also emb.weight"; empty if none. The same module under two
    names is no tie: it is swapped under both."""
    for pname, p in module._parameters.items():
        if p is None:
            continue
        others = [f"{n}.{pn}" for n, pn, m in owners.get(id(p), []) if m is not module]
        if others:
            return f"{pname} is also {others[0]}"
    return ""


def _reparametrizations(module: nn.Module) -> str:
    """What recomputes the layer's parameters on every call, other than a
    pruning mask (torch.nn.utils.prune, torch.ao.pruning's FakeSparsity):
    weight_norm, spectral_norm (hooks or parametrizations), orthogonal ...
    A sparse layer holds its values as plain parameters: it cannot keep
    them. Empty if nothing does."""
    found = [type(h).__name__ for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]
    for name, chain in getattr(module, "parametrizations", {}).items():
        found += [type(p).__name__ for p in chain if not (name == "weight" and hasattr(p, "mask"))]
    return ", ".join(found)


def _taking_hooks_of(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` (just made, to take ``old``'s place) holding ``old``'s forward
    and backward hooks, the very dicts, so the hooks go on firing and their
    handles still remove them (torch's conv-BatchNorm fusion moves hooks
    the same way) — less torch.nn.utils.prune's, which recomputed a
    ``weight`` from a mask the sparse layer holds as its pattern."""
    _with_hooks_of(new, old)
    pre = new.__dict__.get("_forward_pre_hooks", {})
    for key in [k for k, h in pre.items() if isinstance(h, prune.BasePruningMethod)]:
        del pre[key]
    return new


def _swap_in(target: nn.Module, row, sparse: nn.Module) -> None:
    """Puts ``sparse`` where ``row``'s module is (with its hooks), and says in
    its reason where else the same module sat (tied: swapped there too)."""
    also = _replace(target, row.name, _taking_hooks_of(sparse, target.get_submodule(row.name)))
    if also:
        row.reason += f"; the same module is also {', '.join(also)}: swapped there too (still tied)"


def _decide_shared_inputs(target, report, readers, sparse_of, min_speedup, base) -> None:
    """A residual block's first convolution and its strided 1x1 shortcut are
    decided together: fused, they run as one function that quantizes and
    packs their shared input once, so the shortcut's own timing (a 1x1 over
    a subsample, most of it that input's passes) overstates what it adds.
    Where one was swapped and the other kept, both are swapped when the
    pair, timed apart and added, is at least ``min_speedup`` times faster
    sparse (measured: on a 2-core Zen 5 at 95 %, the finetune CNN's last
    shortcut timed 0.98x alone and stayed dense in one run of two, which
    broke its block's fused int8 path: the int8 epoch 3.86 s against 3.62 s,
    its memory 30.3 MiB against 24.3)."""
    rows = {r.name: r for r in report}
    for group in readers:
        timed = [rows[n] for n in group if n in rows and rows[n].sparse_ms and n in sparse_of]
        if len(timed) != 2:
            continue
        a, b = timed
        pair = (sparse_of[a.name], sparse_of[b.name])
        if not (_shares_input_with(*pair) or _shares_input_with(*reversed(pair))):
            continue
        if a.swapped == b.swapped or a.scheme != b.scheme:
            continue
        speedup = (a.dense_ms + b.dense_ms) / (a.sparse_ms + b.sparse_ms)
        if speedup < min_speedup:
            continue
        kept, other = (a, b) if not a.swapped else (b, a)
        kept.swapped = True
        kept.reason += (
            f"; swapped with {other.name}, which reads the same input: the pair {speedup:.2f}x vs {base} "
            f">= min_speedup {min_speedup} (fused, they run as one function sharing the input's passes)"
        )
        _swap_in(target, kept, sparse_of[kept.name])


def swap_modules_with_sparse(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int] | None = None,
    inplace: bool = True,
    verbose: bool = True,
    prototype: bool = False,
    quantize: bool = True,
    min_sparsity: float = 0.8,
    min_speedup: float = 1.0,
    repeats: int = 7,
    warmup: int = 2,
    plan: list[SwapDecision] | list[dict] | str | os.PathLike | None = None,
    autocast: torch.dtype | None = None,
    fuse_relu: bool = True,
    scheme: str | None = None,
    fuse: bool = True,
    persistent: bool = True,
    mask_kept: bool = True,
    example_inputs=None,
) -> nn.Module:
    """Replaces each ``nn.Linear`` / ``nn.Conv2d`` (subclasses included) that
    is at least ``min_sparsity`` sparse and, timed forward+backward at its real
    input shape (median of ``repeats`` runs after ``warmup``), at least
    ``min_speedup`` times faster as a sparse layer.

    Each layer's input shape comes from one probe forward that changes
    nothing: on a float input of ``input_shape``, or on ``example_inputs``
    for a model that takes something else (token ids, several arguments): a
    tensor, a tuple of positional arguments, or a dict of keyword arguments,
    as a training batch would be (the caller's tensors are not touched).

    ``quantize`` picks the int8 layers, ``prototype`` their pure-PyTorch
    emulation (swapped on sparsity alone: it is for accuracy studies, not
    speed). ``autocast`` (e.g. ``torch.bfloat16``) times the dense layers
    under ``torch.autocast("cpu", dtype=autocast)``, the dtype you train in.
    ``scheme`` ("f32", "s8", "s8_outliers", "auto") overrides ``quantize``:
    "s8_outliers" gives Linear layers the outlier-robust int8 scheme
    (``OutlierQuantizedSparseLinear``; convolutions get "s8"), its outlier
    channels found on the first batch after the swap (training or evaluation).
    "auto" times each layer as int8 and as f32 and keeps int8 unless f32 is
    faster by more than ``AUTO_INT8_MARGIN`` (5 %: int8 also saves activation
    memory); the table says which and both times. On CPUs without VNNI
    (AVX2) the two are close, and f32 is often the faster for convolutions.
    ``fuse`` (see :func:`fuse`): an ``nn.BatchNorm2d`` that directly follows
    a swapped convolution in an ``nn.Sequential`` or a traced forward
    (see :func:`fuse`) is applied by it (one
    statistics pass and one normalise pass, no separate ReLU pass); a
    ``FusedBatchNorm2d`` marker holding its parameters and buffers takes its
    place. Such a convolution is timed as the block it will be (convolution,
    BatchNorm and the ReLU after it, fused, against the same dense block;
    the table says so), so the decision counts what fusing saves.
    ``fuse_relu``: an ``nn.ReLU`` that directly follows a swapped
    layer (or its fused BatchNorm) is applied by the layer, keeping one bit
    per element for its backward instead of the fp32 output (int8 training
    then saves only int8 copies of those activations); a ``FusedReLU``
    marker takes its place.
    ``persistent``: the timings are kept in the persistent cache
    (``QSP_CACHE_DIR``, see :func:`qsparseprop.persistent_cache_info`) under
    the layer's exact configuration, pattern, input shape, threads, ISA and
    library and torch versions; a later swap of the same layer on the same
    kind of machine reads them instead of timing (the table says so), so a
    restarted job decides fast and the same way. ``persistent=False`` times
    every layer afresh (and stores nothing).
    A layer whose parameters something recomputes on every call
    (``weight_norm``, ``spectral_norm``, as hooks or parametrizations; an
    orthogonal parametrization ...; pruning masks excepted) stays dense: a
    sparse layer holds its values as plain parameters and would train them
    without it. The table names what.
    ``mask_kept``: a pruned layer the swap keeps dense (not sparse enough,
    or not faster sparse) gets its pattern as a ``torch.nn.utils.prune``
    mask (``weight_orig`` and ``weight_mask``, as ``prune.custom_from_mask``
    makes), so its pruned weights stay zero while it trains like the swapped
    layers' do; ``prune.remove(layer, "weight")`` makes it plain again. A layer
    with a pruning mask or parametrization of its own, or without a zero
    weight, is left as it is. The table says which layers got one. An
    ``nn.MultiheadAttention`` reads its projections' weights itself, so a
    sparse layer in their place would never run: one with a projection at
    least ``min_sparsity`` sparse becomes a
    :class:`~qsparseprop.ProjectedMultiheadAttention` (the same attention
    and arguments, its projections ``q_proj``, ``k_proj``, ``v_proj`` and
    ``out_proj`` layers it calls; it also loads torch's attention's
    checkpoint keys), and each
    projection is a candidate like any Linear (its own row, timing, scheme,
    mask). Where none of them is swapped it goes back to torch's attention,
    whose pruned ``in_proj_weight`` (or ``q/k/v_proj_weight``) and
    ``out_proj.weight`` get masks the same way (out_proj's applied by a hook
    on the attention, which never calls out_proj), noted on the out_proj
    row. :func:`to_dense` gives torch's attention back.
    ``plan`` (a report of an earlier swap, or a file written by
    :func:`save_swap_plan`) makes exactly those swaps without timing anything
    (``input_shape`` is then not needed): the same model on another rank or
    after a restart. ``verbose`` prints a table of the decisions (every
    candidate, swapped or not, with its reason) and progress while timing.
    The probe forward leaves no trace (no BatchNorm statistics change).
    Returns the model (``model`` itself when ``inplace``, else a deep copy);
    the decisions are in its ``qsparseprop_swap_report`` attribute. Create the
    optimizer after swapping: the swapped layers' parameters are new.

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
    if plan is not None:
        target = model if inplace else _deepcopy_model(model)
        return apply_swap_plan(target, plan, verbose=verbose, mask_kept=mask_kept)
    example = _example_call(input_shape, example_inputs, "swap_modules_with_sparse")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if scheme is None:
        scheme = "s8" if quantize else "f32"
    elif scheme not in ("f32", "s8", "s8_outliers", "auto"):
        raise ValueError(f"scheme must be 'f32', 's8', 's8_outliers' or 'auto', got {scheme!r}")
    if prototype and scheme == "auto":
        raise ValueError("scheme='auto' picks by measured speed; prototype layers are not timed: pick a scheme")
    if prototype:
        scheme = "prototype_s8_outliers" if scheme == "s8_outliers" else "prototype"
    target = model if inplace else _deepcopy_model(model)
    projected = _project_attentions(target, min_sparsity)
    _keep_sparse_layers_off_torchs_fast_path(target)  # (the probe must call the projections)
    readers: list[list[str]] = []
    try:
        shapes, candidates = _probe_shapes(target, example, readers=readers)
    except BaseException:  # (a model the probe cannot run is handed back as it came)
        for name, original in projected.items():
            _replace(target, name, original)
        _restore_torchs_fast_path(target)
        _keep_sparse_layers_off_torchs_fast_path(target)
        raise
    sparse_of: dict[str, nn.Module] = {}  # each timed candidate's sparse version, swapped or not

    owners = _parameter_owners(target)
    report: list[SwapDecision] = []
    timed = [n for n in candidates if n in shapes]
    base = f"dense {autocast}".replace("torch.", "") if autocast else "dense fp32"  # what sparse is timed against
    for name in candidates:
        mod = target.get_submodule(name)
        sp = _sparsity(mod)
        row = SwapDecision(name, type(mod).__name__, shapes.get(name, ()), sp, None, None, False, "")
        report.append(row)
        if name not in shapes:
            row.reason = (
                "not called in the probe forward (its parent reads .weight directly, e.g. "
                "MultiheadAttention.out_proj): kept"
            )
            continue
        if sp < min_sparsity:
            row.reason = f"sparsity {sp:.3f} < min_sparsity {min_sparsity}"
            continue
        if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            row.reason = f"padding_mode={mod.padding_mode!r} unsupported"
            continue
        reparametrized = _reparametrizations(mod)
        if reparametrized:
            row.reason = f"{reparametrized} recomputes its weight: a sparse layer would train its values without it"
            continue
        tied = _tied_elsewhere(mod, owners)
        if tied:
            row.reason = f"{tied} (tied): a sparse layer would train a copy of its own and untie them"
            continue
        if prototype:
            sparse = _sparse_class(mod, scheme).from_dense(mod, seed=_layer_seed(name)).train(mod.training)
            row.scheme, row.pattern_hash = scheme, _pattern_hash(sparse)
            row.swapped, row.reason = True, "prototype (swapped on sparsity)"
        else:
            progress = f"qsparseprop: timing {timed.index(name) + 1}/{len(timed)} {name} {row.input_shape}"
            after = _fused_followers(target, name, mod, fuse_relu) if fuse else []
            dense_unit = nn.Sequential(mod, *after) if after else mod
            timing = _LayerTiming(
                dense_unit, row.input_shape, repeats, warmup, autocast, persistent, progress if verbose else ""
            )
            tried = [
                _sparse_class(mod, s).from_dense(mod, seed=_layer_seed(name)).train(mod.training)
                for s in _AUTO_ORDER.get(scheme, (scheme,))
            ]
            # a layer that will be fused is timed as its fused block (on copies), against the dense block
            ms = [timing.sparse_ms(_fused_block(t, after) if after else t) for t in tried]
            pick = 0
            if len(tried) == 2 and ms[0] > (1 + AUTO_INT8_MARGIN) * ms[1]:
                pick = 1  # f32 measurably faster than int8
            sparse = tried[pick]
            sparse_of[name] = sparse
            row.scheme, row.pattern_hash = sparse.scheme, _pattern_hash(sparse)
            row.dense_ms, row.sparse_ms = timing.dense_ms(), ms[pick]
            speedup = row.dense_ms / row.sparse_ms
            row.swapped = speedup >= min_speedup
            row.reason = f"{speedup:.2f}x vs {base} {'>=' if row.swapped else '<'} min_speedup {min_speedup}"
            if after:
                row.reason += f" (as the block {'+'.join(type(m).__name__ for m in (mod, *after))}, fused)"
            if len(tried) == 2:
                row.reason += (
                    f"; auto: int8 {ms[0]:.3f} ms, f32 {ms[1]:.3f} ms -> "
                    + ("int8 (within " if pick == 0 else "f32 (int8 slower by over ")
                    + f"{AUTO_INT8_MARGIN:.0%})"
                )
            if timing.from_cache:
                row.reason += " (timings from the persistent cache)"
        if row.swapped:
            _swap_in(target, row, sparse)

    if fuse and not prototype:
        _decide_shared_inputs(target, report, readers, sparse_of, min_speedup, base)
    _unproject_unswapped(target, projected, report)
    _restore_torchs_fast_path(target)  # (kept off it again below where a sparse layer needs it)
    if mask_kept:
        _mask_kept_layers(target, report)
    _fuse(target, {r.name: r for r in report if r.swapped}, batch_norm=fuse, relu=fuse_relu)
    target.qsparseprop_swap_report = report
    if verbose:
        print(format_swap_report(report))
        if scheme == "s8" and not prototype and _C.effective_cpu_isa() != "avx512_core_vnni":
            print(
                f"note: this CPU ({_C.effective_cpu_isa()}) has no VNNI: int8 layers run on 16-bit products "
                "here, about as fast as f32 ones (convolutions often slower); scheme='auto' keeps whichever "
                "measures faster per layer"
            )
    return target


def fuse(model: nn.Module, relu: bool = True) -> nn.Module:
    """Fuses, in place (returns ``model``), what follows each sparse layer in
    an ``nn.Sequential`` or, found by ``torch.fx`` tracing, in a module's own
    forward (torchvision's BasicBlock and Bottleneck; modules called twice,
    like their shared ReLU, stay unfused): an ``nn.BatchNorm2d`` after a sparse convolution
    (then applied by the convolution: the same arithmetic, statistics,
    momentum and running-statistics updates as the BatchNorm's, in one
    statistics pass and one pass that normalises), and with ``relu`` an
    ``nn.ReLU`` after the layer or after its fused BatchNorm (applied by the
    layer, its backward keeping one bit per element). ``FusedBatchNorm2d``
    and ``FusedReLU`` markers take the fused modules' places: the
    BatchNorm's parameters and buffers stay where they were, under the same
    ``state_dict`` keys, ``train()`` / ``eval()`` reach them as before, and
    :func:`to_dense` puts the original modules back. Fusing twice changes
    nothing. ``swap_modules_with_sparse`` fuses the layers it swaps
    (``fuse=True``, ``fuse_relu=True``). An ``nn.BatchNorm2d`` after a
    dense ``nn.Conv2d`` (the network's first, or one the swap kept dense),
    with the ``nn.ReLU`` after it, becomes a ``BatchNormReLU2d``: the same
    passes, run by the BatchNorm module itself. With ``relu``, a residual
    block's end traced in its forward — a sparse convolution whose
    BatchNorm is fused, then the add of a residual, then a ReLU
    (torchvision's ``out += identity; out = self.relu(out)``) — runs in that
    BatchNorm's apply pass too: the block instance's forward is rewritten
    (its class, submodules and ``state_dict`` stay; ``to_dense`` restores
    the forward; a forward that branches on ``self.training`` is left alone).
    An ``nn.TransformerEncoderLayer`` with a sparse ``linear1`` or
    ``linear2`` is kept off torch's fused inference path, which would read
    their dense weights and run dense (``swap_modules_with_sparse`` and
    :func:`apply_swap_plan` do the same; :func:`to_dense` restores it);
    with ``relu`` and both swapped, its MLP (linear1 -> ReLU or GELU ->
    linear2) runs as one block as a traced one does, its ``_ff_block``
    rebound to the instance (:func:`to_dense` gives the class's back); an
    ``nn.TransformerDecoderLayer``'s likewise.

    >>> import torch
    >>> from qsparseprop import SparseConv2d, fuse
    >>> conv = SparseConv2d.from_dense(torch.nn.Conv2d(4, 4, 3, padding=1, bias=False))
    >>> net = fuse(torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4), torch.nn.ReLU()))
    >>> [type(m).__name__ for m in net]
    ['SparseConv2d', 'FusedBatchNorm2d', 'FusedReLU']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _fuse(model, None, batch_norm=True, relu=relu)
    return model


def _fuse(model: nn.Module, rows: dict[str, SwapDecision] | None, batch_norm: bool, relu: bool) -> None:
    """The fusions of :func:`fuse` for the sparse layers named in ``rows``
    (every sparse layer when None), recorded in their rows; and every
    TransformerEncoderLayer with a sparse layer kept off torch's fused path
    (what swap, plan and fuse all end with)."""
    _keep_sparse_layers_off_torchs_fast_path(model)
    _fuse_sequential(model, rows, batch_norm, relu)
    _fuse_traced(model, rows, batch_norm, relu)
    _fuse_traced_blocks(model, rows, residual_ends=batch_norm and relu)
    if relu:
        _fuse_traced_relus(model, rows)
        _fuse_linear_chains(model, rows)
        _fuse_transformer_mlps(model, rows)
    _record_places(model)


# torch's nn.TransformerEncoderLayer has an inference fast path
# (torch._transformer_encoder_layer_fwd: eval, autograd off, batch_first) that
# reads linear1.weight and linear2.weight itself: with sparse layers there it
# runs dense on the weights their property rebuilds on every call (slower than
# the dense original, and in fp32 where the layers are int8). Its checks
# leave the path where activation_relu_or_gelu is 0 (an activation it has no
# kernel for), and the layer's own forward then calls the layers; to_dense
# puts the value back.
_FAST_PATH_ACTIVATION = "_qsparseprop_fast_path_activation"


def _keep_sparse_layers_off_torchs_fast_path(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and (
            any(isinstance(getattr(mod, name, None), _SparseModule) for name in ("linear1", "linear2"))
            or isinstance(getattr(mod, "self_attn", None), ProjectedMultiheadAttention)
        ):
            mod.__dict__.setdefault(_FAST_PATH_ACTIVATION, mod.activation_relu_or_gelu)
            mod.activation_relu_or_gelu = 0


def _restore_torchs_fast_path(model: nn.Module) -> None:
    for mod in model.modules():
        if _FAST_PATH_ACTIVATION in mod.__dict__:
            mod.activation_relu_or_gelu = mod.__dict__.pop(_FAST_PATH_ACTIVATION)


def _plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is nn.Sequential's (children in order)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fuse_sequential(model: nn.Module, rows, batch_norm: bool, relu: bool) -> None:
    for seq_name, seq in list(model.named_modules()):
        if not _plain_sequential(seq):
            continue
        owner = {}  # id(FusedBatchNorm2d) -> the (name, layer) that applies it
        names = list(seq._modules)
        for name, next_name in zip(names, names[1:], strict=False):
            layer, nxt = seq._modules[name], seq._modules[next_name]  # as fused so far
            full = f"{seq_name}.{name}" if seq_name else name
            if isinstance(nxt, FusedBatchNorm2d) and isinstance(layer, SparseConv2d):
                if layer.__dict__.get("fused_batch_norm") is nxt:
                    owner[id(nxt)] = (full, layer)
                continue
            if _torch_conv_then_batch_norm(layer, nxt) and batch_norm:
                setattr(seq, next_name, BatchNormReLU2d.taking_over(nxt))
                continue
            if isinstance(layer, BatchNormReLU2d):
                if relu and _is_relu(nxt) and not layer.relu:
                    layer.relu = True
                    setattr(seq, next_name, _relu_marker(nxt, layer))
                continue
            if isinstance(layer, FusedBatchNorm2d):
                full, layer = owner.get(id(layer), (None, None))
            if layer is None or not isinstance(layer, _SparseModule) or (rows is not None and full not in rows):
                continue
            if (
                batch_norm
                and isinstance(layer, SparseConv2d)
                and _is_batch_norm(nxt)
                and nxt.num_features == layer.out_channels
                and layer.__dict__.get("fused_batch_norm") is None
                and not layer.fused_relu  # a ReLU before the BatchNorm
            ):
                marker = _applied_by(FusedBatchNorm2d.taking_over(nxt), layer)  # (its hooks stay)
                setattr(seq, next_name, marker)
                owner[id(marker)] = (full, layer)
                if rows is not None:
                    rows[full].fused_batch_norm = True
            elif relu and _is_relu(nxt) and not layer.fused_relu:
                layer.fused_relu = True
                setattr(seq, next_name, _relu_marker(nxt, layer))
                if rows is not None:
                    rows[full].fused_relu = True


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_dense_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d)


def _is_torch_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d  # subclasses (QAT, ...) may not be plain convolutions


def _torch_conv_then_batch_norm(layer: nn.Module, nxt: nn.Module) -> bool:
    """A dense nn.Conv2d with an nn.BatchNorm2d of its channels after it:
    the BatchNorm (and a ReLU after it) becomes a BatchNormReLU2d."""
    return _is_torch_conv(layer) and _is_batch_norm(nxt) and nxt.num_features == layer.out_channels


def _is_sparse_conv(m: nn.Module) -> bool:
    return isinstance(m, SparseConv2d)


def _is_batch_norm(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d  # subclasses may do more than normalise


def _is_relu(m: nn.Module) -> bool:
    return type(m) in (nn.ReLU, MaskedReLU)


def _called_once(model: nn.Module, parent: nn.Module, calls: dict, node, accept):
    """The module a traced node of ``parent`` calls, when ``accept`` takes it
    and it is called once, on one input, and reachable under one name."""
    if node.op != "call_module" or calls.get(node.target) != 1 or len(node.args) != 1 or node.kwargs:
        return None
    mod = parent.get_submodule(node.target)
    return mod if accept(mod) and len(_aliases(model, mod)) == 1 else None


def _module_calls(graph) -> dict[str, int]:
    """How many times a traced graph calls each module (by its path); a
    module whose tensors the forward reads directly counts as called twice,
    so that no fusion takes it."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":  # a module's tensors used directly: leave its modules alone
            calls[node.target.rpartition(".")[0]] = 2
    return calls


def _traced_chains(model: nn.Module, parent: nn.Module, is_conv) -> list[tuple[str, str, str | None]]:
    """(convolution, BatchNorm2d, ReLU or None) — child names — of each
    chain in ``parent``'s own forward, traced by torch.fx with the children
    as leaves, where a convolution (``is_conv``) feeds a BatchNorm2d alone
    and that feeds only a ReLU module (when there is one), each module
    called once, on that one input, and reachable under one name. Empty
    when the forward cannot be traced (data-dependent control flow and the
    like)."""
    try:
        graph = _ChildrenAsLeaves().trace(parent)
    except Exception:  # noqa: BLE001 - whatever fx cannot trace is not fused
        return []
    calls = _module_calls(graph)
    chains = []
    for node in graph.nodes:
        conv = _called_once(model, parent, calls, node, is_conv)
        if conv is None or len(node.users) != 1:
            continue
        (bn_node,) = node.users
        bn = _called_once(model, parent, calls, bn_node, _is_batch_norm)
        if bn is None or bn_node.args[0] is not node or bn.num_features != conv.out_channels:
            continue
        relu_target = None
        if len(bn_node.users) == 1:
            (relu_node,) = bn_node.users
            if _called_once(model, parent, calls, relu_node, _is_relu) is not None and relu_node.args[0] is bn_node:
                relu_target = relu_node.target
        chains.append((node.target, bn_node.target, relu_target))
    return chains


def _fuse_traced(model: nn.Module, rows, batch_norm: bool, relu: bool) -> None:
    """The same fusions where a module's own forward (not an nn.Sequential)
    calls a sparse convolution, then a BatchNorm2d on its output only, then
    possibly a ReLU module on that only — torchvision's BasicBlock and
    Bottleneck (see _traced_chains). A ReLU module the forward calls twice
    (torchvision's blocks) stays as it is."""
    if not batch_norm:
        return
    for parent_name, parent in list(model.named_modules()):
        if _plain_sequential(parent) or not any(_is_torch_conv(m) or _is_sparse_conv(m) for m in parent.children()):
            continue
        for _, bn_name, relu_name in _traced_chains(model, parent, _is_torch_conv):
            marker = BatchNormReLU2d.taking_over(parent.get_submodule(bn_name))
            _replace(parent, bn_name, marker)
            if relu and relu_name is not None:
                marker.relu = True
                _replace(parent, relu_name, _relu_marker(parent.get_submodule(relu_name), marker))
        for conv_name, bn_name, relu_name in _traced_chains(model, parent, _is_sparse_conv):
            conv = parent.get_submodule(conv_name)
            full = f"{parent_name}.{conv_name}" if parent_name else conv_name
            if (rows is not None and full not in rows) or conv.__dict__.get("fused_batch_norm") is not None:
                continue
            if conv.fused_relu:  # a ReLU applied before the BatchNorm
                continue
            marker = _applied_by(FusedBatchNorm2d.taking_over(parent.get_submodule(bn_name)), conv)
            _replace(parent, bn_name, marker)
            if rows is not None:
                rows[full].fused_batch_norm = True
            if relu and relu_name is not None:
                conv.fused_relu = True
                _replace(parent, relu_name, _relu_marker(parent.get_submodule(relu_name), conv))
                if rows is not None:
                    rows[full].fused_relu = True


def _fuse_traced_relus(model: nn.Module, rows) -> None:
    """Where a module's own forward (not an nn.Sequential: _fuse_sequential
    does those) calls a sparse layer, then a ReLU module on its output only
    (a transformer MLP's fc1 -> act), the layer applies the ReLU, as in a
    Sequential; each module called once and reachable under one name."""
    for parent_name, parent in list(model.named_modules()):
        if _plain_sequential(parent) or not any(isinstance(m, _SparseModule) for m in parent.children()):
            continue
        try:
            graph = _ChildrenAsLeaves().trace(parent)
        except Exception:  # noqa: BLE001 - whatever fx cannot trace is not fused
            continue
        calls = _module_calls(graph)
        for node in graph.nodes:
            layer = _called_once(model, parent, calls, node, lambda m: isinstance(m, _SparseModule))
            if layer is None or layer.fused_relu or layer.__dict__.get("fused_batch_norm") is not None:
                continue
            full = f"{parent_name}.{node.target}" if parent_name else node.target
            if len(node.users) != 1 or (rows is not None and full not in rows):
                continue
            (relu_node,) = node.users
            if _called_once(model, parent, calls, relu_node, _is_relu) is None or relu_node.args[0] is not node:
                continue
            layer.fused_relu = True
            _replace(parent, relu_node.target, _relu_marker(parent.get_submodule(relu_node.target), layer))
            if rows is not None:
                rows[full].fused_relu = True


# ---- residual block ends ------------------------------------------------------------
#
# A residual block ends with relu(bn(conv(x)) + shortcut) written in its own
# forward (torchvision's BasicBlock: `out += identity; out = self.relu(out)`).
# Once the BatchNorm is fused into the sparse convolution, the add and the
# ReLU can go into the BatchNorm's apply pass too (one pass over the block's
# output instead of three, and no fp32 sum kept): the block's forward is
# traced by torch.fx, the chain conv -> its FusedBatchNorm2d marker -> add ->
# ReLU replaced by one call of modules._conv_add_relu, and the rewritten
# forward bound to the block instance as `forward` (its class, submodules,
# parameters and state_dict keys stay as they are; a shared ReLU module stays
# too, only its call here is gone). to_dense deletes the instance's forward;
# a pickled block comes back with its class's forward (same results, torch's
# add and ReLU); deepcopy keeps the rewrite.

_FUSED_FORWARD = "_qsparseprop_fused_forward"  # the instance attribute marking a rewritten forward
_ADDS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.relu_)


class _SequentialsInlined(torch.fx.Tracer):
    """Traces a module's forward through its plain nn.Sequential children
    (whose forward only calls their children in order); every other
    submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not _plain_sequential(m)


def _is_residual_relu(node, parent: nn.Module) -> bool:
    """A ReLU of one input: a ReLU module, torch.relu(_), F.relu (in place
    or not: the sum it would overwrite is not used elsewhere), .relu(_)()."""
    if node.op == "call_module":
        return len(node.args) == 1 and not node.kwargs and _is_relu(parent.get_submodule(node.target))
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs


def _residual_ends(model: nn.Module, parent: nn.Module, graph, rows, parent_name: str):
    """(conv node, FusedBatchNorm2d node, add node, ReLU node, the other
    operand) of each residual end in ``parent``'s traced graph whose
    convolution is a sparse one applying its BatchNorm (not its ReLU),
    called once on one input and reachable under one name (as the chains
    of _traced_chains), each intermediate used once. An add of two such
    chains (a BasicBlock whose shortcut is a sparse convolution too) takes
    the first: the other chain's output is the residual."""
    calls = _module_calls(graph)
    ends = []
    for node in graph.nodes:
        conv = _called_once(model, parent, calls, node, _is_sparse_conv)
        if conv is None:
            continue
        full = f"{parent_name}.{node.target}" if parent_name else node.target
        marker = conv.__dict__.get("fused_batch_norm")
        if marker is None or conv.fused_relu or (rows is not None and full not in rows) or len(node.users) != 1:
            continue
        (bn_node,) = node.users
        if (
            bn_node.op != "call_module"
            or parent.get_submodule(bn_node.target) is not marker
            or bn_node.args != (node,)
            or len(bn_node.users) != 1
        ):
            continue
        (add_node,) = bn_node.users
        if add_node.op != "call_function" or add_node.target not in _ADDS or add_node.kwargs or len(add_node.args) != 2:
            continue
        other = add_node.args[1] if add_node.args[0] is bn_node else add_node.args[0]
        if not isinstance(other, torch.fx.Node) or other is bn_node or len(add_node.users) != 1:
            continue
        (relu_node,) = add_node.users
        if relu_node.args[:1] != (add_node,) or not _is_residual_relu(relu_node, parent):
            continue
        if any(add_node is end[2] for end in ends):
            continue
        ends.append((node, bn_node, add_node, relu_node, other, full))
    return ends


def _rewritten(module: nn.Module) -> bool:
    """Whether ``module`` runs a rewritten forward. Unpickled, it has its
    class's forward back under the instance attribute (pickle stores a bound
    method by name): not rewritten, and the stale entries go."""
    forward = module.__dict__.get("forward")
    if not module.__dict__.get(_FUSED_FORWARD, False) or forward is None:
        return False
    if getattr(forward, "__func__", None) is not type(module).forward:
        return True
    del module.__dict__[_FUSED_FORWARD], module.__dict__["forward"]
    return False


def _fuse_traced_blocks(model: nn.Module, rows, residual_ends: bool) -> None:
    """Rewrites the forward of each module whose traced forward holds a
    residual end (with ``residual_ends``: a sparse convolution applying its
    BatchNorm, the add, the ReLU; modules._conv_add_relu), two sparse
    convolutions reading one input, the second a strided 1x1 shortcut
    (modules._convs_sharing_input), or an s8 convolution's BatchNorm-ReLU
    output read by one s8 convolution alone (_deferred_batch_norms)."""
    for parent_name, parent in list(model.named_modules()):
        if _plain_sequential(parent) or _rewritten(parent):
            continue
        if not any(isinstance(m, SparseConv2d) for m in parent.modules() if m is not parent):
            continue
        graph = _graph_of_both_modes(parent)
        if graph is None:
            continue
        ends = _residual_ends(model, parent, graph, rows, parent_name) if residual_ends else []
        # a convolution taken as a residual end is not also paired: where the
        # block's second convolution stayed dense, the strided shortcut's
        # chain is the end (its call is gone once rewritten)
        taken = {end[0] for end in ends}
        pairs = [p for p in _shared_inputs(model, parent, graph, rows, parent_name) if not taken & set(p[:2])]
        for conv_node, bn_node, add_node, relu_node, other, full in ends:
            with graph.inserting_before(add_node):
                conv, batch_norm = graph.get_attr(conv_node.target), graph.get_attr(bn_node.target)
                relu = graph.get_attr(relu_node.target) if relu_node.op == "call_module" else None
                end = graph.call_function(_conv_add_relu, (conv, batch_norm, relu, conv_node.args[0], other))
            relu_node.replace_all_uses_with(end)
            for dead in (relu_node, add_node, bn_node, conv_node):
                graph.erase_node(dead)
            if rows is not None:
                rows[full].fused_residual = True
        for conv_node, shortcut_node, names in pairs:
            order = list(graph.nodes)
            with graph.inserting_before(min(conv_node, shortcut_node, key=order.index)):
                mods = [graph.get_attr(n.target) for n in (conv_node, shortcut_node)]
                both = graph.call_function(_convs_sharing_input, (*mods, conv_node.args[0]))
                outputs = [graph.call_function(operator.getitem, (both, i)) for i in (0, 1)]
            for node, out in zip((conv_node, shortcut_node), outputs, strict=True):
                node.replace_all_uses_with(out)
                graph.erase_node(node)
            if rows is not None:
                for full in names:
                    rows[full].fused_shared_input = True
        deferred = _deferred_batch_norms(model, parent, graph, rows, parent_name)
        for producer, markers, reader, full in deferred:
            _defer_batch_norm(graph, producer, markers, reader)
            if rows is not None:
                rows[full].fused_int8_activation = True
        if ends or pairs or deferred:
            _rewrite_forward(parent, graph)


# ---- a block's inner activation --------------------------------------------------------
#
# Inside a traced block, an s8 sparse convolution applying its BatchNorm,
# then a ReLU, whose output feeds one s8 sparse convolution alone: the two
# calls become modules._conv_deferring and modules._conv_reading_deferred
# (or the residual end's _conv_add_relu given the modules in between), so
# the BatchNorm writes the activation only as the reader's int8 input.


def _deferred_batch_norms(model: nn.Module, parent: nn.Module, graph, rows, parent_name: str):
    """(producer node, [BatchNorm marker node, ReLU node], reader node, the
    producer's name) of each such pair in ``parent``'s (rewritten) traced
    graph. The producer is a sparse s8 convolution's call (or the first
    output of modules._convs_sharing_input), called once and reachable under
    one name, applying its BatchNorm; its ReLU follows
    (_batch_norm_relu_after); each intermediate is used once; the reader is
    an s8 sparse convolution's call or a residual end's _conv_add_relu
    taking it as its input (not its residual)."""
    calls = _module_calls(graph)
    found, taken = [], set()  # a node in one pair only (conv -> conv -> conv: the first pair)
    for node in graph.nodes:
        conv, full = _deferring_producer(model, parent, calls, node, parent_name)
        if conv is None or node in taken or (rows is not None and full not in rows):
            continue
        markers = _batch_norm_relu_after(model, parent, calls, node, conv)
        if markers is None or len(markers[1].users) != 1:
            continue
        last = markers[1]
        (reader,) = last.users
        reads = _called_once(model, parent, calls, reader, _is_sparse_conv)
        if (reads is not None and reader.args == (last,) and reads.scheme == "s8" and not reads._subsampled()) or (
            reader.op == "call_function" and reader.target is _conv_add_relu and reader.args[3] is last
            and reader.args[4] is not last and not reader.kwargs
        ):  # fmt: skip
            found.append((node, markers, reader, full))
            taken.update((node, reader))
    return found


def _batch_norm_relu_after(model: nn.Module, parent: nn.Module, calls: dict, node, conv: SparseConv2d):
    """[BatchNorm marker node, ReLU node] reading ``node``'s output in turn,
    each alone: ``conv``'s fused BatchNorm's marker, then its fused ReLU's
    marker, or a ReLU module where ``conv`` applies none (a block's ReLU
    called again after its add, torchvision's BasicBlock); else None."""
    if len(node.users) != 1:
        return None
    (bn_node,) = node.users
    marker = _called_once(model, parent, calls, bn_node, lambda m: type(m) is FusedBatchNorm2d)
    if marker is not conv.__dict__.get("fused_batch_norm") or bn_node.args != (node,) or len(bn_node.users) != 1:
        return None
    (relu_node,) = bn_node.users
    if relu_node.op != "call_module" or relu_node.args != (bn_node,) or relu_node.kwargs:
        return None
    relu = parent.get_submodule(relu_node.target)
    if conv.fused_relu:
        fits = _called_once(model, parent, calls, relu_node, lambda m: type(m) is FusedReLU) is not None
    else:
        fits = type(relu) in (nn.ReLU, MaskedReLU) and len(_aliases(model, relu)) == 1
    return [bn_node, relu_node] if fits else None


def _deferring_producer(model: nn.Module, parent: nn.Module, calls: dict, node, parent_name: str):
    """(the s8 sparse convolution applying its BatchNorm and ReLU whose
    output ``node`` is, its name) or (None, "")."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        both = node.args[0]
        if not (isinstance(both, torch.fx.Node) and both.target is _convs_sharing_input and not both.kwargs):
            return None, ""
        full = both.args[0].target  # the get_attr of the pair's first convolution
        conv = parent.get_submodule(full)
        full = f"{parent_name}.{full}" if parent_name else full
    else:
        conv = _called_once(model, parent, calls, node, _is_sparse_conv)
        if conv is None:
            return None, ""
        full = f"{parent_name}.{node.target}" if parent_name else node.target
    fits = conv.scheme == "s8" and conv.__dict__.get("fused_batch_norm") is not None
    return (conv, full) if fits and not conv._subsampled() else (None, "")


def _defer_batch_norm(graph, producer, markers: list, reader) -> None:
    """Rewrites one pair _deferred_batch_norms found."""
    with graph.inserting_before(reader):
        attrs = tuple(graph.get_attr(m.target) for m in markers)
    if producer.op == "call_module":
        with graph.inserting_before(producer):
            conv = graph.get_attr(producer.target)
            out = graph.call_function(_conv_deferring, (conv, producer.args[0]))
        producer.replace_all_uses_with(out)
        graph.erase_node(producer)
    else:  # the first output of the pair sharing its input
        out = producer
        producer.args[0].kwargs = {"defer_first": True}
    if reader.op == "call_module":
        with graph.inserting_before(reader):
            conv = graph.get_attr(reader.target)
            read = graph.call_function(_conv_reading_deferred, (conv, attrs, out))
        reader.replace_all_uses_with(read)
        graph.erase_node(reader)
    else:
        reader.args = (*reader.args[:3], out, reader.args[4])
        reader.kwargs = {"markers": attrs}
    for marker in reversed(markers):
        graph.erase_node(marker)


def _shared_inputs(model: nn.Module, parent: nn.Module, graph, rows, parent_name: str):
    """(convolution node, shortcut node, both names) of each pair of sparse
    convolutions in ``parent``'s traced graph that read one input, the
    second a strided 1x1 reading its subsample (modules._shares_input_with:
    a residual block's first convolution and its downsample), each called
    once on that input and reachable under one name. An input read by more
    than one such convolution besides the shortcut is left alone."""
    calls = _module_calls(graph)
    pairs = []
    for node in graph.nodes:
        readers = []
        for user in node.users:
            conv = _called_once(model, parent, calls, user, _is_sparse_conv)
            if conv is None or user.args != (node,):
                continue
            full = f"{parent_name}.{user.target}" if parent_name else user.target
            if rows is None or full in rows:
                readers.append((user, conv, full))
        shortcuts = [r for r in readers if r[1]._subsampled()]
        convs = [r for r in readers if not r[1]._subsampled()]
        if len(shortcuts) == 1 and len(convs) == 1 and _shares_input_with(convs[0][1], shortcuts[0][1]):
            pairs.append((convs[0][0], shortcuts[0][0], (convs[0][2], shortcuts[0][2])))
    return pairs


def _graph_of_both_modes(parent: nn.Module):
    """``parent``'s forward traced (its plain nn.Sequential children
    inlined), or None where fx cannot trace it or it traces differently in
    train and eval mode: a forward that branches on self.training (traced as
    a constant) is left as it is. Each module's own mode (a BatchNorm kept
    in eval inside a training model) is put back."""
    modes = [(m, m.training) for m in parent.modules()]
    graphs = []
    try:
        for training in (True, False):
            parent.train(training)
            graphs.append(_SequentialsInlined().trace(parent))
    except Exception:  # noqa: BLE001 - whatever fx cannot trace is not rewritten
        return None
    finally:
        for m, training in modes:
            m.training = training
    return graphs[0] if str(graphs[0]) == str(graphs[1]) else None


def _rewrite_forward(parent: nn.Module, graph) -> None:
    """Binds the edited graph's code to this instance as its forward (its
    class, submodules and state_dict stay; to_dense takes it back)."""
    graph.lint()
    code = torch.fx.GraphModule(parent, graph)
    object.__setattr__(parent, "forward", types.MethodType(type(code).forward, parent))
    object.__setattr__(parent, _FUSED_FORWARD, True)


def _is_sparse_linear(m: nn.Module) -> bool:
    return type(m) in (SparseLinear, QuantizedSparseLinear)


def _linear_chains(model: nn.Module, parent: nn.Module, graph, rows, parent_name: str):
    """(first node, activation node, second node, the first's name, the
    nodes between activation and second) of each Linear -> activation ->
    Linear in ``parent``'s traced graph: two swapped Linear layers (f32 or
    s8) with, between them, the marker of the first's fused ReLU or an
    ``nn.GELU`` module (modules._chain_activation), then any
    ``nn.Dropout`` / ``nn.Identity`` modules (a timm-style MLP's drop and
    norm; the block runs while each is the identity), each called once on
    one input and reachable under one name, each intermediate used once."""
    calls = _module_calls(graph)
    chains = []
    for node in graph.nodes:
        first = _called_once(model, parent, calls, node, _is_sparse_linear)
        if first is None or len(node.users) != 1:
            continue
        full = f"{parent_name}.{node.target}" if parent_name else node.target
        if rows is not None and full not in rows:
            continue
        (marker_node,) = node.users
        act = _called_once(model, parent, calls, marker_node, lambda m: True)
        if act is None or not _chain_activation(first, act)[0]:
            continue
        if marker_node.args != (node,) or len(marker_node.users) != 1:
            continue
        between, last = [], marker_node
        (second_node,) = marker_node.users
        while _called_once(model, parent, calls, second_node, _passes_through) and second_node.args == (last,):
            if len(second_node.users) != 1:
                break
            between.append(second_node)
            last = second_node
            (second_node,) = second_node.users
        second = _called_once(model, parent, calls, second_node, _is_sparse_linear)
        if second is None or second_node.args != (last,) or not _mlp_pair(first, second):
            continue
        if any(node is c[2] for c in chains):  # a layer ends one chain or starts one, not both
            continue
        chains.append((node, marker_node, second_node, full, between))
    return chains


def _fuse_linear_chains(model: nn.Module, rows) -> None:
    """Rewrites the forward of each module (a plain nn.Sequential included)
    whose traced forward holds a Linear -> ReLU or GELU -> Linear of swapped
    layers: the two run as one (modules._linear_act_linear), the hidden
    activation in the kernels' layout between them. A module already
    rewritten (a residual block) is left as it is."""
    for parent_name, parent in list(model.named_modules()):
        if _rewritten(parent):
            continue
        if sum(_is_sparse_linear(m) for m in parent.modules() if m is not parent) < 2:
            continue
        graph = _graph_of_both_modes(parent)
        if graph is None:
            continue
        chains = _linear_chains(model, parent, graph, rows, parent_name)
        if not chains:
            continue
        for first_node, marker_node, second_node, full, between in chains:
            with graph.inserting_before(second_node):
                mods = [graph.get_attr(n.target) for n in (first_node, marker_node, second_node)]
                rest = [graph.get_attr(n.target) for n in between]
                both = graph.call_function(_linear_act_linear, (*mods, first_node.args[0], *rest))
            second_node.replace_all_uses_with(both)
            for dead in (second_node, *reversed(between), marker_node, first_node):
                graph.erase_node(dead)
            if rows is not None:
                rows[full].fused_kept_layout = True
        _rewrite_forward(parent, graph)


def _fuse_transformer_mlps(model: nn.Module, rows) -> None:
    """Binds modules._transformer_ff_block to each of torch's
    ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``
    (whose class keeps torch's ``_ff_block``) with swapped ``linear1`` and
    ``linear2`` and a ReLU or GELU activation: its MLP runs as one block, the
    hidden activation in the kernels' layout (int8: no fp32 copy of it kept
    for the backward). fx cannot trace these layers' forward (it branches on
    its inputs), so _fuse_linear_chains never sees them."""
    for name, mod in model.named_modules():
        cls = next((c for c, _ in _TRANSFORMER_LAYERS if isinstance(mod, c)), None)
        if cls is None or type(mod)._ff_block is not cls._ff_block:  # (a subclass's own MLP)
            continue
        first, second = getattr(mod, "linear1", None), getattr(mod, "linear2", None)
        if not _mlp_pair(first, second):
            continue
        full = f"{name}.linear1" if name else "linear1"
        if (rows is not None and full not in rows) or not _transformer_activation(mod.activation)[0]:
            continue
        if getattr(mod.__dict__.get("_ff_block"), "__func__", None) is not _transformer_ff_block:  # (fused once)
            object.__setattr__(mod, "_ff_block", types.MethodType(_transformer_ff_block, mod))
        if rows is not None:
            rows[full].fused_kept_layout = True


def _unfuse_traced_blocks(model: nn.Module) -> None:
    """Gives each rewritten block its class's forward back (a transformer
    layer its class's _ff_block)."""
    for mod in model.modules():
        if mod.__dict__.pop(_FUSED_FORWARD, False):
            mod.__dict__.pop("forward", None)
        if "_ff_block" in mod.__dict__ and isinstance(mod, tuple(c for c, _ in _TRANSFORMER_LAYERS)):
            del mod.__dict__["_ff_block"]  # (ours, or the class's one an unpickled layer got)


def use_masked_relus(model: nn.Module) -> nn.Module:
    """Replaces every ``nn.ReLU`` of ``model`` (in place; returns it) by a
    :class:`MaskedReLU`: same values and gradients, its backward keeps one
    bit per element instead of the fp32 output. Where the ReLU's output feeds
    an int8 sparse layer (a Conv-BN-ReLU-Conv chain), that layer's int8 copy
    is then the only saved form of the activation. ``to_dense`` turns them
    back into ``nn.ReLU``.

    >>> import torch
    >>> from qsparseprop import use_masked_relus
    >>> net = use_masked_relus(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> type(net[1]).__name__
    'MaskedReLU'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.ReLU:
        return MaskedReLU(model.inplace)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.ReLU:  # subclasses may do more than relu
            _replace(model, name, _with_hooks_of(MaskedReLU(mod.inplace), mod))
    return model


# ---- plans -------------------------------------------------------------------------


def save_swap_plan(report: list[SwapDecision] | nn.Module, path: str | os.PathLike) -> None:
    """Writes a swap report (or a swapped model's) as JSON for ``plan=``."""
    if isinstance(report, nn.Module):
        report = report.qsparseprop_swap_report
    with open(path, "w") as f:
        json.dump({"version": _PLAN_VERSION, "layers": [dataclasses.asdict(r) for r in report]}, f, indent=1)


def load_swap_plan(path: str | os.PathLike) -> list[SwapDecision]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("version") != _PLAN_VERSION or not isinstance(data.get("layers"), list):
        raise ValueError(f"{path}: not a qsparseprop swap plan (version {_PLAN_VERSION})")
    return _as_decisions(data["layers"])


def _as_decisions(plan) -> list[SwapDecision]:
    if isinstance(plan, (str, os.PathLike)):
        return load_swap_plan(plan)
    fields = {f.name for f in dataclasses.fields(SwapDecision)}
    out = []
    for entry in plan:
        if isinstance(entry, SwapDecision):
            out.append(entry)
        elif isinstance(entry, dict) and fields.issuperset(entry) and "name" in entry:
            e = dict(entry)
            e["input_shape"] = tuple(e.get("input_shape", ()))
            out.append(SwapDecision(**e))
        else:
            raise ValueError(f"a swap plan entry must be a SwapDecision or its dict, got {entry!r}")
    return out


def apply_swap_plan(
    model: nn.Module,
    plan,
    state_dict: dict | None = None,
    strict: bool = True,
    verbose: bool = False,
    mask_kept: bool = True,
) -> nn.Module:
    """Makes the swaps a plan recorded, in place, without timing. The pattern
    of each swapped layer comes from the model's (pruned) weights, or, with
    ``state_dict`` (a swapped model's checkpoint), from the checkpoint, which
    is then loaded: a swapped model rebuilt from its dense architecture.
    ``strict``: the recomputed pattern must have the plan's hash.
    ``mask_kept``: as in :func:`swap_modules_with_sparse`, the layers the plan
    keeps dense get their pattern as a pruning mask (so every rank of a job
    has the same parameters)."""
    decisions = _as_decisions(plan)
    for d in decisions:  # an attention whose projection the plan swaps gets projections of its own first
        parent, _, child = d.name.rpartition(".")
        if d.swapped and child in _PROJECTIONS and parent and type(_submodule(model, parent)) is nn.MultiheadAttention:
            _project_attention(model, parent)
    for d in decisions:
        if not d.swapped:
            continue
        try:
            mod = model.get_submodule(d.name)
        except AttributeError:
            raise ValueError(f"swap plan: the model has no layer {d.name!r}") from None
        if type(mod).__name__ != d.kind or not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"swap plan: {d.name} is a {type(mod).__name__}, the plan recorded a {d.kind}")
        cls = _sparse_class(mod, d.scheme or "s8")
        if state_dict is not None:
            sparse = _from_checkpoint(cls, mod, state_dict, d.name)
        else:
            sparse = cls.from_dense(mod, seed=_layer_seed(d.name))
        sparse.train(mod.training)
        if strict and d.pattern_hash and _pattern_hash(sparse) != d.pattern_hash:
            raise ValueError(
                f"swap plan: {d.name}'s pattern differs from the plan's (hash {_pattern_hash(sparse)} vs "
                f"{d.pattern_hash}): pruned differently? (strict=False swaps anyway)"
            )
        _replace(model, d.name, _taking_hooks_of(sparse, mod))
    fused = {  # the block's flag recomputed: set again where the rewrite finds the block
        d.name: dataclasses.replace(d, fused_kept_layout=False, fused_shared_input=False, fused_int8_activation=False)
        for d in decisions
        if d.swapped
        and (
            d.fused_relu or d.fused_batch_norm or d.fused_kept_layout or d.fused_shared_input or d.fused_int8_activation
        )
    }
    _fuse(model, fused, batch_norm=True, relu=True)
    for d in (d for d in decisions if d.name in fused):  # the plan's flags against what was found
        layer = model.get_submodule(d.name)
        if d.fused_batch_norm and layer.__dict__.get("fused_batch_norm") is None:
            raise ValueError(f"swap plan: {d.name} had its BatchNorm fused, but no nn.BatchNorm2d follows it here")
        if d.fused_relu and not layer.fused_relu:
            raise ValueError(f"swap plan: {d.name} had its ReLU fused, but no nn.ReLU follows it here")
        if d.fused_kept_layout and not fused[d.name].fused_kept_layout:
            raise ValueError(
                f"swap plan: {d.name} ran as one block with the next Linear, but no swapped Linear follows "
                "it here after a ReLU or GELU"
            )
        if d.fused_shared_input and not fused[d.name].fused_shared_input:
            raise ValueError(
                f"swap plan: {d.name} ran as one function with another swapped convolution reading its input "
                "(a strided 1x1 shortcut), but no such pair reads it here"
            )
        if d.fused_int8_activation and not fused[d.name].fused_int8_activation:
            raise ValueError(
                f"swap plan: {d.name}'s BatchNorm + ReLU output went to one swapped int8 convolution alone (as "
                "its int8 input), but no such convolution alone reads it here"
            )
    if mask_kept:
        _mask_kept_layers(model, decisions, state_dict)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.qsparseprop_swap_report = decisions
    if verbose:
        print(format_swap_report(decisions))
    return model


def _from_checkpoint(cls, mod: nn.Module, state_dict: dict, name: str) -> _SparseModule:
    keys = {k: f"{name}.{k}" for k in ("row_ptr", "col_idx", "values", "bias")}
    missing = [keys[k] for k in ("row_ptr", "col_idx", "values") if keys[k] not in state_dict]
    if missing:
        raise ValueError(f"swap plan: the state_dict has no {', '.join(missing)} (not a swapped model's?)")
    rp, ci, values = (state_dict[keys[k]] for k in ("row_ptr", "col_idx", "values"))
    bias = state_dict.get(keys["bias"])
    seed = _layer_seed(name)
    if isinstance(mod, nn.Linear):
        return cls(mod.in_features, mod.out_features, rp, ci, values, bias, seed=seed)
    return cls(
        mod.in_channels, mod.out_channels, mod.kernel_size, rp, ci, values, bias, mod.stride, mod.padding,
        mod.dilation, mod.groups, seed=seed,
    )  # fmt: skip


# ---- back to dense -----------------------------------------------------------------


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An ordinary torch model: every sparse layer replaced by the dense
    ``nn.Linear`` / ``nn.Conv2d`` with its (fine-tuned) weights, zeros where
    pruned; the pruning masks the swap gave kept-dense layers and
    attentions (``mask_kept``) removed the same way (``prune.remove``: plain
    weights, the zeros in place; masks of your own stay). ``torch.export``,
    ONNX and TorchScript take the result.

    >>> import torch
    >>> from qsparseprop import SparseLinear, to_dense
    >>> net = torch.nn.Sequential(SparseLinear.from_dense(torch.nn.Linear(4, 2)))
    >>> type(to_dense(net)[0]).__name__
    'Linear'
    """
    if isinstance(model, _SparseModule):
        dense = model.to_dense().train(model.training)
        bn = model.__dict__.get("fused_batch_norm")
        after = ([copy.deepcopy(bn.to_batch_norm())] if bn is not None else []) + (
            [nn.ReLU()] if model.fused_relu else []
        )
        return nn.Sequential(dense, *after) if after else dense
    target = model if inplace else copy.deepcopy(model)
    _unfuse_traced_blocks(target)
    _restore_torchs_fast_path(target)
    for name, mod in list(target.named_modules()):
        if isinstance(mod, FusedReLU):
            _replace(target, name, _with_hooks_of(nn.ReLU(), mod))  # the ReLU back where it stood
        elif isinstance(mod, (FusedBatchNorm2d, BatchNormReLU2d)):
            _replace(target, name, mod.to_batch_norm())
        elif isinstance(mod, MaskedReLU):
            _replace(target, name, _with_hooks_of(nn.ReLU(mod.inplace), mod))
    for name, mod in list(target.named_modules()):
        if isinstance(mod, _SparseModule):
            _replace(target, name, _with_hooks_of(mod.to_dense().train(mod.training), mod))
    _remove_kept_masks(target)
    for name, mod in list(target.named_modules()):
        if name and isinstance(mod, ProjectedMultiheadAttention):
            _replace(target, name, mod.to_attention())
    if isinstance(target, ProjectedMultiheadAttention):
        target = target.to_attention()
    if hasattr(target, "qsparseprop_swap_report"):
        del target.qsparseprop_swap_report
    return target


def _remove_kept_masks(model: nn.Module) -> None:
    """The pruning masks the swap put on kept-dense layers and attentions
    removed (``prune.remove``: plain parameters, the zeros in place, as they
    were before the swap), then each attention's out_proj hook where out_proj
    holds no mask any more. torch's pruning hooks are no TorchScript
    (jit.script failed on ``'_KeptPattern' object has no attribute
    '__name__'``); masks of the user's own stay."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if type(hook) is _KeptPattern:
                prune.remove(module, hook._tensor_name)
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and not prune.is_pruned(module.out_proj):
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _refresh_out_proj:
                    del module._forward_pre_hooks[key]


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


# What a swapped layer runs with it, as the table says it (SwapDecision's flags)
_FUSION_WORDS = (
    ("fused_batch_norm", "its BatchNorm"), ("fused_residual", "the residual add"), ("fused_relu", "its ReLU"),
    ("fused_kept_layout", "one block with the next Linear"),
    ("fused_shared_input", "one call with the convolution sharing its input"),
    ("fused_int8_activation", "its BatchNorm writing the next convolution's int8 input"),
)  # fmt: skip


def format_swap_report(report: list[SwapDecision]) -> str:
    """The verbose table of ``swap_modules_with_sparse``: each candidate, its
    timings, the decision and why, and what a swapped layer runs fused."""
    # the columns as wide as their longest entry (an attention's projection: a long name and
    # kind, "layers.0.self_attn.out_proj", "NonDynamicallyQuantizableLinear")
    name_w = max([24] + [len(r.name) for r in report])
    kind_w = max([8] + [len(r.kind) for r in report])
    head = (
        f"{'layer':<{name_w}} {'kind':<{kind_w}} {'input shape':<20} {'sparsity':>8} {'dense ms':>9} "
        f"{'sparse ms':>9}  decision"
    )
    lines = [head, "-" * len(head)]
    for r in report:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        fused = [words for flag, words in _FUSION_WORDS if getattr(r, flag)]
        lines.append(
            f"{r.name:<{name_w}} {r.kind:<{kind_w}} {str(r.input_shape):<20} {r.sparsity:>8.3f} {fmt(r.dense_ms):>9} "
            f"{fmt(r.sparse_ms):>9}  {'swap' if r.swapped else 'keep'}{' ' + r.scheme if r.swapped else ''} "
            f"({r.reason})" + (f"; fused: {', '.join(fused)}" if fused else "")
        )
    return "\n".join(lines)
