"""torch.func over a swapped model, as over the dense one: per-sample
gradients (vmap of grad), Jacobians (jacrev), a training step through
functional_call with the buffers handed in (meta-learning), stacked models
trained under vmap (ensembles). The transforms follow torch's ops only: the
model then runs unfused (torch's BatchNorm and ReLU around the sparse
layers) and each sparse layer through an autograd.Function written for
them; vmap folds its dimension into the layers' batch where the weights
are not vmapped (f32), else runs the layers once per sample. Forward-mode
AD (jvp, jacfwd, hessian) is refused by torch, not computed wrongly."""

import copy

import pytest
import torch
from test_fuse import _InPlaceBasicBlock  # torchvision's BasicBlock, line for line
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

from conftest import assert_close_rel, at_pattern, prune_random_
from qsparseprop import swap_modules_with_sparse


def _network(seed: int, batch_norm: bool = True, dense_stem: bool = True) -> nn.Sequential:
    """A stem, dense unless dense_stem is False (BatchNorm and ReLU after
    it: BatchNormReLU2d once swapped), torchvision's BasicBlock with a
    downsample (fused BatchNorms, the residual end, the shared input), an
    MLP head (the fused pair); or, without batch_norm, convolutions and ReLUs
    alone."""
    torch.manual_seed(seed)
    if batch_norm:
        body = [nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), _InPlaceBasicBlock(8, 16, 2)]
    else:
        body = [nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()]
    model = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    for i, m in enumerate(model.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (m is not model[0] or not dense_stem):
            prune_random_(m, 0.85, generator_seed=i)
    return model


def _swapped(dense: nn.Module, scheme: str) -> nn.Module:
    return swap_modules_with_sparse(
        copy.deepcopy(dense), (4, 2, 8, 8), verbose=False, scheme=scheme, min_sparsity=0.5, min_speedup=0.0,
        repeats=1, warmup=0, persistent=False,
    )  # fmt: skip


def _state(model: nn.Module):
    return ({k: v.detach() for k, v in model.named_parameters()},
            {k: v.detach().clone() for k, v in model.named_buffers()})  # fmt: skip


def _assert_grads_match_dense(got: dict, want: dict, model: nn.Module, per_sample: bool):
    """Our gradients against the dense model's: a sparse layer's values
    against the dense weight's gradient at its pattern, the rest as they are."""
    modules = dict(model.named_modules())
    for name, g in got.items():
        owner, leaf = name.rpartition(".")[::2]
        if leaf == "values":
            dense, layer = want[owner + ".weight"], modules[owner]
            w = torch.stack([at_pattern(d, layer) for d in dense]) if per_sample else at_pattern(dense, layer)
        else:
            w = want[name]
        assert g.shape == w.shape, name
        assert_close_rel(g, w, 1e-4, name)
    assert {n.replace("values", "weight") for n in got} == set(want)


def test_per_sample_gradients_and_the_input_jacobian_equal_the_dense_models():
    dense = _network(0).eval()
    ours = _swapped(dense, "f32").eval()
    assert any(type(m).__name__ == "FusedBatchNorm2d" for m in ours.modules()), "nothing fused: the test tests nothing"
    buffers_before = {k: v.clone() for k, v in ours.named_buffers()}
    x, labels = torch.randn(3, 2, 8, 8), torch.tensor([0, 3, 4])

    def per_sample(model):
        params, buffers = _state(model)

        def loss(p, xs, ys):
            out = functional_call(model, (p, buffers), (xs.unsqueeze(0),))
            return nn.functional.cross_entropy(out, ys.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)

    _assert_grads_match_dense(per_sample(ours), per_sample(dense), ours, per_sample=True)
    assert_close_rel(jacrev(ours)(x[:2]), jacrev(dense)(x[:2]), 1e-4, "input Jacobian")
    assert_close_rel(vmap(ours)(x.unsqueeze(1)), vmap(dense)(x.unsqueeze(1)), 1e-5, "vmap of the forward")
    for k, v in ours.named_buffers():
        assert torch.equal(v, buffers_before[k]), f"an evaluation under torch.func changed {k}"


def test_a_training_step_through_functional_call_updates_the_buffers_handed_in():
    # meta-learning's inner step: train mode, the BatchNorms' statistics
    # updated in the buffers given to functional_call, as torch's are
    dense = _network(1).train()
    ours = _swapped(dense, "f32").train()
    x = torch.randn(4, 2, 8, 8)

    def step(model):
        params, buffers = _state(model)
        return grad(lambda p, b: functional_call(model, (p, b), (x,)).square().sum())(params, buffers), buffers

    (got, got_buffers), (want, want_buffers) = step(ours), step(dense)
    _assert_grads_match_dense(got, want, ours, per_sample=False)
    for k, v in want_buffers.items():
        assert_close_rel(got_buffers[k].float(), v.float(), 1e-5, k)
    steps = [v for k, v in got_buffers.items() if k.endswith("_step")]
    assert steps and all(int(s) == 1 for s in steps), "the layers' step count stays where the buffers went"


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_stacked_models_train_under_vmap_as_each_alone(scheme):
    # an ensemble: three models' parameters and buffers stacked, one
    # training step's gradients under vmap; each model's own eager step
    # (the fused blocks, the same rounding seed: the first step) gives the
    # same: f32 with BatchNorm and torch's dense stem within rounding
    # (torch's convolution under vmap is another algorithm); int8 with every
    # layer sparse to the bit. (A dense stem before int8 layers rounds its
    # output differently under vmap, and one int8 input rounded the other
    # way changes the gradients: it did on a Zen 3.)
    batch_norm = scheme == "f32"
    models = [_swapped(_network(seed, batch_norm, dense_stem=batch_norm), scheme).train() for seed in (2, 3, 4)]
    if not batch_norm:
        assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in models[0].modules()), "a layer stayed dense"
    x = torch.randn(4, 2, 8, 8)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    grads = vmap(grad(lambda p, b: functional_call(base, (p, b), (x,)).square().sum()))(params, buffers)
    assert all(int(s) == 1 for k, v in buffers.items() if k.endswith("_step") for s in v)
    for i, model in enumerate(models):
        model.zero_grad()
        model(x).square().sum().backward()
        for name, p in model.named_parameters():
            if batch_norm:
                assert_close_rel(grads[name][i], p.grad, 1e-5, f"model {i} {name}")
            else:
                assert torch.equal(grads[name][i], p.grad), f"model {i} {name}"


def test_forward_mode_is_refused_not_computed_wrongly():
    ours = _swapped(_network(5), "f32").eval()
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(ours, (x,), (torch.ones_like(x),))


def test_a_vmapped_batch_is_folded_into_the_layers_batch_where_it_can_be(monkeypatch):
    # f32 with the weights not vmapped: forward and backward-data one call
    # each over the folded batch, the same values as one call per sample
    # (the rule's fallback), the weights' per-sample gradients a call each
    import qsparseprop._ops as ops

    dense = _network(6).eval()
    ours = _swapped(dense, "f32").eval()
    x, labels = torch.randn(5, 2, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    params, buffers = _state(ours)

    def loss(p, xs, ys):
        return nn.functional.cross_entropy(functional_call(ours, (p, buffers), (xs.unsqueeze(0),)), ys.unsqueeze(0))

    folds = []
    foldable = ops._foldable
    monkeypatch.setattr(ops, "_foldable", lambda *a: folds.append(foldable(*a)) or folds[-1])
    folded = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    assert folds and all(folds), "nothing was folded: the test tests nothing"
    monkeypatch.setattr(ops, "_foldable", lambda *a: False)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    for k, v in per_sample.items():
        assert_close_rel(folded[k], v, 1e-5, k)
