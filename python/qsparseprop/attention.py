"""Multi-head attention whose projections are layers it calls.

``nn.MultiheadAttention`` reads its projection weights itself
(``in_proj_weight`` or ``q/k/v_proj_weight``, and ``out_proj.weight``; it
never calls ``out_proj``), so a sparse layer put in their place would never
run. :class:`ProjectedMultiheadAttention` computes the same attention with
the four projections as child layers it calls — ``q_proj``, ``k_proj``,
``v_proj`` (``Linear(embed_dim|kdim|vdim -> embed_dim)``, the rows of the
packed input projection) and ``out_proj`` — so the swap can time, swap and
keep dense each of them like any ``nn.Linear``. The scaled dot product
attention between them stays torch's.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from .modules import _with_hooks_of

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _additive(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as the additive float mask torch
    makes of it (-inf there, 0 elsewhere); a float mask as it is."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    return mask


def _split_packed_keys(module, state_dict, prefix, *args) -> None:
    """A checkpoint of torch's attention loads: its ``in_proj_weight`` /
    ``in_proj_bias`` (or ``q/k/v_proj_weight``) become the projections'
    ``weight`` / ``bias`` keys (a sparse projection takes a dense weight
    whose nonzeros lie in its pattern). The dict is load_state_dict's own
    copy: the caller's is not touched."""
    names = ("q_proj", "k_proj", "v_proj")
    packed = state_dict.pop(prefix + "in_proj_weight", None)
    weights = packed.chunk(3) if packed is not None else (None,) * 3
    for name, w in zip(names, weights, strict=True):
        w = state_dict.pop(prefix + f"{name}_weight", w)
        if w is not None:
            state_dict.setdefault(f"{prefix}{name}.weight", w)
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        for name, b in zip(names, bias.chunk(3), strict=True):
            state_dict.setdefault(f"{prefix}{name}.bias", b)


class ProjectedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s attention (the same arguments, masks,
    ``batch_first``, ``bias_k`` / ``bias_v``, ``add_zero_attn``, dropout,
    ``need_weights``, ``is_causal``, unbatched inputs; the same results)
    with its projections as child layers it calls: ``q_proj``, ``k_proj``,
    ``v_proj`` and ``out_proj``. Made by :meth:`from_attention` from an
    attention (its weights copied, its hooks taken over);
    :meth:`to_attention` gives the ``nn.MultiheadAttention`` back. What the
    swap makes of a pruned attention: each projection is then a layer it
    times and swaps (or keeps dense, masked) on its own.

    ``in_proj_weight`` / ``in_proj_bias`` (``q/k/v_proj_weight`` where the
    key or value width differs) read as the attention's dense tensors,
    rebuilt from the projections on every read, for code that inspects
    them; training goes through the projections' own parameters.

    >>> import torch
    >>> from qsparseprop import ProjectedMultiheadAttention
    >>> mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    >>> attn = ProjectedMultiheadAttention.from_attention(mha)
    >>> x = torch.randn(2, 5, 16)
    >>> bool(torch.allclose(attn(x, x, x)[0], mha(x, x, x)[0], atol=1e-6))
    True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        dropout: float = 0.0,
        batch_first: bool = False,
        bias_k: torch.Tensor | None = None,
        bias_v: torch.Tensor | None = None,
        add_zero_attn: bool = False,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if (bias_k is None) != (bias_v is None):
            raise ValueError("bias_k and bias_v go together: pass both or neither")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        for name, layer in zip(_PROJECTIONS, (q_proj, k_proj, v_proj, out_proj), strict=True):
            out_features = getattr(layer, "out_features", None)
            if out_features != embed_dim or (name == "out_proj" and layer.in_features != embed_dim):
                raise ValueError(f"{name} must map to embed_dim={embed_dim} features, got {layer!r}")
        self.kdim, self.vdim = k_proj.in_features, v_proj.in_features
        if q_proj.in_features != embed_dim:
            raise ValueError(f"q_proj must take embed_dim={embed_dim} features, got {q_proj!r}")
        biases = [getattr(p, "bias", None) is not None for p in (q_proj, k_proj, v_proj)]
        if len(set(biases)) != 1:
            raise ValueError("q_proj, k_proj and v_proj must all have a bias or none (the packed in_proj_bias)")
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        self.bias_k = None if bias_k is None else nn.Parameter(bias_k.detach().clone().reshape(1, 1, embed_dim))
        self.bias_v = None if bias_v is None else nn.Parameter(bias_v.detach().clone().reshape(1, 1, embed_dim))
        self.register_load_state_dict_pre_hook(_split_packed_keys)

    # ---- to and from torch's -----------------------------------------------------

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention) -> ProjectedMultiheadAttention:
        """The same attention with its weights copied into ``nn.Linear``
        projections (the effective weights, where pruning masks them), its
        mode and hooks taken over (the very dicts, so their handles still
        remove them; torch's pruning hooks, which recompute ``mha``'s own
        weights, stay on ``mha`` alone); ``out_proj`` is ``mha``'s own."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
        projections = []
        for w, b in zip(weights, biases, strict=True):
            like = {"device": w.device, "dtype": w.dtype}
            layer = nn.Linear(w.shape[1], e, bias=b is not None, **like)
            with torch.no_grad():
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            projections.append(layer)
        new = cls(
            e, mha.num_heads, *projections, mha.out_proj, mha.dropout, mha.batch_first, mha.bias_k, mha.bias_v,
            mha.add_zero_attn,
        )  # fmt: skip
        _with_hooks_of(new, mha)
        pre = mha.__dict__.get("_forward_pre_hooks", {})
        if any(isinstance(h, prune.BasePruningMethod) for h in pre.values()):
            # torch's pruning hooks recompute mha's own weights (the copies hold them as they are now): the
            # new module gets the other pre-hooks in a dict of its own, mha keeps its hooks as they were
            new._forward_pre_hooks = OrderedDict(
                (k, h) for k, h in pre.items() if not isinstance(h, prune.BasePruningMethod)
            )
        return new.train(mha.training)

    def to_attention(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` computing the same (the projections'
        current weights, zeros where pruned, copied in), with this module's
        hooks and mode."""
        w = self.q_proj.weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, bias=self.q_proj.bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(self.in_proj_weight)
            else:
                mha.q_proj_weight.copy_(self.q_proj.weight)
                mha.k_proj_weight.copy_(self.k_proj.weight)
                mha.v_proj_weight.copy_(self.v_proj.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(self.in_proj_bias)
                mha.out_proj.bias.copy_(self.out_proj.bias)
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        return _with_hooks_of(mha, self).train(self.training)

    # ---- what torch's attention shows -------------------------------------------

    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """The packed input projection (3 * embed_dim, embed_dim), rebuilt
        from q/k/v_proj; None where the key or value width differs."""
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([p.weight for p in (self.q_proj, self.k_proj, self.v_proj)])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        if self.q_proj.bias is None:
            return None
        return torch.cat([p.bias for p in (self.q_proj, self.k_proj, self.v_proj)])

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
            + (", add_bias_kv=True" if self.bias_k is not None else "")
            + (", add_zero_attn=True" if self.add_zero_attn else "")
        )

    # ---- the attention --------------------------------------------------------------

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: (output, the attention
        weights averaged over heads, per head with ``average_attn_weights=
        False``, or None without ``need_weights``)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must be all 3-D (batched) or all 2-D (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        # the projections run on the inputs as laid out; seq_dim says where the sequence is
        seq_dim = 1 if self.batch_first or not batched else 0
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError(
                        f"key_padding_mask must be 1-D (S,) for unbatched inputs, got {tuple(key_padding_mask.shape)}"
                    )
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch_dim = 1 - seq_dim
        bsz, tgt_len, src_len = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
        if key.shape[:2] != value.shape[:2] or key.shape[batch_dim] != bsz:
            raise ValueError(
                f"key and value must share their sequence and batch sizes with each other and query's batch, got "
                f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dimension must be embed_dim={self.embed_dim}, got {tuple(query.shape)}")
        if key_padding_mask is not None and (
            key_padding_mask.dim() != 2 or tuple(key_padding_mask.shape) != (bsz, src_len)
        ):
            raise ValueError(
                f"key_padding_mask must be (batch, source length) = {(bsz, src_len)}, got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal is a hint about attn_mask: pass the causal attn_mask too "
                "(nn.Transformer.generate_square_subsequent_mask makes one)"
            )
        dtype = query.dtype if query.is_floating_point() else torch.float32
        key_padding_mask = _additive(key_padding_mask, "key_padding_mask", dtype)
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies it (torch does the same)
        else:
            attn_mask = _additive(attn_mask, "attn_mask", dtype)
            if key_padding_mask is not None:
                is_causal = False
        heads = self.num_heads
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise ValueError(
                        f"a 2-D attn_mask must be (target, source length) = {(tgt_len, src_len)}, got "
                        f"{tuple(attn_mask.shape)}"
                    )
                attn_mask = attn_mask[None, None]  # (a view of any layout, as torch's unsqueeze)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
                    raise ValueError(
                        f"a 3-D attn_mask must be (batch * num_heads, target, source length) = "
                        f"{(bsz * heads, tgt_len, src_len)}, got {tuple(attn_mask.shape)}"
                    )
                attn_mask = attn_mask.reshape(bsz, heads, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")

        # the projections: self-attention reads one input three times
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        if self.bias_k is not None:
            k = torch.cat([k, self._along(self.bias_k, bsz, seq_dim)], dim=seq_dim)
            v = torch.cat([v, self._along(self.bias_v, bsz, seq_dim)], dim=seq_dim)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q, k, v = (self._heads(t, seq_dim) for t in (q, k, v))  # (batch, heads, length, head_dim)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz, heads, 1, self.head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[2]
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / float(self.head_dim))) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        # (batch, heads, length, head_dim) -> the input's layout, heads side by side
        out = out.permute(0, 2, 1, 3) if seq_dim == 1 else out.permute(2, 0, 1, 3)
        out = self.out_proj(out.reshape(*out.shape[:2], self.embed_dim))
        return (out.squeeze(0) if not batched else out), weights

    def _along(self, bias: torch.Tensor, bsz: int, seq_dim: int) -> torch.Tensor:
        """``bias_k`` / ``bias_v`` (1, 1, E) as one more source position of every batch entry."""
        return bias.expand(bsz, 1, -1) if seq_dim == 1 else bias.expand(1, bsz, -1)

    def _heads(self, t: torch.Tensor, seq_dim: int) -> torch.Tensor:
        if seq_dim == 1:  # (batch, length, E)
            return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).permute(1, 2, 0, 3)
