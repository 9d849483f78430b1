"""Sparse layers: drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

The trainable parameters are the nonzero values (``values``, an
``nn.Parameter`` of nnz elements); the pattern lives in int buffers
(``row_ptr``, ``col_idx``), so ``state_dict``, ``.to()``, ``deepcopy`` and
pickling work as for any module, and pruned weights stay exactly zero for
the whole fine-tune (they have no parameter to update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops

_SCHEMES = ("f32", "s8")
_SEED_MASK = (1 << 63) - 1


# ---- pattern extraction ----------------------------------------------------------


def _mask_and_weight(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The pruning mask (if the module has one) and the effective weight.

    Understands ``torch.nn.utils.prune`` (``weight_orig`` * ``weight_mask``)
    and parametrizations with a ``mask`` attribute (``torch.ao.pruning``'s
    FakeSparsity); otherwise there is no mask and the nonzeros define the
    pattern.
    """
    weight = module.weight.detach()
    mask = getattr(module, "weight_mask", None)
    if mask is None and hasattr(module, "parametrizations") and "weight" in module.parametrizations:
        for p in module.parametrizations["weight"]:
            if hasattr(p, "mask"):
                mask = p.mask if mask is None else mask * p.mask
    return (None if mask is None else mask.detach() != 0), weight


def _csr_from(weight2d: torch.Tensor, mask2d: torch.Tensor | None, threshold: float):
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    w = weight2d.detach().to(torch.float32).contiguous()
    if mask2d is not None:
        row_ptr, col_idx = _ops._C.csr_from_mask(mask2d.to(torch.uint8).contiguous().numpy())
    else:
        row_ptr, col_idx = _ops._C.csr_from_dense(w.numpy(), float(threshold))
    row_ptr = torch.from_numpy(row_ptr)
    col_idx = torch.from_numpy(col_idx)
    rows = torch.repeat_interleave(torch.arange(w.shape[0]), row_ptr.diff())
    values = w[rows, col_idx.long()].clone()
    return row_ptr, col_idx, values


