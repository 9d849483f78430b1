"""torch.compile (inductor) on whole models with several sparse layers:
training steps match eager (f32 within 1e-5, s8 bit for bit: the same
kernels run the same integers), and nothing recompiles after the first
step (layers are told apart by tensors, not Python ints; the step's seed is
a tensor)."""

import copy

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from torch import nn

import qsparseprop as q
from conftest import prune_random_


def _pruned(*layers, sparsity):
    """An nn.Sequential of ``layers`` (made after seeding) with every Linear / Conv2d pruned."""
    m = nn.Sequential(*layers)
    for layer in m:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            prune_random_(layer, sparsity)
    return m


def _mlp():
    torch.manual_seed(0)
    return _pruned(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), sparsity=0.8)


def _cnn():
    torch.manual_seed(0)
    return _pruned(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10), sparsity=0.7,
    )  # fmt: skip


def _cnn_bn():  # fused Conv2d-BatchNorm2d-ReLU blocks (qsparseprop.fuse after the swap)
    torch.manual_seed(0)
    return _pruned(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10), sparsity=0.7,
    )  # fmt: skip


def _resnet():  # residual blocks: their ends (BatchNorm + add + ReLU) fused into one pass
    from qsparseprop.finetune import _Residual

    torch.manual_seed(0)
    # the second block's first convolution and strided shortcut run as one
    # function in eager mode; the compiled model calls the two
    m = nn.Sequential(_Residual(3, 8, 1), _Residual(8, 16, 2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    for layer in m.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            prune_random_(layer, 0.7)
    return m


def _swap(model, scheme):
    m = copy.deepcopy(model)
    seed = 0
    for parent in list(m.modules()):
        for name, layer in list(parent.named_children()):
            if isinstance(layer, nn.Conv2d):
                cls = q.QuantizedSparseConv2d if scheme == "s8" else q.SparseConv2d
            elif isinstance(layer, nn.Linear):
                cls = q.QuantizedSparseLinear if scheme == "s8" else q.SparseLinear
            else:
                continue
            setattr(parent, name, cls.from_dense(layer, seed=seed))
            seed += 1
    return q.fuse(m)


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize(
    "make,shape,dynamic",
    [
        (_mlp, (16, 32), None),
        (_cnn, (4, 3, 8, 8), False),
        (_cnn, (4, 3, 8, 8), True),
        (_cnn_bn, (4, 3, 8, 8), False),
        (_resnet, (4, 3, 8, 8), False),
    ],  # fmt: skip
)
def test_compiled_training_matches_eager_without_recompiling(make, shape, dynamic, scheme):
    base = make()
    eager, compiled_model = _swap(base, scheme), _swap(base, scheme)
    if make is _resnet:  # their forwards rewritten (the compiled one traces the rewrite)
        assert all("_qsparseprop_fused_forward" in block.__dict__ for block in compiled_model[:2])
    compiled = torch.compile(compiled_model, dynamic=dynamic)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(shape, generator=gen)
        target = torch.randint(0, 10, (shape[0],), generator=gen)
        outs = []
        for model, run in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad(set_to_none=True)
            out = run(x)
            nn.functional.cross_entropy(out, target).backward()
            outs.append(out.detach())
        grads = [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True)]
        if scheme == "s8":
            assert torch.equal(outs[0], outs[1]), f"step {step}: outputs differ"
            for ge, gc in grads:
                assert torch.equal(ge, gc), f"step {step}: gradients differ"
        else:
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
            for ge, gc in grads:
                torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the same SGD step on both
            for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True):
                a -= 0.1 * a.grad
                b -= 0.1 * b.grad
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1, dict(dynamo_utils.counters["stats"])
    assert not dynamo_utils.counters["recompiles"], dict(dynamo_utils.counters["recompiles"])
