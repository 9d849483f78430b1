"""The outlier-robust int8 scheme for Linear (``scheme = "s8_outliers"``).

Transformer activations carry a few channels (input features) that are much
larger than the rest, in every token. One per-tensor scale then spends the
int8 range on them and quantizes every other channel coarsely (forward
error ~6 % when 1 % of the channels are 20x larger; docs/quantization.md). A
per-token scale does not help: every token has the outliers.

This scheme splits the input channels into the regular ones and the outlier
channels (found on the first batch the layer sees, in training or in
evaluation, with or without autograd: column max |x| above
``outlier_threshold`` times the median column max, at most
``max_outlier_fraction`` of the channels; or given) and runs the layer as two
int8 sparse products over a partition of its nonzeros, each with the s8
scheme's per-tensor scales of its own channels:

    y = s8(x[:, regular], W[:, regular]) + s8(x[:, outliers], W[:, outliers])

Both are exact integer sums; the partition costs no extra multiply-adds
(every nonzero is in exactly one part); backward-weights is the s8 scheme's
per part, so each weight column is computed at its own channels' precision.
The prototype computes each part with the pure-PyTorch model of the s8
scheme, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _ops
from .modules import QuantizedSparseLinear, _SparseModule
from .prototype import _PrototypeLinearFn

# the rounding stream of the outlier part (the regular part uses the layer's)
_OUTLIER_STREAM = 0x5DEECE66D


class OutlierQuantizedSparseLinear(QuantizedSparseLinear):
    """``QuantizedSparseLinear`` with outlier input channels in a part of
    their own (``scheme = "s8_outliers"``): see the module docstring.

    Example:
        >>> import torch
        >>> from qsparseprop import OutlierQuantizedSparseLinear
        >>> dense = torch.nn.Linear(64, 16)
        >>> layer = OutlierQuantizedSparseLinear.from_dense(dense)
        >>> x = torch.randn(8, 64); x[:, 3] *= 20    # one outlier channel
        >>> layer(x).shape, layer.outlier_idx.tolist()
        (torch.Size([8, 16]), [3])
    """

    scheme = "s8_outliers"

    def __init__(self, *args, outlier_threshold: float = 6.0, max_outlier_fraction: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        if not outlier_threshold > 1.0:
            raise ValueError(f"outlier_threshold must be > 1, got {outlier_threshold}")
        if not 0.0 <= max_outlier_fraction < 1.0:
            raise ValueError(f"max_outlier_fraction must be in [0, 1), got {max_outlier_fraction}")
        self.outlier_threshold = float(outlier_threshold)
        self.max_outlier_fraction = float(max_outlier_fraction)
        # The outlier channels (sorted); set on the first batch or
        # by set_outlier_channels. Persistent: a reload computes the same.
        self.register_buffer("outlier_idx", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("outliers_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("_handle1", _ops.new_handle(self), persistent=False)
        self._parts = None  # (key tensors, derived tensors)

    @classmethod
    def from_dense(cls, module: nn.Linear, threshold: float = 0.0, seed: int = 0, **kwargs):
        layer = QuantizedSparseLinear.from_dense.__func__(QuantizedSparseLinear, module, threshold, seed)
        out = cls(
            layer.in_features, layer.out_features, layer.row_ptr, layer.col_idx, layer.values.detach(),
            None if layer.bias is None else layer.bias.detach(), seed, **kwargs,
        )  # fmt: skip
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self._buffers["_handle1"] = _ops.new_handle(self)
        self._parts = None

    # ---- the outlier channels ------------------------------------------------------

    def set_outlier_channels(self, channels) -> None:
        """Fixes the outlier channels (input feature indices); [] makes the
        layer the plain s8 scheme."""
        idx = torch.as_tensor(channels, dtype=torch.int64).reshape(-1).unique(sorted=True)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.in_features):
            raise ValueError(f"outlier channels must be in [0, {self.in_features}), got {idx.tolist()}")
        self.outlier_idx = idx
        self.outliers_set.fill_(True)

    def calibrate(self, x: torch.Tensor) -> None:
        """Finds the outlier channels of a batch: max |x| of a channel above
        outlier_threshold times the median channel's, the largest first, at
        most max_outlier_fraction of the channels."""
        amax = x.detach().reshape(-1, self.in_features).abs().amax(0).float()
        limit = self.outlier_threshold * amax.median()
        cap = int(self.max_outlier_fraction * self.in_features)
        candidates = torch.nonzero(amax > limit).reshape(-1)
        if candidates.numel() > cap:
            candidates = candidates[amax[candidates].topk(cap).indices]
        self.set_outlier_channels(candidates)

    # ---- the two parts -------------------------------------------------------------

    def _split(self):
        """The partition of the nonzeros by the outlier channels, cached while
        the pattern and the channels are unchanged (compared in full, a
        memcmp's cost, so in-place edits are seen)."""
        key = (self.row_ptr, self.col_idx, self.outlier_idx)
        if self._parts is not None and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(self._parts[0], key, strict=True)
        ):
            return self._parts[1]
        k = self.in_features
        is_outlier = torch.zeros(k, dtype=torch.bool)
        is_outlier[self.outlier_idx] = True
        regular = torch.nonzero(~is_outlier).reshape(-1)
        outlier = self.outlier_idx
        new_col = torch.full((k,), -1, dtype=torch.int64)
        new_col[regular] = torch.arange(regular.numel())
        new_col[outlier] = torch.arange(outlier.numel())
        rows = torch.repeat_interleave(torch.arange(self.out_features), self.row_ptr.diff())
        in_outlier = is_outlier[self.col_idx.long()]
        parts = []
        for mask in (~in_outlier, in_outlier):
            entries = torch.nonzero(mask).reshape(-1)
            counts = torch.bincount(rows[entries], minlength=self.out_features)
            row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            col_idx = new_col[self.col_idx[entries].long()].to(torch.int32)
            parts.append((entries, row_ptr, col_idx))
        derived = (regular, outlier, parts)
        self._parts = (tuple(t.clone() for t in key), derived)
        return derived

    def _part(self, x, values, bias, row_ptr, col_idx, handle, seed, in_features):
        return _ops.linear(x, values, bias, row_ptr, col_idx, handle, seed, [in_features, self.out_features], "s8")

    def _compute(self, x2: torch.Tensor) -> torch.Tensor:
        if not bool(self.outliers_set):
            # Any first batch calibrates: a user who swaps layers and then
            # measures accuracy (eval, no_grad) before training gets the layer
            # working, not an error. The swap's timing runs on noise and
            # resets this afterwards.
            self.calibrate(x2)
        regular, outlier, ((e0, rp0, ci0), (e1, rp1, ci1)) = self._split()
        seed = self._next_seed()
        if outlier.numel() == 0:  # the plain s8 scheme
            return self._part(x2, self.values, self.bias, self.row_ptr, self.col_idx, self._handle, seed,
                              self.in_features)  # fmt: skip
        y = self._part(x2[:, regular].contiguous(), self.values[e0], self.bias, rp0, ci0, self._handle, seed,
                       regular.numel())  # fmt: skip
        y1 = self._part(x2[:, outlier].contiguous(), self.values[e1], None, rp1, ci1, self._handle1,
                        seed ^ _OUTLIER_STREAM, outlier.numel())  # fmt: skip
        return y + y1

    def _kernel(self):
        raise NotImplementedError(f"{type(self).__name__} runs two kernels, one per part")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", outlier_channels={self.outlier_idx.numel()}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        idx = state_dict.get(prefix + "outlier_idx")
        if idx is not None:  # its length is the checkpoint's
            t = torch.as_tensor(idx)
            if t.is_floating_point() or t.dim() != 1:
                raise TypeError(f"{prefix}outlier_idx must be a 1-D integer tensor")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.in_features):
                raise ValueError(f"{prefix}outlier_idx has channels outside [0, {self.in_features})")
            self.outlier_idx = torch.empty(t.numel(), dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PrototypeOutlierQuantizedSparseLinear(OutlierQuantizedSparseLinear):
    """``OutlierQuantizedSparseLinear`` numerics in pure PyTorch, bit for bit."""

    prototype = True

    def _part(self, x, values, bias, row_ptr, col_idx, handle, seed, in_features):
        rows = torch.repeat_interleave(torch.arange(self.out_features), row_ptr.diff())
        dense = values.new_zeros(self.out_features, in_features)
        dense = dense.index_put((rows, col_idx.long()), values)
        return _PrototypeLinearFn.apply(x, values, bias, dense.detach(), row_ptr, col_idx, int(seed))


assert issubclass(OutlierQuantizedSparseLinear, _SparseModule)
