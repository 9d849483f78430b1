"""Fused Conv2d-BatchNorm2d(-ReLU) blocks (qsparseprop.fuse): a fused block
computes what the same swapped convolution followed by torch's BatchNorm2d
and ReLU does — outputs, every gradient, running statistics and
num_batches_tracked, over training steps and then in eval — for f32, s8 and
the int8 prototype, channels_last, batch 1, 1-3 threads, every BatchNorm
option (a fused int8 block as its prototype, which keeps BatchNorm's input
as int8 too); and it stays the same model to everything around it (state_dict
keys, checkpoints both ways, optimizers, to_dense, swap plans)."""

import contextlib
import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import qsparseprop as q
from conftest import a_relu_input_near_a_kink, assert_close_rel, property_settings, prune_random_, torch_threads

CLASSES = {"f32": q.SparseConv2d, "s8": q.QuantizedSparseConv2d, "prototype": q.PrototypeQuantizedSparseConv2d}


def _block(bn_kwargs=None, relu=True, cin=5, cout=7, stride=1, seed=0):
    torch.manual_seed(seed)
    conv = prune_random_(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), 0.8)
    bn = nn.BatchNorm2d(cout, **(bn_kwargs or {}))
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return nn.Sequential(conv, bn, *([nn.ReLU()] if relu else []), nn.Conv2d(cout, 3, 1))


def _pair(dense, scheme):
    unfused = copy.deepcopy(dense)
    unfused[0] = CLASSES[scheme].from_dense(dense[0], seed=3)
    fused = q.fuse(copy.deepcopy(unfused))
    return unfused, fused


def _converted_and_fused(dense: nn.Module, scheme: str, keep: nn.Module | None = None):
    """(a copy of ``dense`` with every Conv2d and Linear but ``keep`` (a
    module of ``dense``) converted to the scheme's sparse layer, seed 3;
    that model fused)."""
    unfused = copy.deepcopy(dense)
    linear = q.QuantizedSparseLinear if scheme == "s8" else q.SparseLinear
    for name, m in dense.named_modules():
        if m is not keep and type(m) in (nn.Conv2d, nn.Linear):
            parent, _, child = name.rpartition(".")
            cls = CLASSES[scheme] if type(m) is nn.Conv2d else linear
            setattr(unfused.get_submodule(parent), child, cls.from_dense(unfused.get_submodule(name), seed=3))
    return unfused, q.fuse(copy.deepcopy(unfused))


def _close(got, want, scheme, what, at_least=0.0):
    # f32: rounding (sums in another order, over steps); s8: an int8 gradient
    # rounding may also flip on a last-bit difference of the fp32 BatchNorm;
    # "int8 copy": a fused int8 block's backward reads BatchNorm's input as
    # int8 (the unfused one keeps torch's fp32): the gradients differ by that
    # rounding, about 1 % of the step per element
    rel = {"f32": 1e-4, "int8 copy": 3e-2}.get(scheme, 2e-3)
    assert_close_rel(got, want, rel, what, at_least)


def _train_and_compare(
    unfused, fused, shape, scheme, steps=3, channels_last=False, gradients=None, lr=0.05, model_scale=False
):
    # lr=0 where the gradients differ by more than rounding (the int8 copy,
    # or an int8 rounding flipped by a last-bit difference): the models do
    # not step, so what follows from the same weights stays comparable.
    # model_scale: each gradient within the tolerance of the model's largest
    # gradient too (random blocks: a convolution whose BatchNorm normalizes
    # its one channel away has a zero weight gradient, computed as rounding
    # noise of terms the size of the others), and the running statistics
    # within the tolerance of their largest value (a channel's batch mean
    # near zero is the rounding of sums the size of the other channels')
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(shape, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for model in (unfused, fused):
            model.zero_grad(set_to_none=True)
            out = model(x)
            out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.numel()).view_as(out))
            outs.append(out)
        _close(outs[1], outs[0], scheme, f"step {step}: output")
        assert outs[1].is_contiguous(memory_format=torch.channels_last) == outs[0].is_contiguous(
            memory_format=torch.channels_last
        )
        largest = max((p.grad.abs().max().item() for p in unfused.parameters() if p.grad.numel()), default=0.0)
        largest = largest if model_scale else 0.0
        for (name, a), b in zip(unfused.named_parameters(), fused.parameters(), strict=True):
            _close(b.grad, a.grad, gradients or scheme, f"step {step}: gradient of {name}", largest)
        for (name, a), b in zip(unfused.named_buffers(), fused.buffers(), strict=True):
            if name.endswith("_handle"):  # the kernel cache's slot: one per layer
                continue
            if a.is_floating_point() and model_scale:
                _close(b, a, scheme, f"step {step}: buffer {name}")
            elif a.is_floating_point():
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {step}: buffer {name}")
            else:
                assert torch.equal(a, b), f"step {step}: buffer {name}"
        with torch.no_grad():
            for a, b in zip(unfused.parameters(), fused.parameters(), strict=True):
                a -= lr * a.grad
                b -= lr * b.grad
    unfused.eval(), fused.eval()
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        _close(fused(x), unfused(x), scheme, "eval output")
    unfused.train(), fused.train()


