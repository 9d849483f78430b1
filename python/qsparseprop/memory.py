"""What a training step keeps in memory: the bytes autograd saves for the
backward (activations), and the parameters, gradients and optimizer state.

    python -m qsparseprop.memory            # MLP and a transformer encoder layer, dense / f32 / int8
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves during one forward of ``model``
    (parameters excluded; a storage saved twice counts once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # the bytes the saved view spans (a slice of a data set is not the data set)
            seen[ptr] = max(seen.get(ptr, 0), t.numel() * t.element_size())
        # a detached alias: returning a saved *output* itself would make a
        # reference cycle (output -> its grad_fn -> the output) that outlives
        # the graph (torch's saved_tensors_hooks caveat)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def state_bytes(model: nn.Module) -> int:
    """Parameters + their gradients + AdamW's two moments (4 copies)."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _pruned(model: nn.Module, sparsity: float) -> nn.Module:
    from torch.nn.utils import prune

    for m in model.modules():
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", amount=sparsity)
            prune.remove(m, "weight")
    return model


def _variants(model: nn.Module, shape):
    from .swap import swap_modules_with_sparse

    yield "dense fp32", model
    yield "sparse f32", swap_modules_with_sparse(copy.deepcopy(model), shape, verbose=False, quantize=False,
                                                 min_speedup=0.0, fuse_relu=False)  # fmt: skip
    yield "sparse int8", swap_modules_with_sparse(copy.deepcopy(model), shape, verbose=False, min_speedup=0.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.9)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())], nn.Linear(1024, 10))
    enc = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    cases = [("MLP 4x(1024->1024, ReLU), batch 256", _pruned(mlp, a.sparsity), (256, 1024)),
             ("encoder layer d=256 ff=1024, 32x64 tokens", _pruned(enc, a.sparsity), (32, 64, 256))]  # fmt: skip
    print(f"{'model':<44} {'variant':<12} {'saved activations':>18} {'params+grads+AdamW':>19}")
    for name, model, shape in cases:
        model.train()
        for variant, m in _variants(model, shape):
            x = torch.randn(shape, requires_grad=True)
            act = saved_activation_bytes(m, x)
            print(f"{name:<44} {variant:<12} {act / 2**20:>15.2f} MiB {state_bytes(m) / 2**20:>15.2f} MiB")


if __name__ == "__main__":
    main()
