"""A residual block's first convolution and its strided 1x1 shortcut, both
sparse and reading the block's input, run as one autograd function once
the block is fused (modules._convs_sharing_input): its backward adds the
shortcut's input gradient into the first convolution's in place instead
of autograd spreading it into a zero tensor and adding. Every value and
gradient is the same, bit for bit, as the two layers called one by one (f32
and s8, 1-3 threads, channels_last, over steps whose rounding seeds
advance); whatever the function does not take (a 3-D or empty input, hooks,
torch.compile) calls the layers; swap plans record the pairing."""

import copy

import pytest
import torch
from test_fuse import RESIDUAL_BLOCKS, _InPlaceBasicBlock, _prune_convs, _swapped
from torch import nn

import qsparseprop as q
import qsparseprop.modules as modules
from qsparseprop import _ops

SHORTCUT_BLOCKS = ["finetune's, 1x1 shortcut", "torchvision's, downsample"]


def _calls_of_the_pair(monkeypatch):
    """How many times the shared-input function ran forward, and its
    backward's in-place add."""
    counts = {"forward": 0, "add": 0}
    real_apply, real_add = _ops._SharedInputConvsFunction.apply, _ops._C.subsample_pixels_backward_add

    def apply(*args):
        counts["forward"] += 1
        return real_apply(*args)

    def add(*args):
        counts["add"] += 1
        return real_add(*args)

    monkeypatch.setattr(_ops._SharedInputConvsFunction, "apply", apply)
    monkeypatch.setattr(_ops._C, "subsample_pixels_backward_add", add)
    return counts


def _step(model, x):
    """Output, the input's gradient and every parameter's, one step."""
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and torch.equal(a, b), f"{what}: tensor {i} differs"