@pytest.mark.parametrize("scheme", ["f32", "s8", "prototype"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_a_fused_block_trains_as_the_unfused_layers(scheme, relu, threads):
    with torch_threads(threads):
        unfused, fused = _pair(_block(relu=relu), scheme)
        assert isinstance(fused[1], q.FusedBatchNorm2d)
        assert isinstance(fused[2], q.FusedReLU) == relu
        int8 = scheme != "f32"
        _train_and_compare(unfused, fused, (4, 5, 9, 7), scheme, gradients="int8 copy" if int8 else None,
                           lr=0.0 if int8 else 0.05)  # fmt: skip


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_a_fused_int8_block_is_its_prototype(relu, threads):
    # the prototype models the chain (docs/quantization.md): the int8 copy of
    # BatchNorm's input included, so here the int8 tolerance holds for every
    # gradient too
    with torch_threads(threads):
        dense = _block(relu=relu, seed=2)
        _, prototype = _pair(dense, "prototype")
        _, fused = _pair(dense, "s8")
        _train_and_compare(prototype, fused, (4, 5, 9, 7), "s8", lr=0.0)


def _saved_tensors(model, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum().backward()
    return saved


@pytest.mark.parametrize("scheme", ["s8", "prototype"])
def test_a_fused_int8_block_keeps_batch_norms_input_as_int8(scheme):
    # the block's one fp32 activation of the convolution's output size is
    # torch's own (the last, unswapped 1x1 convolution's input); BatchNorm's
    # input is kept as int8 of that size
    unfused, fused = _pair(_block(), scheme)
    x = torch.randn(2, 5, 6, 6)
    y_numel = 2 * 7 * 6 * 6

    def count(model, dtype):
        return sum(t.dtype == dtype and t.numel() == y_numel for t in _saved_tensors(model, x))

    assert count(fused, torch.int8) == 1
    assert count(fused, torch.float32) == 1  # was 2: the convolution's output y too
    fused.eval()  # running statistics: BatchNorm's input itself, as torch keeps it
    assert count(fused, torch.int8) == 0


@pytest.mark.parametrize(
    "bn_kwargs",
    [
        {"momentum": None},  # the cumulative average
        {"momentum": 0.3, "eps": 1e-3},
        {"track_running_stats": False},  # batch statistics in eval too
        {"affine": False},
        # turned off after construction: the statistics are no longer
        # updated, eval still uses them (the fused passes used to update them)
        {"set_after": {"track_running_stats": False}},
    ],
    ids=["momentum-none", "momentum-eps", "no-running-stats", "no-affine", "tracking-off-later"],
)
def test_every_batch_norm_option_is_kept(bn_kwargs):
    bn_kwargs = dict(bn_kwargs)
    later = bn_kwargs.pop("set_after", {})
    block = _block(bn_kwargs)
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.__dict__.update(later)
    unfused, fused = _pair(block, "f32")
    _train_and_compare(unfused, fused, (3, 5, 6, 6), "f32")


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_channels_last_batch_one_and_strided(scheme):
    unfused, fused = _pair(_block(stride=2, seed=4), scheme)
    int8 = scheme != "f32"
    _train_and_compare(unfused, fused, (1, 5, 9, 8), scheme, channels_last=True,
                       gradients="int8 copy" if int8 else None, lr=0.0 if int8 else 0.05)  # fmt: skip


def test_a_single_value_per_channel_is_refused_in_training_as_torch_does():
    unfused, fused = _pair(_block(), "f32")
    x = torch.randn(1, 5, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        unfused(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(x)
    fused.eval()
    assert fused(x).shape == (1, 3, 1, 1)  # running statistics: fine


def test_an_empty_batch_gives_an_empty_output():
    unfused, fused = _pair(_block(), "f32")
    fused.eval(), unfused.eval()
    x = torch.randn(0, 5, 6, 6)
    assert fused(x).shape == unfused(x).shape == (0, 3, 6, 6)


def test_skipping_the_batch_norm_or_the_relu_would_be_seen():
    # the comparison above is not vacuous: without the fused BatchNorm the block's output differs
    unfused, fused = _pair(_block(), "f32")
    x = torch.randn(2, 5, 6, 6)
    plain = copy.deepcopy(fused)
    object.__setattr__(plain[0], "fused_batch_norm", None)
    assert not torch.allclose(plain(x), unfused(x), atol=1e-3)
    no_relu = copy.deepcopy(fused)
    no_relu[0].fused_relu = False
    assert not torch.allclose(no_relu(x), unfused(x), atol=1e-3)
    torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-5)


def test_state_dict_checkpoints_and_optimizers_see_the_same_model():
    unfused, fused = _pair(_block(), "f32")
    assert list(fused.state_dict()) == list(unfused.state_dict())
    # the BatchNorm's parameters are the very tensors an optimizer made before fusing holds
    model = copy.deepcopy(unfused)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bn_weight = model[1].weight
    q.fuse(model)
    assert model[1].weight is bn_weight
    model(torch.randn(2, 5, 6, 6)).sum().backward()
    before = bn_weight.detach().clone()
    opt.step()
    assert not torch.equal(before, bn_weight.detach())
    # checkpoints load both ways
    trained = copy.deepcopy(fused)
    trained(torch.randn(4, 5, 6, 6)).sum().backward()
    other_unfused, other_fused = _pair(_block(seed=9), "f32")
    other_unfused.load_state_dict(trained.state_dict())
    other_fused.load_state_dict(trained.state_dict())
    for model in (other_unfused, other_fused):
        model.eval()
    trained.eval()
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(other_fused(x), trained(x))
    torch.testing.assert_close(other_unfused(x), trained(x), rtol=1e-5, atol=1e-5)


def test_to_dense_puts_the_modules_back_and_fusing_twice_changes_nothing():
    unfused, fused = _pair(_block(), "f32")
    again = q.fuse(copy.deepcopy(fused))
    assert [type(m) for m in again] == [type(m) for m in fused]
    dense = q.to_dense(fused)
    assert [type(m) for m in dense] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    x = torch.randn(2, 5, 6, 6)
    fused.eval(), dense.eval()
    torch.testing.assert_close(dense(x), fused(x), rtol=1e-5, atol=1e-5)
    assert [type(m) for m in q.to_dense(fused[0])] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_the_swap_fuses_and_its_plan_records_it(tmp_path):
    dense = _block()
    swapped = q.swap_modules_with_sparse(copy.deepcopy(dense), (2, 5, 6, 6), verbose=False, min_speedup=0.0)
    row = next(r for r in swapped.qsparseprop_swap_report if r.name == "0")
    assert row.swapped and row.fused_batch_norm and row.fused_relu
    assert isinstance(swapped[1], q.FusedBatchNorm2d) and isinstance(swapped[2], q.FusedReLU)
    q.save_swap_plan(swapped, tmp_path / "plan.json")
    replayed = q.apply_swap_plan(copy.deepcopy(dense), tmp_path / "plan.json")
    assert [type(m) for m in replayed] == [type(m) for m in swapped]
    kept = q.swap_modules_with_sparse(copy.deepcopy(dense), (2, 5, 6, 6), verbose=False, min_speedup=0.0, fuse=False)
    assert type(kept[1]) is nn.BatchNorm2d
    # a plan that fused a BatchNorm the model no longer has is refused
    no_bn = nn.Sequential(copy.deepcopy(dense[0]), nn.Identity(), nn.ReLU(), copy.deepcopy(dense[3]))
    with pytest.raises(ValueError, match="BatchNorm fused"):
        q.apply_swap_plan(no_bn, tmp_path / "plan.json")


def test_a_residual_block_fuses_its_three_batch_norms():
    from qsparseprop.finetune import _Residual

    torch.manual_seed(0)
    unfused = _swapped(_Residual(6, 12, 2))
    fused = q.fuse(copy.deepcopy(unfused))
    assert sum(isinstance(m, q.FusedBatchNorm2d) for m in fused.modules()) == 3
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        x = torch.randn(3, 6, 8, 8, generator=gen)
        a, b = unfused(x), fused(x)
        a.sum().backward(), b.sum().backward()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for pa, pb in zip(unfused.parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4)


def test_the_swap_times_a_convolution_as_its_fused_block_without_touching_the_model():
    dense = _block()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    swapped = q.swap_modules_with_sparse(dense, (2, 5, 6, 6), verbose=False, min_speedup=0.0, persistent=False)
    row = next(r for r in swapped.qsparseprop_swap_report if r.name == "0")
    assert "as the block Conv2d+BatchNorm2d+ReLU, fused" in row.reason, row.reason
    after = swapped.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "1.weight"):
        assert torch.equal(after[key], before[key]), key  # timing ran on copies
    assert swapped[0].__dict__["fused_batch_norm"] is swapped[1]  # fused with the model's own BatchNorm
    plain = q.swap_modules_with_sparse(_block(), (2, 5, 6, 6), verbose=False, min_speedup=0.0, fuse=False)
    assert "block" not in next(r for r in plain.qsparseprop_swap_report if r.name == "0").reason


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock shape: one ReLU module called twice, a downsample Sequential."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class _SharedBatchNorm(nn.Module):
    """A BatchNorm applied to two tensors, and a conv whose output is used twice: nothing fusable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.other = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.bn(self.other(x)) + y


def _prune_convs(module, sparsity=0.8):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            prune_random_(m, sparsity)
    return module


def _swapped(module, scheme="f32", sparsity=0.8):
    """``module`` with its convolutions pruned and swapped for sparse ones."""
    torch.manual_seed(0)
    _prune_convs(module, sparsity)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, name, CLASSES[scheme].from_dense(child))
    return module


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_traced_block_fuses_its_batch_norms_and_keeps_a_shared_relu(scheme):
    torch.manual_seed(0)
    unfused = _swapped(_BasicBlock(6, 8, 2), scheme)
    fused = q.fuse(copy.deepcopy(unfused))
    assert isinstance(fused.bn1, q.FusedBatchNorm2d) and isinstance(fused.bn2, q.FusedBatchNorm2d)
    assert isinstance(fused.downsample[1], q.FusedBatchNorm2d)
    assert type(fused.relu) is nn.ReLU and not fused.conv1.fused_relu  # called twice: not fused
    assert list(fused.state_dict()) == list(unfused.state_dict())
    # int8: against the chain's prototype (BatchNorm's input kept as int8 in
    # both); the unfused layers keep it in fp32, and on layers this small an
    # int8 gradient rounding that flips on that difference moves a weight
    # gradient by the scheme's own error (tens of %, as s8 against f32 here)
    if scheme == "s8":
        torch.manual_seed(0)
        reference = q.fuse(_swapped(_BasicBlock(6, 8, 2), "prototype"))
    else:
        reference = unfused
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(3, 6, 9, 9, generator=gen)
        a, b = reference(x), fused(x)
        g = torch.randn(a.shape, generator=gen)
        a.backward(g), b.backward(g)
        _close(b, a, scheme, "output")
        for (name, pa), pb in zip(reference.named_parameters(), fused.parameters(), strict=True):
            _close(pb.grad, pa.grad, scheme, name)
    assert int(fused.bn1.num_batches_tracked) == int(reference.bn1.num_batches_tracked) == 2
    dense = q.to_dense(fused)
    assert type(dense.bn1) is nn.BatchNorm2d and type(dense.downsample[1]) is nn.BatchNorm2d


def test_a_traced_module_fuses_nothing_that_is_used_twice_and_a_relu_module_called_once_is_fused():
    shared = _swapped(_SharedBatchNorm())
    fused = q.fuse(copy.deepcopy(shared))
    assert type(fused.bn) is nn.BatchNorm2d and fused.conv.__dict__.get("fused_batch_norm") is None
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(fused(x), shared(x))

    class ConvBnRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 5, 3, 1, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x))) * 2

    unfused = _swapped(ConvBnRelu())
    fused = q.fuse(copy.deepcopy(unfused))
    assert isinstance(fused.act, q.FusedReLU) and fused.conv.fused_relu
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-5)


def test_the_swap_fuses_a_traced_block_and_times_its_convolutions_as_blocks():
    torch.manual_seed(0)
    block = _prune_convs(_BasicBlock(6, 8, 1))
    swapped = q.swap_modules_with_sparse(
        block, (2, 6, 8, 8), verbose=False, min_speedup=0.0, min_sparsity=0.5, persistent=False
    )
    rows = {r.name: r for r in swapped.qsparseprop_swap_report}
    for name in ("conv1", "conv2", "downsample.0"):
        assert rows[name].swapped and rows[name].fused_batch_norm, rows[name]
        assert "(as the block Conv2d+BatchNorm2d, fused)" in rows[name].reason, rows[name].reason
        assert not rows[name].fused_relu  # the block's ReLU module is called twice
    assert isinstance(swapped.bn1, q.FusedBatchNorm2d) and type(swapped.relu) is nn.ReLU


# ---- a BatchNorm after a dense convolution (the network's first) -------------------


def _stem(bn_kwargs=None, relu=True):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, **(bn_kwargs or {}))
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    # no bias before the BatchNorm: its gradient is zero up to rounding noise
    stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    return nn.Sequential(stem, bn, *([nn.ReLU()] if relu else []), nn.Conv2d(6, 2, 1))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(
    "bn_kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
    ids=["default", "momentum-none", "no-affine", "no-running-stats"],
)  # fmt: skip
def test_a_batch_norm_after_a_dense_convolution_runs_the_fused_passes(relu, bn_kwargs):
    dense = _stem(bn_kwargs, relu)
    fused = q.fuse(copy.deepcopy(dense))
    assert isinstance(fused[1], q.BatchNormReLU2d) and fused[1].relu == relu
    assert isinstance(fused[2], q.FusedReLU) == relu
    assert list(fused.state_dict()) == list(dense.state_dict())
    _train_and_compare(dense, fused, (4, 3, 9, 7), "f32")
    _train_and_compare(dense, fused, (1, 3, 5, 8), "f32", channels_last=True)  # torch's own, layout kept
    back = q.to_dense(fused)
    assert type(back[1]) is nn.BatchNorm2d and not hasattr(back[1], "relu")
    assert (type(back[2]) is nn.ReLU) == relu
    assert list(back.state_dict()) == list(dense.state_dict())
    with pytest.raises(ValueError, match="expected 4D input"):
        fused[1](torch.randn(6, 5, 5))


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def test_a_traced_stem_fuses_its_batch_norm_and_relu():
    torch.manual_seed(0)
    dense = nn.Sequential(_Stem(), nn.Conv2d(6, 2, 1))
    fused = q.fuse(copy.deepcopy(dense))
    assert isinstance(fused[0].bn, q.BatchNormReLU2d) and fused[0].bn.relu
    assert isinstance(fused[0].relu, q.FusedReLU)
    _train_and_compare(dense, fused, (3, 3, 7, 7), "f32")


def test_the_swap_fuses_a_batch_norm_after_a_layer_it_keeps_dense():
    dense = _stem()
    swapped = q.swap_modules_with_sparse(copy.deepcopy(dense), (2, 3, 8, 8), verbose=False)
    assert not any(r.swapped for r in swapped.qsparseprop_swap_report)  # nothing pruned
    assert isinstance(swapped[1], q.BatchNormReLU2d) and swapped[1].relu
    plain = q.swap_modules_with_sparse(copy.deepcopy(dense), (2, 3, 8, 8), verbose=False, fuse=False)
    assert type(plain[1]) is nn.BatchNorm2d


# ---- residual block ends: BatchNorm + add + ReLU in one pass ----------------------


class _InPlaceBasicBlock(nn.Module):
    """torchvision's BasicBlock forward, line for line: `out += identity`, an
    in-place ReLU module called twice, a downsample only where the shape
    changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


def _residual(cin, cout, stride):
    from qsparseprop.finetune import _Residual

    return _Residual(cin, cout, stride)


RESIDUAL_BLOCKS = {
    "finetune's, identity": lambda: _residual(6, 6, 1),
    "finetune's, 1x1 shortcut": lambda: _residual(6, 12, 2),
    "torchvision's, identity": lambda: _InPlaceBasicBlock(6, 6, 1),
    "torchvision's, downsample": lambda: _InPlaceBasicBlock(6, 8, 2),
    "every ReLU a function": lambda: _FunctionalBlock(),
}


class _FunctionalBlock(nn.Module):
    """The add and the ReLU as torch functions, the residual first."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(6, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.nn.functional.relu(torch.add(x, self.bn(self.conv(x))))


def _residual_calls(monkeypatch):
    """Whether each BatchNorm pass of the C++ path was given a residual (a
    block's inner BatchNorm written as the next s8 convolution's input has
    none)."""
    from qsparseprop import _ops

    calls = []
    real, real_deferred = _ops._batch_norm_forward_body, q.SparseConv2d._forward_after_batch_norm

    def spy(*args):
        calls.append(args[9] is not None)  # the residual
        return real(*args)

    def spy_deferred(self, deferred, residual):
        calls.append(False)
        return real_deferred(self, deferred, residual)

    monkeypatch.setattr(_ops, "_batch_norm_forward_body", spy)
    monkeypatch.setattr(q.SparseConv2d, "_forward_after_batch_norm", spy_deferred)
    return calls


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize("block", list(RESIDUAL_BLOCKS))
def test_a_residual_blocks_end_runs_in_its_batch_norms_pass(scheme, block, monkeypatch):
    # f32: as the unfused swapped block (torch's BatchNorm, add and ReLU);
    # s8: as the prototype of the fused chain (its int8 copy of BatchNorm's
    # input included), over training steps and then in eval
    torch.manual_seed(0)
    fused = q.fuse(_swapped(RESIDUAL_BLOCKS[block](), scheme))
    assert fused.__dict__.get("_qsparseprop_fused_forward") and "forward" in fused.__dict__
    torch.manual_seed(0)
    reference = _swapped(RESIDUAL_BLOCKS[block](), "f32" if scheme == "f32" else "prototype")
    if scheme == "s8":
        reference = q.fuse(reference)
    calls = _residual_calls(monkeypatch)
    _train_and_compare(reference, fused, (3, 6, 8, 8), scheme, lr=0.05 if scheme == "f32" else 0.0)
    # one residual per block end, each forward (3 training steps, then eval)
    assert sum(calls) == 4 and len(calls) == 4 * sum(isinstance(m, q.FusedBatchNorm2d) for m in fused.modules())


def test_a_residual_end_with_another_layout_falls_back_to_torchs_add():
    torch.manual_seed(0)
    unfused = _swapped(_InPlaceBasicBlock(6, 8, 2))
    fused = q.fuse(copy.deepcopy(unfused))
    _train_and_compare(unfused, fused, (2, 6, 9, 9), "f32", channels_last=True, lr=0.0)


def test_a_rewritten_block_stays_the_same_module_to_everything_around_it(tmp_path):
    torch.manual_seed(0)
    unfused = _swapped(_InPlaceBasicBlock(6, 8, 2))
    fused = q.fuse(copy.deepcopy(unfused))
    assert type(fused) is _InPlaceBasicBlock and list(fused.state_dict()) == list(unfused.state_dict())
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        want = unfused.eval()(x)
        fused.eval()

        def check(model, what):
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5, msg=what)

        check(fused, "fused")
        rewritten = fused.__dict__["forward"]
        assert q.fuse(fused).__dict__["forward"] is rewritten  # fusing twice changes nothing
        twin = copy.deepcopy(fused)  # keeps the rewrite, bound to the copy
        assert twin.forward.__self__ is twin and twin.__dict__.get("_qsparseprop_fused_forward")
        check(twin, "deepcopy")
        torch.save(fused, tmp_path / "block.pt")  # comes back with its class's forward
        back = torch.load(tmp_path / "block.pt", weights_only=False)
        check(back, "pickled")
        assert back.forward.__func__ is _InPlaceBasicBlock.forward
        assert q.fuse(back).forward.__func__ is not _InPlaceBasicBlock.forward  # and fuses again
        check(back, "pickled, fused again")
        dense = q.to_dense(fused)
        assert "forward" not in dense.__dict__ and type(dense.bn2) is nn.BatchNorm2d
        check(dense, "to_dense")


def test_fusing_keeps_each_modules_training_mode():
    # a BatchNorm frozen in eval inside a block in training stays so
    torch.manual_seed(0)
    block = _swapped(_InPlaceBasicBlock(6, 8, 2))
    block.bn1.eval()
    fused = q.fuse(block)
    assert fused.training and not fused.bn1.training and fused.bn2.training
    assert fused.__dict__.get("_qsparseprop_fused_forward")


def test_a_forward_that_branches_on_training_is_not_rewritten():
    class Branching(_InPlaceBasicBlock):
        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + x) if self.training else self.relu(out - x)

    torch.manual_seed(0)
    fused = q.fuse(_swapped(Branching(6, 6, 1)))
    assert "_qsparseprop_fused_forward" not in fused.__dict__
    assert isinstance(fused.bn2, q.FusedBatchNorm2d)  # its BatchNorm is still fused


def test_the_swap_plan_records_a_fused_residual_end(tmp_path):
    torch.manual_seed(0)
    block = _prune_convs(_InPlaceBasicBlock(6, 6, 1))
    fresh = copy.deepcopy(block)
    swapped = q.swap_modules_with_sparse(block, (2, 6, 8, 8), verbose=False, min_sparsity=0.5, min_speedup=0.0)
    rows = {r.name: r for r in swapped.qsparseprop_swap_report}
    assert rows["conv2"].fused_residual and not rows["conv1"].fused_residual
    assert "_qsparseprop_fused_forward" in swapped.__dict__
    # a plan applied to the dense block rewrites its end the same way
    q.save_swap_plan(swapped, tmp_path / "plan.json")
    again = q.apply_swap_plan(fresh, tmp_path / "plan.json")
    assert "_qsparseprop_fused_forward" in again.__dict__
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(again(x), swapped(x))


def test_hooks_on_a_residual_ends_modules_still_see_their_calls():
    # the rewritten end calls the convolution and the ReLU module as torch
    # would once a hook (theirs, or a global one) is there to see it
    torch.manual_seed(0)
    unfused = _swapped(_InPlaceBasicBlock(6, 8, 2))
    fused = q.fuse(copy.deepcopy(unfused))
    x = torch.randn(2, 6, 8, 8)
    want = unfused(x)
    seen = []
    for module in (fused.conv2, fused.relu):
        handle = module.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
        handle.remove()
    # the ReLU module is called twice (after bn1 and at the end)
    assert seen == ["SparseConv2d", "ReLU", "ReLU"]
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append("global"))
    try:
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    assert "global" in seen
    # modules put in the end's places after fusing are what runs there, as
    # in the block's own forward
    fused.bn2 = nn.BatchNorm2d(8).eval()
    torch.testing.assert_close(
        fused(x), torch.relu(fused.bn2(fused.conv2(fused.relu(fused.conv1(x)))) + fused.downsample(x))
    )
    fused.relu = nn.Tanh()
    torch.testing.assert_close(
        fused(x), torch.tanh(fused.bn2(fused.conv2(fused.relu(fused.conv1(x)))) + fused.downsample(x))
    )


def _maxima_handed_over(monkeypatch, which="_channel_maxima_of"):
    """Per s8 convolution backward (or forward, ``_abs_max_of``): whether
    it took its gradient's channel maxima (its input's maximum) from the
    BatchNorm."""
    from qsparseprop import _ops

    taken = []
    real = getattr(_ops, which)
    monkeypatch.setattr(_ops, which, lambda g: taken.append(real(g) is not None) or real(g))
    return taken


def _one_step_gradients(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out, x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("block", ["plain", "finetune's, 1x1 shortcut"])
def test_an_int8_blocks_convolution_takes_its_gradients_maxima_from_the_batch_norm(block, monkeypatch):
    # the s8 convolution's backward takes max |dy| per channel as the
    # BatchNorm's backward found them writing dy, instead of reading dy once
    # more: the same gradients, bit for bit, as when it finds them itself
    torch.manual_seed(0)
    model = q.fuse(_swapped(_block() if block == "plain" else RESIDUAL_BLOCKS[block](), "s8"))
    x = torch.randn(3, model[0].in_channels if block == "plain" else 6, 8, 8)
    from qsparseprop import _ops

    twin = copy.deepcopy(model)  # the same rounding seeds for its one step
    taken = _maxima_handed_over(monkeypatch)
    taken_forward = _maxima_handed_over(monkeypatch, "_abs_max_of")
    handed = _one_step_gradients(model, x)
    # every convolution whose BatchNorm it applies (not the plain block's last one)
    with_batch_norm = sum(m.__dict__.get("fused_batch_norm") is not None for m in model.modules())
    assert sum(taken) == with_batch_norm > 0, taken
    # forward: each convolution reading a BatchNorm-ReLU's output whole (the
    # plain block's last); a residual block's second is given its int8
    # input by the BatchNorm instead (no maximum to take)
    assert sum(taken_forward) == (1 if block == "plain" else 0), taken_forward
    monkeypatch.setattr(_ops, "_hand_over_channel_maxima", lambda dy, maxima: None)
    monkeypatch.setattr(_ops, "_hand_over_abs_max", lambda z, abs_max: None)
    taken.clear(), taken_forward.clear()
    found = _one_step_gradients(twin, x)
    assert taken and not any(taken) and not any(taken_forward)
    for a, b in zip(handed, found, strict=True):
        assert torch.equal(a, b)


def test_a_first_convolution_takes_its_gradients_maxima_for_its_weights_alone(monkeypatch):
    # the network's first convolution (its input needs no gradient: its
    # backward is backward-weights alone) rounds its gradient from the
    # maxima its BatchNorm handed over too; the same gradients, bit for bit
    torch.manual_seed(0)
    model = q.fuse(_swapped(_block(), "s8"))
    twin = copy.deepcopy(model)
    x = torch.randn(3, 5, 8, 8)  # no requires_grad
    from qsparseprop import _ops

    def step(model):
        out = model(x)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return [out] + [p.grad for p in model.parameters()]

    taken = _maxima_handed_over(monkeypatch)
    handed = step(model)
    # backward order: the last 1x1 convolution (no BatchNorm after it), then
    # the first, whose fused BatchNorm handed its maxima over
    assert taken == [False, True], taken
    monkeypatch.setattr(_ops, "_hand_over_channel_maxima", lambda dy, maxima: None)
    taken.clear()
    found = step(twin)
    assert taken == [False, False]
    for a, b in zip(handed, found, strict=True):
        assert torch.equal(a, b)


def test_a_gradient_changed_on_its_way_is_not_taken_with_stale_maxima(monkeypatch):
    # a hook doubling dy in place between the BatchNorm and the convolution:
    # the maxima found before are stale, and the convolution finds its own
    torch.manual_seed(0)
    model = q.fuse(_swapped(_block(), "s8"))[:3]  # the convolution, its BatchNorm and ReLU
    twin = copy.deepcopy(model)
    x = torch.randn(3, 5, 8, 8)
    taken = _maxima_handed_over(monkeypatch)

    def doubled(model):
        x_ = x.clone().requires_grad_()
        out = model(x_)
        node = out.grad_fn
        while type(node).__name__ != "_SparseFunctionBackward":
            node = node.next_functions[0][0]
        node.register_prehook(lambda grads: (grads[0].mul_(2), None)[1])
        out.backward(torch.ones_like(out))
        return x_.grad

    got = doubled(model)
    assert taken == [False]
    from qsparseprop import _ops

    monkeypatch.setattr(_ops, "_hand_over_channel_maxima", lambda dy, maxima: None)
    assert torch.equal(got, doubled(twin))


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize("vectorizing_over_on", [True, False])
def test_the_convolution_gives_the_batch_norm_its_batch_statistics(scheme, vectorizing_over_on, monkeypatch):
    # training: the convolution takes its output's batch statistics (in the
    # output-width AVX-512 kernels' epilogue: a plane of 667 outputs; else
    # in the post-op's pass)
    # and the BatchNorm uses them instead of its own pass — the same model
    # as the BatchNorm finding them, within rounding, at 1 and 3 threads
    # alike; eval (running statistics): none are asked for
    from qsparseprop import _ops

    known = []
    real = _ops._batch_norm_forward_body

    def spy(*args):
        known.append(args[10] if len(args) > 10 else None)
        return real(*args)

    monkeypatch.setattr(_ops, "_batch_norm_forward_body", spy)
    dense = _block(seed=4, cin=6, cout=9)
    given = copy.deepcopy(dense)
    given[0] = CLASSES[scheme].from_dense(dense[0], vectorizing_over_on=vectorizing_over_on, seed=3)
    given = q.fuse(given)
    own = copy.deepcopy(given)
    own[0]._hands_statistics_over = lambda: False  # the BatchNorm's own pass
    x = torch.randn(4, 6, 23, 29)
    before = torch.get_num_threads()
    try:
        outs, forwards = [], []
        model = copy.deepcopy(given)  # one layer: the smaller team runs the larger's implementations
        for threads in (3, 1):
            torch.set_num_threads(threads)
            known.clear()
            outs.append(model[:3](x))  # the fused part (torch's 1x1 after it aside)
            forwards.append(model[0]._kernel().implementations(list(x.shape), threads).split("/")[0])
            assert len(known) == 1 and known[0] is not None and known[0].shape == (4 * 9,)
        assert forwards[0] == forwards[1], forwards
        assert torch.equal(outs[0], outs[1]), "the thread count changed the output"
    finally:
        torch.set_num_threads(before)
    known.clear()
    _train_and_compare(own, given, (4, 6, 23, 29), scheme, lr=0.05 if scheme == "f32" else 0.0)
    # 3 training steps of each model, then eval (running statistics): the
    # given model's training forwards had statistics, no other call did
    assert [k is not None for k in known] == [False, True] * 3 + [False, False]


# ---- a block's inner activation, written by its BatchNorm as the next layer's int8 input ----


def _steps_with_and_without_deferral(model, shape, monkeypatch, steps=3, threads=None):
    """(outputs, gradients and buffers of ``steps`` training steps then an
    eval forward of ``model`` and of its twin whose convolutions never defer
    their BatchNorm, the number of deferred BatchNorms per model call)."""
    twin = copy.deepcopy(model)  # the same rounding seeds
    deferred = []
    real = q.SparseConv2d._forward_after_batch_norm

    def spy(self, d, residual):
        deferred.append(1)
        return real(self, d, residual)

    monkeypatch.setattr(q.SparseConv2d, "_forward_after_batch_norm", spy)
    results, counts = [], []
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(shape, generator=gen) for _ in range(steps + 1)]
    before = torch.get_num_threads()
    for m, defers in ((model, True), (twin, False)):
        got = []
        with monkeypatch.context() as patch:
            if not defers:
                patch.setattr(q.SparseConv2d, "_defers_batch_norm", lambda self: False)
            try:
                if threads:
                    torch.set_num_threads(threads)
                m.train()
                for x in inputs[:steps]:
                    m.zero_grad(set_to_none=True)
                    deferred.clear()
                    out = m(x)
                    counts.append(len(deferred))
                    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
                    got += [out.detach()] + [p.grad.clone() for p in m.parameters()]
                m.eval()
                deferred.clear()
                got.append(m(inputs[steps]).detach())
                counts.append(len(deferred))
            finally:
                torch.set_num_threads(before)
        got += [b.clone() for n, b in m.named_buffers() if not n.endswith("_handle")]
        results.append(got)
    return results, counts


@pytest.mark.parametrize("block", list(RESIDUAL_BLOCKS)[:4])
def test_a_blocks_inner_activation_goes_to_the_next_convolution_as_int8_only(block, monkeypatch):
    # int8 residual block: its first BatchNorm (+ ReLU, fused or torchvision's
    # shared module) writes its output only as the second convolution's
    # int8 input, in training; every output, gradient and running statistic
    # is the unfused pair's, bit for bit, on 1 and 3 threads; eval (running
    # statistics) runs the modules as they are
    torch.manual_seed(0)
    model = q.fuse(_swapped(RESIDUAL_BLOCKS[block](), "s8"))
    for threads in (1, 3):
        (deferred, apart), counts = _steps_with_and_without_deferral(model, (3, 6, 8, 8), monkeypatch, threads=threads)
        assert counts == [1, 1, 1, 0] + [0] * 4, counts
        assert len(deferred) == len(apart)
        for i, (a, b) in enumerate(zip(deferred, apart, strict=True)):
            assert torch.equal(a, b), f"result {i} differs ({threads} threads)"


def test_the_int8_activation_is_recorded_in_the_swap_plan(tmp_path):
    from qsparseprop.finetune import make_model, prune_model

    torch.manual_seed(0)
    model = make_model("cnn", 16, 8)
    prune_model(model, 0.9, "layer")
    shape = (4, 1, 16, 16)
    swapped = q.swap_modules_with_sparse(
        copy.deepcopy(model), shape, scheme="s8", min_sparsity=0.0, min_speedup=0.0, repeats=1, verbose=False
    )
    rows = {r.name: r for r in swapped.qsparseprop_swap_report}
    assert {n for n, r in rows.items() if r.fused_int8_activation} == {"3.body.0", "4.body.0", "5.body.0"}
    plan = tmp_path / "plan.json"
    q.save_swap_plan(swapped, plan)
    again = q.swap_modules_with_sparse(copy.deepcopy(model), shape, plan=plan, verbose=False)
    assert {r.name for r in again.qsparseprop_swap_report if r.fused_int8_activation} == {
        "3.body.0",
        "4.body.0",
        "5.body.0",
    }
    x = torch.randn(shape)
    swapped.train(), again.train()
    torch.testing.assert_close(again(x), swapped(x), rtol=0, atol=0)


def test_a_hook_between_the_convolutions_sees_the_activation(monkeypatch):
    # a forward hook on the ReLU (or the reader, or a global one) sees the
    # activation: the BatchNorm then writes it, as unfused, with the same results
    torch.manual_seed(0)
    model = q.fuse(_swapped(_residual(6, 6, 1), "s8"))
    seen = []
    handle = model.body[2].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    (hooked, apart), counts = _steps_with_and_without_deferral(model, (3, 6, 8, 8), monkeypatch, steps=1)
    handle.remove()
    assert counts == [0, 0, 0, 0], "a hooked module's call was skipped"
    # a step and an eval forward of the model and of its twin (a copy, the hook too)
    assert len(seen) == 4 and seen[0].shape == (3, 6, 8, 8) and (seen[0] >= 0).all() and seen[0].any()
    for a, b in zip(hooked, apart, strict=True):
        assert torch.equal(a, b)
    for hook in (
        lambda: model.body[3].register_forward_pre_hook(lambda m, i: None),
        lambda: nn.modules.module.register_module_forward_hook(lambda m, i, o: None),
    ):
        handle = hook()
        try:
            (hooked, apart), counts = _steps_with_and_without_deferral(model, (3, 6, 8, 8), monkeypatch, steps=1)
        finally:
            handle.remove()
        assert counts == [0, 0, 0, 0]
        for a, b in zip(hooked, apart, strict=True):
            assert torch.equal(a, b)
    monkeypatch.undo()


def test_the_int8_activation_falls_back_where_the_batch_norm_cannot_defer(monkeypatch):
    # one value per channel (torch's error, as unfused), an unbatched input,
    # channels_last, a layer running in f32: the activation is written
    torch.manual_seed(0)
    model = q.fuse(_swapped(_residual(6, 6, 1), "s8"))
    model.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 6, 1, 1))
    calls = []
    real = q.SparseConv2d._forward_after_batch_norm
    monkeypatch.setattr(
        q.SparseConv2d, "_forward_after_batch_norm", lambda self, d, r: calls.append(1) or real(self, d, r)
    )
    twin = copy.deepcopy(model)
    x = torch.randn(6, 8, 8)
    unbatched = model(x)
    assert not calls and unbatched.shape == (6, 8, 8)
    torch.testing.assert_close(unbatched, twin(x.unsqueeze(0)).squeeze(0), rtol=0, atol=0)
    assert calls == [1]  # the batched twin's
    calls.clear()
    last = model(torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last))
    assert not calls and last.is_contiguous(memory_format=torch.channels_last)
    model.body[3].scheme = "f32"  # a reader that does not round its input to int8
    try:
        assert not model.body[3]._reads_deferred(model.body[0]._deferred(torch.randn(2, 6, 8, 8), torch.zeros(24)))
    finally:
        model.body[3].scheme = "s8"


def test_a_blocks_output_hands_its_maximum_to_the_next_blocks_convolutions(monkeypatch):
    # a residual end's BatchNorm finds max |z| while it writes z (the add
    # makes the ranges useless for it): the next block's s8 convolution
    # takes it instead of reading z once more, with the same results
    from qsparseprop import _ops

    torch.manual_seed(0)
    model = q.fuse(_swapped(nn.Sequential(_residual(6, 6, 1), _residual(6, 12, 2)), "s8"))
    twin = copy.deepcopy(model)
    x = torch.randn(3, 6, 8, 8)
    taken = _maxima_handed_over(monkeypatch, "_abs_max_of")
    handed = _one_step_gradients(model, x)
    # the first block's first convolution reads x (no writer's maximum), the
    # second block's pair the first block's output (the residual end's)
    assert taken == [False, True], taken
    real = _ops._batch_norm_forward_body
    monkeypatch.setattr(_ops, "_batch_norm_forward_body", lambda *a: real(*a)[:7] + (_ops._empty(),))
    taken.clear()
    found = _one_step_gradients(twin, x)
    assert taken == [False, False]
    for a, b in zip(handed, found, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bn_kwargs", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)], ids=str
)
def test_the_int8_activation_keeps_every_batch_norm_option(bn_kwargs, monkeypatch):
    # no affine parameters, no running statistics (batch statistics in eval
    # too), a cumulative average: each as the unfused pair, bit for bit
    torch.manual_seed(0)
    block = _residual(6, 6, 1)
    block.body[1] = nn.BatchNorm2d(6, **bn_kwargs)
    model = q.fuse(_swapped(block, "s8"))
    (deferred, apart), counts = _steps_with_and_without_deferral(model, (3, 6, 8, 8), monkeypatch)
    # without running statistics the eval forward normalises with the batch's: deferred too
    assert counts == [1, 1, 1, 1 if not bn_kwargs.get("track_running_stats", True) else 0] + [0] * 4, counts
    for i, (a, b) in enumerate(zip(deferred, apart, strict=True)):
        assert torch.equal(a, b), f"result {i} differs"


def test_the_step_table_counts_the_int8_activation_as_sparse_layers_and_batch_norm():
    # the pair's function is the convolution applying the BatchNorm as it
    # rounds its input (sparse layers); the BatchNorm's backward pass inside
    # it is recorded apart (batchnorm), and only while the profiler runs
    from torch.profiler import ProfilerActivity, profile

    from qsparseprop import finetune

    def part(name):
        return next(p for p, keys in finetune.STEP_PARTS if any(k in name.lower() for k in keys))

    assert part("_BatchNormReLUConvFunctionBackward") == "sparse layers"
    assert part("batch_norm_relu_backward") == "batchnorm"
    torch.manual_seed(0)
    model = q.fuse(_swapped(_residual(6, 6, 1), "s8"))
    x = torch.randn(4, 6, 8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    names = [e.name for e in prof.events()]
    assert "_BatchNormReLUConvFunctionBackward" in names and "batch_norm_relu_backward" in names, set(names)
    from qsparseprop import _ops

    assert isinstance(_ops._recorded("x"), contextlib.nullcontext)


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_block_whose_second_convolution_stayed_dense_fuses_its_shortcut_end(scheme):
    # the swap may keep a block's second convolution dense (measured slower):
    # then the strided shortcut's chain is the residual end, and the
    # shortcut is not also paired with the first convolution (the two
    # rewrites once took the same call and fuse raised)
    torch.manual_seed(0)
    block = _residual(6, 12, 2)
    _prune_convs(block)
    unfused = copy.deepcopy(block)
    for m in (unfused,):
        m.body[0] = CLASSES[scheme].from_dense(m.body[0])
        m.shortcut[0] = CLASSES[scheme].from_dense(m.shortcut[0])
    fused = q.fuse(copy.deepcopy(unfused))
    assert "forward" in fused.__dict__ and type(fused.body[3]) is nn.Conv2d
    x = torch.randn(3, 6, 8, 8)
    fused.train(), unfused.train()
    tol = {"f32": (1e-5, 1e-5), "s8": (5e-2, 5e-2)}[scheme]  # s8: the int8 copy against torch's fp32 BatchNorm
    torch.testing.assert_close(fused(x), unfused(x), rtol=tol[0], atol=tol[1])


def _a_relu_input_is_near_zero(dense, shape, steps, channels_last):
    """Whether the dense model (the swapped ones' weights) meets a ReLU input
    within 1e-5 of 0 on the inputs _train_and_compare draws (found: 5.6e-8
    after a BatchNorm, 8 % of a BatchNorm's bias gradient apart)."""
    gen = torch.Generator().manual_seed(1)  # as _train_and_compare
    xs = [torch.randn(shape, generator=gen) for _ in range(steps + 1)]
    if channels_last:  # the training steps' inputs
        xs[:steps] = [x.contiguous(memory_format=torch.channels_last) for x in xs[:steps]]
    return a_relu_input_near_a_kink(dense, xs)


# Random blocks (hypothesis; derandomized like test_properties.py, whose
# QSP_PROPERTY_EXAMPLES / QSP_PROPERTY_RANDOM it shares): channels, kernel,
# stride, image, batch, the ReLU, a second sparse convolution and its
# BatchNorm, channels_last, the kernels' family. f32 fused equals the
# unfused layers within rounding over two steps at the same weights and
# eval; s8 fused equals its prototype chain within the int8 copy's
# tolerance.
@property_settings(25)
@given(
    cin=st.integers(1, 9),
    cmid=st.integers(1, 9),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    hw=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    batch=st.integers(1, 3),
    relu=st.booleans(),
    second=st.booleans(),
    channels_last=st.booleans(),
    vectorizing=st.sampled_from([None, True, False]),
    scheme=st.sampled_from(["f32", "s8"]),
    seed=st.integers(0, 2**16),
)
def test_random_fused_blocks_train_as_their_unfused_layers(
    cin, cmid, kernel, stride, hw, batch, relu, second, channels_last, vectorizing, scheme, seed
):
    out_hw = [(n + 2 * (kernel // 2) - kernel) // stride + 1 for n in hw]
    assume(batch * out_hw[0] * out_hw[1] > 1)  # BatchNorm's training needs two values per channel
    # s8: a BatchNorm over a handful of values makes its input's gradient
    # large where the weight gradient cancels to about zero, and one flip of
    # the stochastic rounding of dY (a quantum of max |dY| / 127 per term,
    # the two sides' rounded values a last bit apart) is then a large part
    # of the model's gradients (0.41 of 0.86 over 3 values a channel)
    assume(scheme == "f32" or batch * out_hw[0] * out_hw[1] >= 16)
    torch.manual_seed(seed)

    def bn(c):
        b = nn.BatchNorm2d(c)
        with torch.no_grad():
            b.weight.uniform_(0.5, 1.5)
            b.bias.normal_()
        return b

    layers = [prune_random_(nn.Conv2d(cin, cmid, kernel, stride, kernel // 2, bias=False), 0.8, seed), bn(cmid)]
    layers += [nn.ReLU()] if relu else []
    if second:
        layers += [prune_random_(nn.Conv2d(cmid, 4, 3, 1, 1, bias=False), 0.7, seed + 1), bn(4)]
    dense = nn.Sequential(*layers, nn.Conv2d(4 if second else cmid, 3, 1))
    shape = (batch, cin, *hw)
    assume(not _a_relu_input_is_near_zero(dense, shape, 2, channels_last))

    def swapped(s):
        model = copy.deepcopy(dense)
        for i, m in enumerate(model[:-1]):
            if isinstance(m, nn.Conv2d):
                model[i] = CLASSES[s].from_dense(
                    m, seed=3, **({} if s == "prototype" else {"vectorizing_over_on": vectorizing})
                )
        return model

    if scheme == "f32":
        unfused = swapped("f32")
        fused = q.fuse(copy.deepcopy(unfused))
        # lr=0: a step would carry the gradients' rounding into the weights,
        # which a BatchNorm over a nearly constant channel (an empty first
        # convolution: BatchNorm's output is its bias) amplifies past any
        # fixed tolerance; the fixed blocks above train with steps
        _train_and_compare(unfused, fused, shape, "f32", steps=2, channels_last=channels_last, lr=0.0, model_scale=True)
    else:
        # the int8 copy's tolerance everywhere: the two compute BatchNorm in
        # fp32 each its own way, a last-bit difference can flip the second
        # convolution's int8 input, and the BatchNorm after it spreads that
        # step over its whole channel through the batch statistics (0.35 %
        # of the output's range, 456 of 504 elements, in one case found)
        prototype, fused = q.fuse(swapped("prototype")), q.fuse(swapped("s8"))
        _train_and_compare(
            prototype, fused, shape, "int8 copy", steps=2, channels_last=channels_last, lr=0.0, model_scale=True
        )


@property_settings(25)
@given(
    kind=st.sampled_from(["finetune's", "torchvision's"]),
    cin=st.integers(1, 8),
    cout=st.integers(1, 8),
    stride=st.integers(1, 2),
    hw=st.tuples(st.integers(2, 12), st.integers(2, 12)),
    batch=st.integers(1, 3),
    channels_last=st.booleans(),
    scheme=st.sampled_from(["f32", "s8"]),
    seed=st.integers(0, 2**16),
)
def test_random_residual_blocks_train_as_their_references(
    kind, cin, cout, stride, hw, batch, channels_last, scheme, seed
):
    # random BasicBlocks (the main job's and torchvision's forms; identity or
    # 1x1 shortcut as the shapes ask): f32 fused as the unfused swapped
    # block, s8 fused as its prototype chain, as the fixed test above; the
    # weights not stepped and the gradients judged against the model's
    # largest too (the random blocks' reasons, above)
    out_hw = [(n - 1) // stride + 1 for n in hw]
    assume(batch * out_hw[0] * out_hw[1] >= (2 if scheme == "f32" else 16))
    # 2+ input channels at half the weights: a convolution left without a
    # weight gives its BatchNorm a constant channel, whose variance is then
    # rounding noise (0 on one side, 1e-15 on the other) that normalizing
    # turns into differences of order 1 (the random blocks above compare
    # such blocks at a fixed tolerance of the model's largest gradient; here
    # the final ReLU can zero every gradient of the reference)
    assume(cin >= 2)

    def block():
        torch.manual_seed(seed)
        b = _residual(cin, cout, stride) if kind == "finetune's" else _InPlaceBasicBlock(cin, cout, stride)
        # a random affine: with bias 0 an element at its channel's mean
        # normalizes to within rounding of 0, and the two sides' ReLUs may
        # then decide it differently (found: one element's gradient, 8 % of
        # a one-channel BatchNorm's bias gradient)
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
        return b

    shape = (batch, cin, *hw)
    torch.manual_seed(0)  # as _swapped prunes
    assume(not _a_relu_input_is_near_zero(_prune_convs(block(), 0.5), shape, 2, channels_last))
    reference = _swapped(block(), "f32" if scheme == "f32" else "prototype", 0.5)
    if scheme == "s8":
        reference = q.fuse(reference)
    fused = q.fuse(_swapped(block(), scheme, 0.5))
    tolerance = "f32" if scheme == "f32" else "int8 copy"
    _train_and_compare(
        reference, fused, shape, tolerance, steps=2, channels_last=channels_last, lr=0.0, model_scale=True
    )


def _seen_by_hooks(model, names, x):
    """What forward hooks on the modules ``names`` see (input, output), and
    the model's output and input gradient."""
    seen = {}

    def hook(n):
        def see(m, args, out):
            seen.setdefault(n, (args[0].detach().clone(), out.detach().clone()))

        return see

    # "global:<name>": a global forward hook (on every module) records <name>'s calls
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names if not n.startswith("global:")]
    for n in (n for n in names if n.startswith("global:")):
        module, see = model.get_submodule(n.split(":")[1]), hook(n)
        handles.append(
            nn.modules.module.register_module_forward_hook(
                lambda m, a, o, module=module, see=see: see(m, a, o) if m is module else None
            )
        )
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    for h in handles:
        h.remove()
    return seen, y.detach(), x.grad


class _StemAndBlock(nn.Module):  # a dense convolution, its BatchNorm and ReLU, a block: traced
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()
        self.block = _InPlaceBasicBlock(6, 8, 2)

    def forward(self, x):
        return self.block(self.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize(
    "net, hooked",
    [
        ("sequential", ["0"]), ("sequential", ["1"]), ("sequential", ["2"]), ("sequential", ["4", "5"]),
        ("sequential", ["global:1"]), ("traced", ["global:block.bn2"]),
        ("traced", ["bn"]), ("traced", ["relu"]), ("traced", ["block.bn1"]), ("traced", ["block.conv2"]),
        ("traced", ["block.relu"]), ("traced", ["block.downsample.1"]),
        ("mlp", ["1"]), ("mlp", ["2"]),
    ],
)  # fmt: skip
def test_a_hook_on_a_fused_module_sees_what_the_unfused_module_sees(scheme, net, hooked):
    # the markers and a fusing layer, observed by a hook (theirs, or a global
    # one: "global:<name>"), compute as unfused: the layer its own output alone, the markers what
    # they stand for (they had passed the fused output through: a hook on a
    # BatchNorm saw its input normalised, one on a ReLU saw nothing)
    torch.manual_seed(0)
    if net == "sequential":
        dense = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1),
        )  # fmt: skip
        x = torch.randn(3, 3, 7, 7)
    elif net == "traced":
        dense, x = _StemAndBlock(), torch.randn(3, 3, 8, 8)
    else:
        dense, x = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)), torch.randn(5, 12)
    for m in dense.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not getattr(dense, "conv", None):
            prune_random_(m, 0.6)
    unfused, fused = _converted_and_fused(dense, scheme, keep=getattr(dense, "conv", None))
    assert any(isinstance(m, (q.FusedReLU, q.FusedBatchNorm2d)) for m in fused.modules())
    want_seen, want, want_grad = _seen_by_hooks(unfused, hooked, x)
    got_seen, got, got_grad = _seen_by_hooks(fused, hooked, x)
    for n in hooked:
        assert n in got_seen, f"the hook on {n} was not called"
        for what, a, b in zip(("input", "output"), got_seen[n], want_seen[n], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{n}'s {what}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # (s8: the BatchNorms no hook observes stay fused, their backward reading
    # BatchNorm's input as int8, as the fixed blocks above)
    _close(got_grad, want_grad, "f32" if scheme == "f32" else "int8 copy", "the input's gradient")
    # unobserved again: fused, the same values
    torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-5)


class _FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d in effect: the statistics and affine
    parameters as fixed buffers (detection fine-tunes put it in place of
    every BatchNorm2d)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        for k in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(k, getattr(bn, k).detach().clone())
        self.eps = bn.eps

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def _put_in_place(model: nn.Module, replace: str) -> nn.Module:
    """``model`` with a module of the user's put where each module of a kind
    stood: every BatchNorm2d (ours are subclasses) frozen, gone, or
    SyncBatchNorm (torch's own conversion); every ReLU (or its marker) a
    LeakyReLU; every sparse layer turned dense."""
    if replace == "sync_batch_norm":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and replace in ("frozen_batch_norm", "identity"):
                setattr(parent, name, _FrozenBatchNorm2d(child) if replace == "frozen_batch_norm" else nn.Identity())
            elif isinstance(child, (nn.ReLU, q.FusedReLU)) and replace == "leaky_relu":
                setattr(parent, name, nn.LeakyReLU(0.25))
            elif isinstance(child, (q.SparseConv2d, q.SparseLinear)) and replace == "dense_layer":
                setattr(parent, name, child.to_dense())
    return model


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize("replace", ["frozen_batch_norm", "identity", "sync_batch_norm", "leaky_relu", "dense_layer"])
def test_a_module_put_in_place_of_a_fused_one_takes_its_place(replace, scheme):
    # The fused layer applied its BatchNorm and ReLU itself, the markers
    # passing the input through: a module put in a marker's place applied
    # its own on top (a BatchNorm twice, a ReLU before a LeakyReLU), and a
    # marker whose layer was replaced passed its input through (the
    # BatchNorm lost), silently. Each fused module now checks that it
    # stands where the fusion found it.
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # torch's: BatchNormReLU2d
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        _InPlaceBasicBlock(8, 16, 2),  # traced: residual end, shared input, the int8 activation deferred
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5),  # the MLP pair
    )  # fmt: skip
    for i, m in enumerate(dense.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not dense[0]:
            prune_random_(m, 0.7, generator_seed=i)
    unfused, fused = _converted_and_fused(dense, scheme, keep=dense[0])
    kinds = {type(m).__name__ for m in fused.modules()}
    assert {"BatchNormReLU2d", "FusedBatchNorm2d", "FusedReLU"} <= kinds, kinds
    unfused, fused = _put_in_place(unfused, replace), _put_in_place(fused, replace)
    x = torch.randn(6, 2, 8, 8)
    for training in (True, False):
        results = []
        for model in (fused, unfused):
            model.train(training)
            xg = x.clone().requires_grad_()
            y = model(xg)
            y.square().sum().backward()
            results.append((y.detach(), xg.grad, dict(model.named_buffers())))
        (got, got_grad, got_buffers), (want, want_grad, want_buffers) = results
        what = "f32" if scheme == "f32" else "int8 copy"
        _close(got, want, what, f"{replace}, training={training}: output")
        _close(got_grad, want_grad, what, f"{replace}, training={training}: the input's gradient")
        for k, v in want_buffers.items():
            if v.is_floating_point():
                _close(got_buffers[k], v, "f32", f"{replace}: {k}")