def _as_index_tensor(t, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        info = torch.iinfo(dtype)
        if t.numel() and (int(t.min()) < info.min or int(t.max()) > info.max):
            raise ValueError(f"{name} has values outside the {dtype} range")
    return t.to(device="cpu", dtype=dtype).contiguous()


# ---- shared base ----------------------------------------------------------------


class FusedReLU(nn.Identity):
    """Where an ``nn.ReLU`` stood after a sparse layer that now applies it
    itself (``fused_relu``): a marker, so ``to_dense`` can put the ReLU back.
    While a hook is there to see the calls (on the layer, on a marker of
    what it applies, or a global one) the layer computes its own output
    alone and this marker the ReLU, as unfused (``_observed``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        layer = self.__dict__.get("applied_by")
        return torch.relu(input) if layer is not None and _observed(layer) else input


# The forward and backward hooks a module holds, as torch keeps them: one
# module taking another's place takes these very dicts, so the hooks stay
# and their handles still remove them.
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
)  # fmt: skip


def _with_hooks_of(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` (a module just made, without hooks), holding ``old``'s forward
    and backward hooks."""
    for k in _HOOK_DICTS:
        if k in old.__dict__:
            new.__dict__[k] = old.__dict__[k]
    return new


def _applied_by(marker: nn.Module, layer: nn.Module) -> nn.Module:
    """Links a marker (FusedBatchNorm2d, FusedReLU) and the layer that
    applies what it stands for: references, not submodules."""
    marker.__dict__["applied_by"] = layer
    if isinstance(marker, FusedReLU):
        layer.__dict__["fused_relu_marker"] = marker
    else:
        object.__setattr__(layer, "fused_batch_norm", marker)
    return marker


def _relu_marker(relu: nn.Module, layer: nn.Module) -> FusedReLU:
    """The marker taking ``relu``'s place (with its hooks) once ``layer``
    applies the ReLU."""
    return _applied_by(_with_hooks_of(FusedReLU(), relu), layer)


def _record_places(model: nn.Module) -> None:
    """Notes in every module of a fusion (a layer applying what markers
    stand for, the markers) where it stands in ``model``: each (parent,
    name) it is reachable under. A module put in its place later (torch's
    convert_sync_batchnorm, a frozen BatchNorm, another activation, the
    layer turned dense) then takes the place: see _observed."""
    places: dict[int, tuple[nn.Module, list]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            d = child.__dict__ if child is not None else {}
            if "applied_by" in d or "fused_batch_norm" in d or "fused_relu_marker" in d:
                places.setdefault(id(child), (child, []))[1].append((parent, name))
    for child, where in places.values():
        child.__dict__["fused_at"] = tuple(where)


def _in_place(module: nn.Module) -> bool:
    for parent, name in module.__dict__.get("fused_at", ()):
        if parent._modules.get(name) is not module:
            return False
    return True


def _observed(layer: nn.Module) -> bool:
    """Whether a hook is there to see the calls of ``layer`` or of the
    markers of what it applies (a fused BatchNorm, a fused ReLU), or a
    global one: the layer then computes its own output alone, as torch's
    module would, and the markers compute what they stand for, so each
    hook sees the values the unfused model gives it. Attribute reads only.
    The same where the layer or a marker no longer stands where the fusion
    found it (a module was put in its place: that module computes what it
    computes, the layer or marker left in the model what it stands for),
    and under a torch.func transform (it follows torch's BatchNorm and
    ReLU, not the fused passes)."""
    if _ops.transformed():
        return True
    d = layer.__dict__
    for m in (layer, d.get("fused_batch_norm"), d.get("fused_relu_marker")):  # asked on every call: no generator
        if m is not None and not (_called_plainly(m) and _in_place(m)):
            return True
    return False


class _TakenOverBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` subclass made from one: the very same
    parameters and buffers under the same ``state_dict`` keys, so
    checkpoints, optimizers and ``train()`` / ``eval()`` treat it as the
    BatchNorm it was; ``to_dense`` puts an ``nn.BatchNorm2d`` back."""

    @classmethod
    def taking_over(cls, bn: nn.BatchNorm2d):
        """An instance holding ``bn``'s very parameters and buffers."""
        return _moved_into(cls.__new__(cls), bn)

    def to_batch_norm(self) -> nn.BatchNorm2d:
        """An ``nn.BatchNorm2d`` holding this module's parameters and buffers."""
        bn = _moved_into(nn.BatchNorm2d.__new__(nn.BatchNorm2d), self)
        for k in ("relu", "applied_by", "fused_relu_marker", "fused_at"):
            bn.__dict__.pop(k, None)
        return bn


class FusedBatchNorm2d(_TakenOverBatchNorm2d):
    """Where an ``nn.BatchNorm2d`` stood after a sparse convolution that now
    applies it itself (``qsparseprop.fuse``): its own forward passes the
    input through (the convolution before it has already normalised) — but
    while a hook is there to see the calls the convolution computes its own
    output alone and this module the BatchNorm (nn.BatchNorm2d's), as
    unfused (``_observed``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        layer = self.__dict__.get("applied_by")
        return super().forward(input) if layer is not None and _observed(layer) else input


class BatchNormReLU2d(_TakenOverBatchNorm2d):
    """An ``nn.BatchNorm2d`` after a layer of torch's own (a dense
    convolution: the network's first, or one the swap kept dense), computed
    by the sparse blocks' BatchNorm passes (``qsparseprop.fuse``): one
    statistics pass and one apply pass forward, two passes backward, and
    with ``relu`` the ``nn.ReLU`` after it too (a ``FusedReLU`` marks where
    it stood), its backward keeping one bit per element. The arithmetic,
    statistics and running-statistics rules are those of the fused blocks
    (BatchNorm2d's, within float rounding); an input that is not
    NCHW-contiguous (channels_last) or not float32 goes through torch's
    BatchNorm2d and ReLU, keeping its layout."""

    relu = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        relu = self.relu and not _observed(self)  # observed: its ReLU marker applies it
        if input.is_contiguous():
            return _batch_norm_after(self, input, relu)
        z = super().forward(input)
        return torch.relu(z) if relu else z

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


def _moved_into(target: nn.Module, source: nn.Module) -> nn.Module:
    # The same tensors (not copies): an optimizer built before the fusion
    # keeps updating them, and hooks on them stay.
    nn.Module.__init__(target)
    containers = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
    target.__dict__.update({k: v for k, v in source.__dict__.items() if k not in containers})  # training, eps, ...
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
    return target


class MaskedReLU(nn.Module):
    """``nn.ReLU`` whose backward keeps one bit per element (where the input
    was > 0) instead of the float output: same values and gradients, 1/32 of
    the activation memory. It pays where the output feeds an int8 sparse
    layer (which keeps only an int8 copy of it) or nothing that saves it
    (pooling, a residual add); before a dense layer, which saves its input
    anyway, it costs the bits. ``use_masked_relus(model)`` swaps them in,
    ``to_dense(model)`` back. ``inplace`` is accepted as nn.ReLU's and
    ignored: the output is always a new tensor (the input is not modified)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _ops.relu_bits(input)


def _rounding_step_from(value, key: str) -> int | None:
    """A checkpoint's step count (None: not in it), checked: an integer
    scalar tensor (or int) in [0, 2**63)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool or value.numel() != 1:
            raise TypeError(f"{key} must be one integer (the training steps taken), got {value.dtype} of shape "
                            f"{tuple(value.shape)}")  # fmt: skip
        value = int(value.reshape(()).item())
    elif not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be one integer (the training steps taken), got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{key} must be in [0, 2**63) (the training steps taken), got {value}")
    return value


def _torchscript_refusal(name: str, what: str) -> str:
    return (
        f"{name}: {what} qsparseprop's layers (their kernels run outside TorchScript): use "
        "qsparseprop.to_dense(model), the same model with dense layers, or torch.export / torch.compile, "
        "which take the layers as custom ops"
    )


class _SparseModule(nn.Module):
    """Pattern buffers, values parameter, kernel lifetime and input checks."""

    scheme = "f32"
    prototype = False
    # relu applied to the output, its backward keeping one bit per element
    # (swap_modules_with_sparse sets it where an nn.ReLU follows the layer)
    fused_relu = False

    def _init_sparse(self, rows, cols, row_ptr, col_idx, values, bias, seed: int):
        row_ptr = _as_index_tensor(row_ptr, "row_ptr", torch.int64)
        col_idx = _as_index_tensor(col_idx, "col_idx", torch.int32)
        _ops._C.validate_csr(rows, cols, row_ptr.numpy(), col_idx.numpy())  # ValueError if malformed
        values = torch.as_tensor(values)
        if not values.is_floating_point():
            raise TypeError(f"values must be a floating tensor, got dtype {values.dtype}")
        if values.shape != (col_idx.numel(),):
            raise ValueError(
                f"values must have shape ({col_idx.numel()},) (one per column index), got {tuple(values.shape)}"
            )
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.values = nn.Parameter(values.detach().to(torch.float32).clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            bias = torch.as_tensor(bias)
            if bias.shape != (rows,):
                raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().to(torch.float32).clone())
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        # Training steps taken, each its own int8 rounding stream (a tensor:
        # torch.compile traces its increment instead of recompiling for every
        # new Python value; in the state_dict, so a run resumed from a
        # checkpoint goes on with the streams it would have drawn), and the
        # slot of the layer's C++ kernel in the ops' cache (_ops.py).
        self.register_buffer("rounding_step", torch.zeros((), dtype=torch.int64, device="cpu"))
        self.register_buffer("_handle", _ops.new_handle(self), persistent=False)

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        total = self._rows() * self._cols()
        return self.nnz / total if total else 0.0

    def _rows(self) -> int:
        raise NotImplementedError

    def _cols(self) -> int:
        raise NotImplementedError

    def _kernel_key(self) -> tuple:
        raise NotImplementedError

    def _kernel(self):
        """The layer's C++ kernel (built on first use; rebuilt when the
        pattern or the geometry changed): for introspection, e.g.
        ``layer._kernel().implementations(...)``."""
        return _ops.kernel_for(self._handle, self._kernel_key(), self.row_ptr, self.col_idx)

    def _next_seed(self) -> torch.Tensor:
        # A fresh rounding stream per training step, reproducible from self.seed.
        if self.training and torch.is_grad_enabled():
            if _ops.transformed() and not torch._C._functorch.is_functorch_wrapped_tensor(self.rounding_step):
                # the layer's own count (not one torch.func handed in, as
                # functional_call of stacked models does): the transform
                # refuses writes to tensors it did not hand in
                with torch._C._DisableFuncTorch():
                    self.rounding_step.add_(1)
            else:
                self.rounding_step.add_(1)
        return (self.rounding_step + ((self.seed * 0x9E3779B1) & _SEED_MASK)) & _SEED_MASK

    def _apply(self, fn, recurse=True):
        # The kernel cache's slot and the step count are the layer's own CPU
        # int64 state, not data: moved (.to("meta")) or emptied (to_empty)
        # they would name no kernel, or another layer's.
        handle, step = self._handle, self.rounding_step
        super()._apply(fn, recurse)
        self._buffers["_handle"], self._buffers["rounding_step"] = handle, step
        return self

    # ---- loading -----------------------------------------------------------------
    #
    # Index buffers come from files: every load validates them (dtype, range,
    # CSR structure) before anything is replaced, never coerces an int64 index
    # into int32 silently, accepts a pattern of another nnz (buffers and values
    # are resized), and accepts a dense checkpoint of the original layer
    # ("weight", or torch.nn.utils.prune's "weight_orig" * "weight_mask") when
    # its nonzeros lie in this layer's pattern.

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        name = type(self).__name__
        keys = {k: prefix + k for k in ("row_ptr", "col_idx", "values", "weight", "weight_orig", "weight_mask")}
        step_key = prefix + "rounding_step"
        try:
            step = _rounding_step_from(state_dict.get(step_key), step_key)
            if keys["row_ptr"] in state_dict or keys["col_idx"] in state_dict:
                self._load_pattern(state_dict, keys)
            elif keys["values"] not in state_dict and (
                keys["weight"] in state_dict or keys["weight_orig"] in state_dict
            ):
                self._load_dense_weight(state_dict, keys)
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{name} {prefix or '(root)'}: {e}")
            return
        for k in ("weight", "weight_orig", "weight_mask"):
            state_dict.pop(keys[k], None)  # consumed above
        # The count is copied into the layer's own tensor, never assigned
        # (load_state_dict(assign=True) would make training count up in the
        # caller's checkpoint); a checkpoint from before it was saved, or a
        # dense one, leaves it as it is.
        state_dict.pop(step_key, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if step_key in missing_keys:
            missing_keys.remove(step_key)
        if step is not None:
            self.rounding_step.fill_(step)

    def _load_pattern(self, state_dict, keys):
        for k in ("row_ptr", "col_idx", "values"):
            if keys[k] not in state_dict:
                raise ValueError(f"{keys[k]} is missing: a pattern loads with row_ptr, col_idx and values together")
        row_ptr = _as_index_tensor(state_dict[keys["row_ptr"]], "row_ptr", torch.int64)
        col_idx = _as_index_tensor(state_dict[keys["col_idx"]], "col_idx", torch.int32)
        _ops._C.validate_csr(self._rows(), self._cols(), row_ptr.numpy(), col_idx.numpy())
        values = state_dict[keys["values"]]
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise TypeError(f"values must be a floating tensor, got {getattr(values, 'dtype', type(values))}")
        if values.shape != (col_idx.numel(),):
            raise ValueError(f"values must have shape ({col_idx.numel()},), got {tuple(values.shape)}")
        # Validated: take them whole (another nnz resizes values; the Parameter
        # object stays, so optimizers keep it). The state stays consistent even
        # if a later key of this module fails to load.
        values = values.detach().to(torch.float32).clone()
        if self.values.is_meta:  # a model made on the meta device: load_state_dict(assign=True) materializes it
            self.values = nn.Parameter(values, requires_grad=self.values.requires_grad)
        else:
            with torch.no_grad():
                self.values.data = values
        self.row_ptr, self.col_idx = row_ptr.clone(), col_idx.clone()
        state_dict[keys["row_ptr"]], state_dict[keys["col_idx"]] = row_ptr, col_idx

    def _load_dense_weight(self, state_dict, keys):
        if keys["weight"] in state_dict:
            weight = state_dict[keys["weight"]]
        else:
            weight = state_dict[keys["weight_orig"]] * state_dict.get(keys["weight_mask"], 1)
        weight = torch.as_tensor(weight).detach().to(torch.float32)
        if weight.numel() != self._rows() * self._cols():
            raise ValueError(
                f"weight has {weight.numel()} elements, this layer's dense weight {self._rows()} x {self._cols()}"
            )
        w2 = weight.reshape(self._rows(), self._cols())
        outside = w2.clone()
        rows = torch.repeat_interleave(torch.arange(self._rows()), self.row_ptr.diff())
        outside[rows, self.col_idx.long()] = 0
        if outside.count_nonzero():
            raise ValueError(
                f"the dense weight has {int(outside.count_nonzero())} nonzeros outside this layer's pattern "
                "(a different pruning): build the layer from it with from_dense instead"
            )
        state_dict[keys["values"]] = w2[rows, self.col_idx.long()].clone()
        state_dict[keys["row_ptr"]], state_dict[keys["col_idx"]] = self.row_ptr.clone(), self.col_idx.clone()

    def _dense_weight_2d(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self._rows()), self.row_ptr.diff())
        dense = self.values.new_zeros(self._rows(), self._cols())
        return dense.index_put((rows, self.col_idx.long()), self.values)

    def _check_input(self, x, ndims: tuple[int, ...], what: str) -> torch.Tensor:
        name = type(self).__name__
        if torch.jit.is_tracing():  # it failed later, on graphs that "differed across invocations"
            raise RuntimeError(_torchscript_refusal(name, "torch.jit.trace cannot record"))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"{name}: input must be on the CPU (qsparseprop runs on x86 CPUs), got device {x.device}")
        if x.dtype != torch.float32:
            if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled("cpu"):
                x = x.float()  # under autocast we compute in f32/s8 and return f32
            else:
                raise TypeError(
                    f"{name}: input must be float32, got {x.dtype} (convert with .float(); "
                    "bfloat16/float16 are accepted only under torch.autocast('cpu'))"
                )
        if x.dim() not in ndims:
            raise ValueError(f"{name}: input must be {what}, got shape {tuple(x.shape)}")
        if self.values.dtype != torch.float32:
            raise TypeError(
                f"{name}: values must be float32, got {self.values.dtype} (the layer was cast; use .float())"
            )
        return x

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling
        # (it failed on our forward's source: "Expected a single top-level
        # function")
        raise RuntimeError(_torchscript_refusal(type(self).__name__, "torch.jit.script cannot compile"))

    def __setstate__(self, state):
        # A copy (pickle, deepcopy) gets a cache slot of its own: kernels are
        # rebuilt on first use. A layer pickled before the step count was
        # named rounding_step (and saved in the state_dict) had it as _step.
        buffers = state.get("_buffers", {})
        if "_step" in buffers:
            buffers["rounding_step"] = buffers.pop("_step")
            state.get("_non_persistent_buffers_set", set()).discard("_step")
        super().__setstate__(state)
        self._buffers["_handle"] = _ops.new_handle(self)


# ---- Linear ---------------------------------------------------------------------


class SparseLinear(_SparseModule):
    """``y = x Wᵀ + b`` with a CSR-sparse ``W`` (out_features x in_features), in f32.

    Example:
        >>> import torch
        >>> from qsparseprop import SparseLinear
        >>> dense = torch.nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     dense.weight[dense.weight.abs() < 0.1] = 0
        >>> layer = SparseLinear.from_dense(dense)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
    """

    def __init__(self, in_features: int, out_features: int, row_ptr, col_idx, values, bias=None, seed: int = 0):
        super().__init__()
        for n, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        self._init_sparse(out_features, in_features, row_ptr, col_idx, values, bias, seed)

    @classmethod
    def from_dense(cls, module: nn.Linear, threshold: float = 0.0, seed: int = 0) -> "SparseLinear":
        """Converts an ``nn.Linear``; a pruning mask, if any, defines the pattern,
        else the entries with ``|w| > threshold``."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be a torch.nn.Linear, got {type(module).__name__}")
        mask, weight = _mask_and_weight(module)
        row_ptr, col_idx, values = _csr_from(weight, mask, threshold)
        bias = None if module.bias is None else module.bias.detach()
        return cls(module.in_features, module.out_features, row_ptr, col_idx, values, bias, seed)

    def to_dense(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same weights (zeros where pruned).
        A fused ReLU is not part of it (``qsparseprop.to_dense(model)`` puts
        the ``nn.ReLU`` back where it stood)."""
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            m.weight.copy_(self._dense_weight_2d())
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (a differentiable view built from ``values``)."""
        return self._dense_weight_2d()

    def _rows(self):
        return self.out_features

    def _cols(self):
        return self.in_features

    def _spec(self) -> list[int]:
        return [self.in_features, self.out_features]

    def _kernel_key(self) -> tuple:
        return _ops._linear_key(self._spec(), self.scheme, self.bias is not None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self._check_input(input, tuple(range(1, 9)), "at least 1-D (..., in_features)")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input's last dimension must be in_features="
                f"{self.in_features}, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return F.linear(x, self._dense_weight_2d(), self.bias)
        y = self._compute(x2.contiguous())
        if self.fused_relu and not _observed(self):  # observed: its marker applies the ReLU
            y = _ops.relu_bits(y)
        return y.reshape(*lead, self.out_features)

    def _compute(self, x2: torch.Tensor) -> torch.Tensor:
        return _ops.linear(
            x2, self.values, self.bias, self.row_ptr, self.col_idx, self._handle, self._next_seed(), self._spec(),
            self.scheme,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.4f}, scheme={self.scheme}"
            + (", fused_relu=True" if self.fused_relu else "")
        )


class QuantizedSparseLinear(SparseLinear):
    """``SparseLinear`` computing in the int8 scheme (docs/quantization.md):
    int8 weights (per output channel), activations (saved for backward in
    int8) and output gradients (stochastic rounding seeded by ``seed``: give
    each layer of a model its own, as ``swap_modules_with_sparse`` does from
    the layers' names; with one seed, layers round with the same noise)."""

    scheme = "s8"


# ---- Conv2d ---------------------------------------------------------------------


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


def _resolve_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from torch's padding argument."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
            # torch puts the odd pixel at the bottom / right
            return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    return (ph, pw, ph, pw)


def _output_channels_last(x: torch.Tensor) -> bool:
    """Whether torch's Conv2d gives this 4-D input a channels_last output.
    torch decides by the input's strides, also where they are ambiguous (one
    channel, or a 1x1 image: both layouts are "contiguous"), through
    suggest_memory_format; we follow the same rule so a layer swapped for
    ours hands the next one the layout torch's would."""
    try:
        from torch._prims_common import suggest_memory_format
    except ImportError:  # not in this torch: the unambiguous cases
        return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return suggest_memory_format(x) == torch.channels_last


def _batch_norm_after(bn: nn.BatchNorm2d, y: torch.Tensor, relu: bool, keep_s8: bool = False,
                      chain=None, residual: torch.Tensor | None = None,
                      known: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``bn`` (then ReLU) applied to the NCHW output y, as BatchNorm2d.forward
    would: the same choice of statistics, momentum (None: cumulative
    average), num_batches_tracked and running-statistics update. keep_s8:
    the backward reads y's int8 copy (int8 blocks); chain: what computes
    it (``_ops.batch_norm_relu``, or the prototype's model of it);
    residual: added after the BatchNorm, before the ReLU (a residual
    block's end), in the same pass when it is float32 and y's shape and
    layout, else by torch; known: y's batch statistics as the convolution
    that wrote y took them (used where the batch's statistics are)."""
    if residual is not None and not (
        residual.dtype == torch.float32 and residual.shape == y.shape and residual.is_contiguous()
    ):
        z = _batch_norm_after(bn, y, False, keep_s8, chain, known=known) + residual
        return torch.relu(z) if relu else z
    if y.shape[0] == 0 or y.dtype != torch.float32 or _ops.transformed():  # torch's, where the passes cannot go
        running = (bn.running_mean, bn.running_var) if not bn.training or bn.track_running_stats else (None, None)
        z = F.batch_norm(
            y, *running, bn.weight, bn.bias, bn.training or bn.running_mean is None, _momentum(bn), bn.eps,
        )  # fmt: skip
        if residual is not None:
            z = z + residual
        return torch.relu(z) if relu else z
    batch_statistics = bn.training or bn.running_mean is None or bn.running_var is None
    if batch_statistics and y.numel() // y.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}")
    factor = _momentum(bn)
    z, mean, var = (chain or _ops.batch_norm_relu)(
        y.contiguous(), bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, batch_statistics, relu, keep_s8,
        residual, known,
    )  # fmt: skip
    _update_running_statistics(bn, factor, y, mean, var)
    return z


def _update_running_statistics(bn: nn.BatchNorm2d, factor: float, y: torch.Tensor, mean, var) -> None:
    """BatchNorm2d's update of its running statistics in training from the
    batch mean and biased variance of its input y (factor: _momentum's);
    none where track_running_stats was turned off after construction (the
    statistics kept then serve eval only, as in torch)."""
    if _updates_running_statistics(bn):
        count = y.numel() // y.shape[1]
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var, alpha=factor * count / (count - 1))


def _updates_running_statistics(bn: nn.BatchNorm2d) -> bool:
    return bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


def _momentum(bn: nn.BatchNorm2d) -> float:
    """BatchNorm's exponential average factor for this call, counting the
    batch as BatchNorm.forward does (in training with running statistics)."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return 0.0 if bn.momentum is None else bn.momentum


class SparseConv2d(_SparseModule):
    """2-D convolution with a CSR-sparse weight: one row per output channel,
    columns over (in_channel/groups, kh, kw). Supports stride, zero padding
    (including 'same'/'valid'), dilation and groups, like ``nn.Conv2d``.

    ``vectorizing_over_on`` picks the JIT kernels' inner dimension (True: the
    output width, for large images; False: the batch; None: decided per
    layer). The reference kernels are correct for either.

    Example:
        >>> import torch
        >>> from qsparseprop import SparseConv2d
        >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        >>> layer = SparseConv2d.from_dense(conv, threshold=0.05)
        >>> layer(torch.randn(2, 8, 10, 10)).shape
        torch.Size([2, 16, 10, 10])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        row_ptr,
        col_idx,
        values,
        bias=None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        vectorizing_over_on: bool | None = None,
        seed: int = 0,
    ):
        super().__init__()
        for n, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        if not isinstance(groups, int):
            raise ValueError(f"groups must be an int, got {groups!r}")
        # Fixed at construction (the pattern's columns depend on them):
        # read-only properties below.
        self._in_channels, self._out_channels, self._groups = in_channels, out_channels, groups
        self._kernel_size = _pair(kernel_size, "kernel_size")
        self._set_geometry(stride, padding, dilation)
        if vectorizing_over_on not in (None, True, False):
            raise TypeError(f"vectorizing_over_on must be None, True or False, got {vectorizing_over_on!r}")
        self.vectorizing_over_on = vectorizing_over_on
        self._init_sparse(
            out_channels,
            in_channels // groups * self.kernel_size[0] * self.kernel_size[1],
            row_ptr,
            col_idx,
            values,
            bias,
            seed,
        )

    def _set_geometry(self, stride, padding, dilation) -> None:
        """Validates and sets stride, padding and dilation together (assigning
        any of them later goes through here: the next call uses it)."""
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride}), as in torch")
        pads = _resolve_padding(padding, self._kernel_size, dilation)
        # Every value rule (sizes, strides, dilations, groups >= 1, paddings
        # >= 0, channels divisible by groups) is checked in C++, with the
        # messages C++ callers get too.
        _ops._C.check_conv2d_geometry(
            list(self._kernel_size), list(stride), list(pads), list(dilation), self._groups,
            self._in_channels, self._out_channels,
        )  # fmt: skip
        self._stride, self._padding, self._dilation, self._pads = stride, padding, dilation, pads

    stride = property(lambda self: self._stride, lambda self, v: self._set_geometry(v, self._padding, self._dilation))
    padding = property(lambda self: self._padding, lambda self, v: self._set_geometry(self._stride, v, self._dilation))
    dilation = property(lambda self: self._dilation, lambda self, v: self._set_geometry(self._stride, self._padding, v))

    def _fixed(name):  # noqa: N805 (a helper run in the class body)
        def setter(self, value):
            raise AttributeError(
                f"{type(self).__name__}.{name} is fixed at construction (the pattern's columns depend on it); "
                "build a new layer"
            )

        return property(lambda self: getattr(self, "_" + name), setter)

    in_channels = _fixed("in_channels")
    out_channels = _fixed("out_channels")
    groups = _fixed("groups")
    kernel_size = _fixed("kernel_size")
    del _fixed

    @classmethod
    def from_dense(
        cls, module: nn.Conv2d, threshold: float = 0.0, vectorizing_over_on: bool | None = None, seed: int = 0
    ) -> "SparseConv2d":
        """Converts an ``nn.Conv2d`` (zero padding only); a pruning mask, if
        any, defines the pattern, else the entries with ``|w| > threshold``."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module must be a torch.nn.Conv2d, got {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={module.padding_mode!r} is not supported; only 'zeros' (pad the input "
                "yourself with F.pad and use padding=0)"
            )
        mask, weight = _mask_and_weight(module)
        oc = module.out_channels
        row_ptr, col_idx, values = _csr_from(
            weight.reshape(oc, -1), None if mask is None else mask.reshape(oc, -1), threshold
        )
        bias = None if module.bias is None else module.bias.detach()
        return cls(
            module.in_channels,
            oc,
            module.kernel_size,
            row_ptr,
            col_idx,
            values,
            bias,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            vectorizing_over_on,
            seed,
        )

    def to_dense(self) -> nn.Conv2d:
        """A dense ``nn.Conv2d`` with the same weights (zeros where pruned);
        a fused ReLU is not part of it, as for ``SparseLinear.to_dense``."""
        m = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            m.weight.copy_(self.weight)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m

    @property
    def weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        return self._dense_weight_2d().reshape(self.out_channels, self.in_channels // self.groups, kh, kw)

    def _rows(self):
        return self.out_channels

    def _cols(self):
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def _subsampled(self) -> bool:
        """A 1x1 kernel without padding at a stride reads every stride-th
        pixel and nothing else: the layer takes those pixels first (a
        strided view) and runs its kernels at stride 1. The kernels' input
        packs then copy 1/(sh*sw) of the input instead of all of it, the
        backward's input gradient is that much smaller before one pass
        spreads it (_ops.subsample_pixels), and an int8 layer keeps (and scales per tensor) just the pixels
        it reads (docs/quantization.md)."""
        return self.kernel_size == (1, 1) and self._pads == (0, 0, 0, 0) and self.stride != (1, 1)

    def _kernel_stride(self) -> tuple[int, int]:
        return (1, 1) if self._subsampled() else self.stride

    def _spec(self) -> list[int]:
        top, left, bottom, right = self._pads
        return [
            self.in_channels, self.out_channels, *self.kernel_size, *self._kernel_stride(), top, left, bottom, right,
            *self.dilation, self.groups,
        ]  # fmt: skip

    def _vectorization(self) -> str:
        return {None: "any", True: "output_width", False: "batch"}[self.vectorizing_over_on]

    def _kernel_key(self) -> tuple:
        return _ops._conv_key(self._spec(), self.scheme, self.bias is not None, self._vectorization())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward(input, None)

    def _forward(self, input, residual: torch.Tensor | None) -> torch.Tensor:
        """forward(input), then, with ``residual``, relu(that + residual): a
        residual block's end (:func:`_conv_add_relu`), the add and the ReLU
        in the fused BatchNorm's apply pass. ``input`` may be a
        :class:`_DeferredBatchNorm` this layer reads (_reads_deferred)."""
        if isinstance(input, _DeferredBatchNorm):
            return self._forward_after_batch_norm(input, residual)
        x, unbatched, channels_last = self._prepared(input)
        top, left, bottom, right = self._pads
        if x.shape[0] == 0:
            y = F.conv2d(
                F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
            )
        else:
            if self._subsampled():
                x = _ops.subsample_pixels(x, *self.stride)
            if self._hands_statistics_over():
                y, known = _ops.conv2d(*self._conv2d_args(x.contiguous()), statistics=True)
                return self._finished(y, residual, unbatched, channels_last, known)
            y = self._compute(x.contiguous())
        return self._finished(y, residual, unbatched, channels_last)

    def _forward_deferring(self, input: torch.Tensor):
        """forward(input), or, where this s8 layer's fused BatchNorm (and the
        ReLU after it) can be left to the s8 convolution reading its output
        (a training step, batch statistics, NCHW), a :class:`_DeferredBatchNorm`
        of its raw output: what :func:`_conv_deferring` returns to the one
        reader."""
        x, unbatched, channels_last = self._prepared(input)
        if unbatched or channels_last or x.shape[0] == 0 or not self._defers_batch_norm():
            return self._forward(input, None)
        y, known = _ops.conv2d(*self._conv2d_args(x.contiguous()), statistics=True)
        return self._deferred(y, known)

    def _defers_batch_norm(self) -> bool:
        """Whether a batched NCHW forward may leave its BatchNorm (+ ReLU) to
        its reader: s8, the fused BatchNorm normalising with its batch
        statistics (taken by the convolution); eager."""
        return (
            self.scheme == "s8" and not self._subsampled() and self._hands_statistics_over()
            and not _ops.traced()
        )  # fmt: skip

    def _deferred(self, y: torch.Tensor, known: torch.Tensor):
        if y.numel() // y.shape[1] <= 1:  # the BatchNorm's own error, as unfused
            return self._finished(y, None, False, False, known)
        return _DeferredBatchNorm(self, y, known)

    def _reads_deferred(self, deferred: _DeferredBatchNorm) -> bool:
        """Whether this layer can apply ``deferred``'s BatchNorm and a ReLU as
        it rounds its input: s8, computed by the library, reading all of it."""
        return (
            self.scheme == "s8" and not self._subsampled() and type(self)._compute is SparseConv2d._compute
            and deferred.y.shape[1] == self.in_channels
        )  # fmt: skip

    def _forward_after_batch_norm(self, deferred: _DeferredBatchNorm, residual: torch.Tensor | None) -> torch.Tensor:
        """_forward of the activation ``deferred`` stands for, its BatchNorm
        writing it only as this layer's int8 input (_ops.batch_norm_relu_conv2d)."""
        self._prepared(deferred.y)  # its checks: the kernel fits the image
        bn = deferred.batch_norm
        factor = _momentum(bn)
        statistics = self._hands_statistics_over()
        y, found, mean, var = _ops.batch_norm_relu_conv2d(
            deferred.y, bn.weight, bn.bias, bn.eps, deferred.known, *self._conv2d_args(deferred.y)[1:], statistics
        )  # fmt: skip
        _update_running_statistics(bn, factor, deferred.y, mean, var)
        return self._finished(y, residual, False, False, found if statistics else None)

    def _prepared(self, input: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
        """(the input checked and made 4-D, whether it was 3-D, whether torch's
        Conv2d would give it a channels_last output)."""
        x = self._check_input(input, (3, 4), "3-D (C, H, W) or 4-D (N, C, H, W)")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input must have in_channels={self.in_channels} channels, "
                f"got shape {tuple(input.shape)}"
            )
        top, left, bottom, right = self._pads
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        if x.shape[2] + top + bottom < dh * (kh - 1) + 1 or x.shape[3] + left + right < dw * (kw - 1) + 1:
            raise ValueError(
                f"{type(self).__name__}: input spatial size {tuple(x.shape[2:])} (padded "
                f"{x.shape[2] + top + bottom}x{x.shape[3] + left + right}) is smaller than the dilated "
                f"kernel {dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}"
            )
        return x, unbatched, x.dim() == 4 and _output_channels_last(x)

    def _finished(self, y: torch.Tensor, residual: torch.Tensor | None, unbatched: bool,
                  channels_last: bool, known: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The convolution's output y (NCHW) through the fused BatchNorm or
        ReLU, the residual's add and ReLU, in the input's layout and rank;
        known: y's batch statistics where the convolution took them. While
        a hook is there to see the calls (``_observed``), y alone: the
        markers then apply the BatchNorm and the ReLU."""
        observed = _observed(self)
        bn = None if observed else self.__dict__.get("fused_batch_norm")
        # a residual's add and ReLU go into the BatchNorm's apply pass where
        # there is one and the output stays NCHW; else torch adds after
        fuse_add = residual is not None and bn is not None and not channels_last
        if bn is not None:
            y = self._batch_norm(bn, y, (residual.unsqueeze(0) if unbatched else residual) if fuse_add else None, known)
        elif self.fused_relu and not observed:
            y = _ops.relu_bits(y)
        if channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        y = y.squeeze(0) if unbatched else y
        return torch.relu(y + residual) if residual is not None and not fuse_add else y

    def _batch_norm(self, bn: nn.BatchNorm2d, y: torch.Tensor, residual: torch.Tensor | None = None,
                    known: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        # an int8 block keeps BatchNorm's input as int8 too (docs/quantization.md)
        relu = self.fused_relu or residual is not None
        return _batch_norm_after(bn, y, relu, keep_s8=self.scheme == "s8", residual=residual, known=known)

    def _hands_statistics_over(self) -> bool:
        """Whether the output goes into a fused BatchNorm that normalises
        with its batch statistics: the convolution then finds them as it
        writes the output (the batch_statistics post-op, in the kernels'
        epilogue where they take it) and hands them to the BatchNorm. A
        subclass that computes the convolution its own way (the prototype)
        leaves them to its BatchNorm."""
        bn = self.__dict__.get("fused_batch_norm")
        return (
            bn is not None
            and (bn.training or bn.running_mean is None or bn.running_var is None)
            and type(self)._compute is SparseConv2d._compute
            and not _observed(self)
        )

    def _conv2d_args(self, x: torch.Tensor) -> tuple:
        return (
            x, self.values, self.bias, self.row_ptr, self.col_idx, self._handle, self._next_seed(), self._spec(),
            self.scheme, self._vectorization(),
        )  # fmt: skip

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.conv2d(*self._conv2d_args(x))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, density={self.density:.4f}, scheme={self.scheme}"
            + (", fused_batch_norm=True" if self.__dict__.get("fused_batch_norm") is not None else "")
            + (", fused_relu=True" if self.fused_relu else "")
        )


class _DeferredBatchNorm:
    """A sparse s8 convolution's output whose fused BatchNorm (and the ReLU
    after it) is left to the s8 convolution reading it (``qsparseprop.fuse``'s
    rewrite of a block's inner activation, :func:`_conv_deferring`): y, the
    raw output, and its batch statistics. The rewritten forward hands it
    from that producer to its one reader only; the reader applies the
    BatchNorm and the ReLU as it rounds its input
    (SparseConv2d._forward_after_batch_norm), or, where it cannot, takes
    :meth:`materialized` (the producer's output as its modules give it)
    through the modules in between."""

    __slots__ = ("conv", "y", "known")

    def __init__(self, conv: SparseConv2d, y: torch.Tensor, known: torch.Tensor):
        self.conv, self.y, self.known = conv, y, known

    @property
    def batch_norm(self) -> nn.BatchNorm2d:
        return self.conv.__dict__["fused_batch_norm"]

    def materialized(self) -> torch.Tensor:
        return self.conv._finished(self.y, None, False, False, self.known)


def _conv_deferring(conv: nn.Module, input: torch.Tensor):
    """conv(input), or its deferred form (SparseConv2d._forward_deferring):
    what a traced block's first convolution calls once ``qsparseprop.fuse``
    has found that its output (through its BatchNorm's marker and a ReLU)
    feeds one s8 sparse convolution alone (swap._deferred_batch_norms); the
    reader is :func:`_conv_reading_deferred` or :func:`_conv_add_relu`."""
    if type(conv) in (SparseConv2d, QuantizedSparseConv2d) and not _observed(conv):
        return conv._forward_deferring(input)
    return conv(input)


def _through_markers(input, markers: tuple, reader: nn.Module):
    """``input`` (a tensor, or a deferred BatchNorm) as ``reader`` takes it:
    still deferred where the modules between its producer and the reader
    are that producer's BatchNorm marker and its ReLU (the marker of the
    ReLU it applies, or a ReLU module: a block's ReLU called again after its
    add), uncalled by any hook, and the reader can apply them; else the
    activation, through the modules, as they would compute it."""
    if not isinstance(input, _DeferredBatchNorm):
        for m in markers:
            input = m(input)
        return input
    relu = markers[1] if len(markers) == 2 else None
    if (
        len(markers) == 2
        and markers[0] is input.conv.__dict__.get("fused_batch_norm")
        and (type(relu) is FusedReLU if input.conv.fused_relu else type(relu) in (nn.ReLU, MaskedReLU))
        and isinstance(reader, SparseConv2d)
        and reader._reads_deferred(input)
        and all(_called_plainly(m) for m in (*markers, reader))
    ):
        return input
    z = input.materialized()
    for m in markers:
        z = m(z)
    return z


def _conv_reading_deferred(conv: nn.Module, markers: tuple, input) -> torch.Tensor:
    """conv(markers(input)) for the ``input`` :func:`_conv_deferring` gave."""
    z = _through_markers(input, markers, conv)
    return conv._forward(z, None) if isinstance(z, _DeferredBatchNorm) else conv(z)


def _called_plainly(module: nn.Module) -> bool:
    """Whether calling ``module`` would run its forward and nothing else (no
    hooks of its own or global ones). Asked on every call of a fused
    residual end: attribute reads only."""
    torch_module = nn.modules.module
    return not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )  # fmt: skip


def _conv_add_relu(conv: nn.Module, batch_norm: nn.Module, relu: nn.Module | None, input,
                   residual: torch.Tensor, markers: tuple = ()) -> torch.Tensor:  # fmt: skip
    """relu(batch_norm(conv(input)) + residual): what a traced residual
    block's end (``conv`` -> its fused BatchNorm's marker -> add -> ``relu``,
    a module or, None, a function) calls once ``qsparseprop.fuse`` has
    rewritten its forward (swap._fuse_traced_blocks). The add and the ReLU
    run in the convolution's BatchNorm pass while the modules are what the
    rewrite found — a sparse convolution applying that BatchNorm, a ReLU —
    and no hook (theirs, or a global one) is there to see the calls; else
    the modules are called and torch adds, as the block's own forward would.
    ``input`` may come deferred from :func:`_conv_deferring` through
    ``markers`` (its BatchNorm's and ReLU's)."""
    input = _through_markers(input, markers, conv)
    if isinstance(input, _DeferredBatchNorm):
        return conv._forward(input, residual)
    if (
        isinstance(conv, SparseConv2d)
        and conv.__dict__.get("fused_batch_norm") is batch_norm
        and (relu is None or (type(relu) in (nn.ReLU, MaskedReLU) and _called_plainly(relu)))
        and not _observed(conv)  # (the convolution and its BatchNorm's marker)
    ):
        return conv._forward(input, residual)
    z = batch_norm(conv(input)) + residual
    return relu(z) if relu is not None else torch.relu(z)


def _shares_input_with(conv: nn.Module, shortcut: nn.Module) -> bool:
    """Whether ``conv`` and ``shortcut`` can run as one function on one
    input (:func:`_convs_sharing_input`): two sparse convolutions computed
    by the library, the second a strided 1x1 reading only a subsample."""
    return (
        type(conv) in (SparseConv2d, QuantizedSparseConv2d)
        and type(shortcut) in (SparseConv2d, QuantizedSparseConv2d)
        and not conv._subsampled()
        and shortcut._subsampled()
        and conv.in_channels == shortcut.in_channels
    )


def _convs_sharing_input(conv: nn.Module, shortcut: nn.Module, input: torch.Tensor, defer_first: bool = False) -> tuple:
    """(conv(input), shortcut(input)): what a traced module whose forward
    calls two sparse convolutions on one input — a residual block's first
    convolution and its strided 1x1 shortcut — calls once ``qsparseprop.fuse``
    has rewritten it (swap._fuse_traced_blocks). The two run as one autograd
    function whose backward adds the shortcut's input gradient into the
    first's in place (_ops.convs_sharing_input; the same values as the two
    calls) while the modules are what the rewrite found and no hook is
    there to see the calls; else the modules are called. With
    ``defer_first`` (the rewrite found the first's output read by one
    sparse convolution alone), the first may come deferred, as
    :func:`_conv_deferring` gives it."""
    if _shares_input_with(conv, shortcut) and not _ops.traced() and all(_called_plainly(m) for m in (conv, shortcut)):
        x, unbatched, channels_last = conv._prepared(input)
        shortcut._prepared(input)  # its own checks (the kernel fits the image)
        if not unbatched and x.shape[0] > 0:
            layers = [
                (m.values, m.bias, m.row_ptr, m.col_idx, m._handle, m._next_seed(), m._spec(), m.scheme,
                 m._vectorization())
                for m in (conv, shortcut)
            ]  # fmt: skip
            statistics = (conv._hands_statistics_over(), shortcut._hands_statistics_over())
            y, y_shortcut, known, known_shortcut = _ops.convs_sharing_input(
                x.contiguous(), *layers, shortcut.stride, statistics
            )
            if defer_first and not channels_last and conv._defers_batch_norm():
                first = conv._deferred(y, known)
            else:
                first = conv._finished(y, None, False, channels_last, known if statistics[0] else None)
            return first, shortcut._finished(
                y_shortcut, None, False, channels_last, known_shortcut if statistics[1] else None
            )
    return (_conv_deferring(conv, input) if defer_first else conv(input)), shortcut(input)


def _chain_activation(first: nn.Module, act: nn.Module) -> tuple[bool, str | None]:
    """(whether ``act`` between ``first`` and a second Linear can run inside
    the fused MLP block, the GELU's ``approximate`` or None for the first
    layer's fused ReLU)."""
    if type(act) is FusedReLU and first.fused_relu:
        return True, None
    if type(act) is nn.GELU and act.approximate in ("none", "tanh") and not first.fused_relu:
        return True, act.approximate
    return False, None


def _linear_act_linear(
    first: nn.Module, act: nn.Module, second: nn.Module, input: torch.Tensor, *between: nn.Module
) -> torch.Tensor:
    """second(between(act(first(input)))): what a traced Linear -> activation
    -> Linear (a transformer MLP: the first layer's fused ReLU, its
    ``FusedReLU`` marker standing as ``act``, or an ``nn.GELU``; then any
    ``nn.Dropout`` / ``nn.Identity`` modules) calls once ``qsparseprop.fuse``
    has rewritten its parent's forward (swap._fuse_linear_chains). The two
    layers then run as one block, the hidden activation and its gradient in
    the kernels' tile layout between them, while the modules are what the
    rewrite found, each dropout is the identity (p 0, or eval) and no hook
    (theirs, or a global one) is there to see the calls; else the modules
    are called, as the parent's own forward would."""
    fits, gelu = _chain_activation(first, act) if _mlp_pair(first, second) else (False, None)
    if fits and _called_plainly(act) and all(map(_identity_now, between)):
        y = _mlp_block(first, second, input, gelu)
        if y is not None:
            return y
    hidden = act(first(input))
    for module in between:
        hidden = module(hidden)
    return second(hidden)


def _passes_through(module: nn.Module) -> bool:
    """A module that may stand between an MLP's activation and its second
    Linear: the identity, or a dropout (the identity while p is 0 or in eval)."""
    return type(module) in (nn.Identity, nn.Dropout)


def _identity_now(module: nn.Module) -> bool:
    """Whether calling ``module`` now gives its input back and nothing else
    happens: an ``nn.Identity``, or an ``nn.Dropout`` with p 0 or in eval,
    unhooked."""
    dropping = type(module) is nn.Dropout and module.p != 0 and module.training
    return _passes_through(module) and not dropping and _called_plainly(module)


def _mlp_pair(first: nn.Module, second: nn.Module) -> bool:
    """Whether two modules are swapped Linear layers (f32 or s8) that can
    run as one MLP block, the first's outputs the second's inputs."""
    linear = (SparseLinear, QuantizedSparseLinear)
    return type(first) in linear and type(second) in linear and first.out_features == second.in_features


def _mlp_block(first: nn.Module, second: nn.Module, input, gelu: str | None) -> torch.Tensor | None:
    """second(act(first(input))) as one block (act the ReLU with gelu None,
    else torch's GELU of that ``approximate``), or None where it cannot run
    so — traced, a hook on either layer (or a global one), an input of
    another width or none — and the caller calls the modules."""
    if _ops.traced() or any(map(_observed, (first, second))):  # (their ReLU markers too)
        return None
    x = first._check_input(input, tuple(range(1, 9)), "at least 1-D (..., in_features)")
    second._check_input(x, (x.dim(),), "")  # its values' dtype
    if x.shape[-1] != first.in_features or x.numel() == 0:
        return None
    lead = x.shape[:-1]
    y = _ops.linear_act_linear(first, second, x.reshape(-1, first.in_features).contiguous(), gelu)
    if second.fused_relu:
        y = _ops.relu_bits(y)
    return y.reshape(*lead, second.out_features)


def _transformer_activation(act) -> tuple[bool, str | None]:
    """(whether an ``nn.TransformerEncoderLayer``'s or decoder layer's
    ``activation`` can run inside the fused MLP block, the GELU's
    ``approximate`` or None for the ReLU): torch's functions (its "relu"
    and "gelu") or modules."""
    if act is F.relu or type(act) is nn.ReLU:
        return True, None
    if act is F.gelu:
        return True, "none"
    if type(act) is nn.GELU and act.approximate in ("none", "tanh"):
        return True, act.approximate
    return False, None


# torch's transformer layers whose _ff_block is dropout_end(linear2(dropout(
# activation(linear1(x))))): the class and its last dropout's name
_TRANSFORMER_LAYERS = ((nn.TransformerEncoderLayer, "dropout2"), (nn.TransformerDecoderLayer, "dropout3"))


def _transformer_ff_block(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``_ff_block`` of torch's ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerDecoderLayer`` (``dropout_end(linear2(dropout(
    activation(linear1(x)))))``) with linear1 -> activation -> linear2 run
    as one MLP block, while its middle dropout is the identity (p 0, or
    eval), the activation a ReLU or GELU and the two layers swapped Linear
    layers nothing hooks; else torch's own. ``qsparseprop.fuse`` binds it to
    the layer instance (swap._fuse_transformer_mlps): fx traces no such
    layer (its forward branches on its inputs), so it is matched by class.
    Named ``_ff_block``: pickle stores a bound method by name, so an
    unpickled layer has its class's ``_ff_block`` (the same results)."""
    cls, end = next(c for c in _TRANSFORMER_LAYERS if isinstance(self, c[0]))
    first, second = self.linear1, self.linear2
    fits, gelu = _transformer_activation(self.activation) if _mlp_pair(first, second) else (False, None)
    quiet = not isinstance(self.activation, nn.Module) or _called_plainly(self.activation)
    if fits and quiet and _identity_now(self.dropout):
        y = _mlp_block(first, second, x, gelu)
        if y is not None:
            return getattr(self, end)(y)
    return cls._ff_block(self, x)


_transformer_ff_block.__name__ = "_ff_block"


class QuantizedSparseConv2d(SparseConv2d):
    """``SparseConv2d`` computing in the int8 scheme (docs/quantization.md);
    ``seed`` as for ``QuantizedSparseLinear``: each layer its own."""

    scheme = "s8"