def _paired_and_plain(block, scheme):
    torch.manual_seed(0)
    paired = q.fuse(_swapped(RESIDUAL_BLOCKS[block](), scheme))
    return paired, copy.deepcopy(paired)


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize("block", SHORTCUT_BLOCKS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_pair_computes_what_the_two_layers_compute(scheme, block, threads, monkeypatch):
    paired, plain = _paired_and_plain(block, scheme)
    counts = _calls_of_the_pair(monkeypatch)
    gen = torch.Generator().manual_seed(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(3):  # the layers' rounding seeds advance each step
            x = torch.randn(3, 6, 9, 9, generator=gen)
            if step == 2:
                x = x.contiguous(memory_format=torch.channels_last)
            got = _step(paired, x)
            with monkeypatch.context() as m:
                m.setattr(modules, "_shares_input_with", lambda conv, shortcut: False)
                want = _step(plain, x)
            _equal(got, want, f"step {step}")
            assert got[0].is_contiguous(memory_format=torch.channels_last) == (step == 2)
    finally:
        torch.set_num_threads(previous)
    assert counts == {"forward": 3, "add": 3}  # the pair ran, and only in the paired model
    for (name, a), b in zip(paired.named_buffers(), plain.buffers(), strict=True):
        if not name.endswith("_handle"):  # the kernel cache's slot: one per layer
            assert torch.equal(a, b), name  # running statistics, steps, seeds
    paired.eval(), plain.eval()
    x = torch.randn(2, 6, 9, 9, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(paired(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_the_pairs_backward_takes_either_gradient_alone(scheme):
    # only the first convolution's output, or only the shortcut's, reaches
    # the loss: the input's gradient is that layer's alone (spread, for the
    # shortcut); an input that needs no gradient gets none
    torch.manual_seed(0)
    block = _swapped(_InPlaceBasicBlock(6, 8, 2), scheme)
    conv, shortcut = block.conv1, block.downsample[0]
    x = torch.randn(2, 6, 9, 9)
    for which in (0, 1):
        twin_conv, twin_shortcut = copy.deepcopy(conv), copy.deepcopy(shortcut)
        xa = x.clone().requires_grad_()
        outs = modules._convs_sharing_input(conv, shortcut, xa)
        outs[which].sum().backward()
        xb = x.clone().requires_grad_()
        (twin_conv if which == 0 else twin_shortcut)(xb).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        layer, twin = (conv, twin_conv) if which == 0 else (shortcut, twin_shortcut)
        assert torch.equal(layer.values.grad, twin.values.grad)
        other = shortcut if which == 0 else conv
        assert other.values.grad is None
        conv.zero_grad(set_to_none=True), shortcut.zero_grad(set_to_none=True)
    y, y_shortcut = modules._convs_sharing_input(conv, shortcut, x)  # x without grad
    (y.sum() + y_shortcut.sum()).backward()
    assert conv.values.grad is not None and shortcut.values.grad is not None


def test_what_the_pair_does_not_take_calls_the_layers(monkeypatch):
    torch.manual_seed(0)
    block = q.fuse(_swapped(_InPlaceBasicBlock(6, 8, 2)))
    plain = copy.deepcopy(block)
    counts = _calls_of_the_pair(monkeypatch)

    def unpaired(x):
        with monkeypatch.context() as m:
            m.setattr(modules, "_shares_input_with", lambda conv, shortcut: False)
            return plain(x)

    with torch.no_grad():
        for x in (torch.randn(6, 9, 9), torch.randn(0, 6, 9, 9)):  # unbatched; empty
            torch.testing.assert_close(block(x), unpaired(x), rtol=0, atol=0)
    assert counts["forward"] == 0
    seen = []
    handle = block.downsample[0].register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        # observed, the shortcut computes its own output alone and its
        # BatchNorm's marker the BatchNorm (torch's: within rounding)
        x = torch.randn(2, 6, 9, 9)
        torch.testing.assert_close(block(x), unpaired(x), rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
    assert seen == ["SparseConv2d"] and counts["forward"] == 0  # the hook saw the shortcut's call
    block(torch.randn(2, 6, 9, 9))
    assert counts["forward"] == 1
    # a wrong input is refused by name, as the layers refuse it
    with pytest.raises(ValueError, match="in_channels=6"):
        block(torch.randn(2, 5, 9, 9))
    # to_dense gives the block's own forward back
    dense = q.to_dense(block)
    assert "forward" not in dense.__dict__ and type(dense.downsample[0]) is nn.Conv2d


def test_an_input_read_by_two_full_convolutions_is_left_alone():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
            self.b = nn.Conv2d(4, 4, 3, 1, 1, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    model = q.fuse(_swapped(TwoReaders()))
    assert "_qsparseprop_fused_forward" not in model.__dict__


def test_the_swap_plan_records_the_pair(tmp_path):
    torch.manual_seed(0)
    block = _prune_convs(_InPlaceBasicBlock(6, 8, 2))
    fresh, dense_state = copy.deepcopy(block), copy.deepcopy(block.state_dict())
    swapped = q.swap_modules_with_sparse(block, (2, 6, 8, 8), verbose=False, min_sparsity=0.5, min_speedup=0.0)
    rows = {r.name: r for r in swapped.qsparseprop_swap_report}
    assert rows["conv1"].fused_shared_input and rows["downsample.0"].fused_shared_input
    assert not rows["conv2"].fused_shared_input
    q.save_swap_plan(swapped, tmp_path / "plan.json")
    again = q.apply_swap_plan(fresh, tmp_path / "plan.json")
    assert {r.name for r in again.qsparseprop_swap_report if r.fused_shared_input} == {"conv1", "downsample.0"}
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(again(x), swapped(x))

    # a plan whose pair the model does not have is refused by name
    class NoShortcut(_InPlaceBasicBlock):
        def forward(self, x):
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))

    other = NoShortcut(6, 8, 2)
    other.load_state_dict(dense_state)
    with pytest.raises(ValueError, match="conv1 ran as one function"):
        q.apply_swap_plan(other, tmp_path / "plan.json")


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_block_with_the_pair_exports(scheme):
    # torch.export traces the layers' own calls (custom ops), not the pair
    torch.manual_seed(0)
    block = q.fuse(_swapped(_InPlaceBasicBlock(6, 8, 2), scheme)).eval()
    x = torch.randn(2, 6, 9, 9)
    exported = torch.export.export(block, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_bias_and_a_frozen_layer_get_the_gradients_the_two_calls_give(scheme, monkeypatch):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(5, 7, 3, 2, 1, bias=True)
            self.shortcut = nn.Conv2d(5, 7, 1, 2, bias=True)

        def forward(self, x):
            return self.conv(x) * self.shortcut(x)

    torch.manual_seed(0)
    paired = q.fuse(_swapped(Block(), scheme))
    paired.conv.values.requires_grad_(False)  # frozen: no gradient computed for it
    plain = copy.deepcopy(paired)
    counts = _calls_of_the_pair(monkeypatch)
    x = torch.randn(2, 5, 9, 11)
    got = _step(paired, x)
    with monkeypatch.context() as m:
        m.setattr(modules, "_shares_input_with", lambda conv, shortcut: False)
        want = _step(plain, x)
    _equal(got, want, "bias and frozen values")
    assert counts == {"forward": 1, "add": 1}
    assert paired.conv.values.grad is None and paired.conv.bias.grad is not None
    assert paired.shortcut.bias.grad is not None
