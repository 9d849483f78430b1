"""MaskedReLU / use_masked_relus: torch.relu's values and gradients bit for
bit (NaN, signed zeros, channels_last, odd sizes, bf16), 1/32 of the saved
bytes, and what it buys an int8 Conv-BN-ReLU-Conv chain."""

import copy

import pytest
import torch
from torch import nn

from qsparseprop import MaskedReLU, QuantizedSparseConv2d, to_dense, use_masked_relus
from qsparseprop.memory import saved_activation_bytes


def _special(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    pick = torch.randint(0, flat.numel(), (max(flat.numel() // 7, 1),), generator=g)
    vals = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45])
    flat[pick] = vals[torch.arange(pick.numel()) % vals.numel()]
    return x


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


_SHAPES = [(1,), (3,), (17,), (63,), (65,), (2, 3, 5, 7), (4, 8, 33, 9)]


@pytest.mark.parametrize(
    "shape,channels_last", [(s, False) for s in _SHAPES] + [(s, True) for s in _SHAPES if len(s) == 4]
)
def test_values_and_gradients_equal_torch_relu_bit_for_bit(shape, channels_last):
    x = _special(shape, len(shape))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x0 = x.clone()
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = MaskedReLU()(a), torch.relu(b)
    assert _same(ya.contiguous(), yb.contiguous())
    assert ya.stride() == yb.stride()  # keeps the memory format
    g = _special(shape, 99)  # NaN gradients where the input was <= 0 become 0, as in torch
    ya.backward(g)
    yb.backward(g)
    assert _same(a.grad.contiguous(), b.grad.contiguous())
    assert _same(x, x0)  # the input is not modified


def test_gradient_in_another_memory_format_and_threads():
    x = _special((2, 6, 5, 4), 3).to(memory_format=torch.channels_last).requires_grad_()
    g = _special((2, 6, 5, 4), 4)  # contiguous, unlike x
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            x.grad = None
            MaskedReLU()(x).backward(g)
            want = torch.where(x.detach() <= 0, torch.zeros(()), g)
            assert _same(x.grad.contiguous(), want.contiguous())
        finally:
            torch.set_num_threads(2)


def test_bf16_and_non_dense_inputs_take_the_torch_path():
    x = _special((4, 9), 5)[:, ::2]  # strided view: not dense in memory
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    MaskedReLU()(a[:, :]).sum().backward()
    torch.relu(b).sum().backward()
    assert torch.equal(a.grad, b.grad)
    h = torch.randn(5, 7).bfloat16().requires_grad_()
    y = MaskedReLU()(h)
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.relu(h))
    y.sum().backward()
    assert torch.equal(h.grad, (h.detach() > 0).bfloat16())


def test_gradcheck():
    x = torch.randn(3, 5, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # away from the kink
    assert torch.autograd.gradcheck(MaskedReLU(), (x,))


def test_saves_one_bit_per_element():
    x = torch.randn(64, 1024, requires_grad=True)
    dense = saved_activation_bytes(nn.ReLU(), x)
    masked = saved_activation_bytes(MaskedReLU(), x)
    assert dense == 64 * 1024 * 4 and masked == 64 * 1024 // 8


def _chain():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.9] = 0
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         QuantizedSparseConv2d.from_dense(conv), nn.BatchNorm2d(16), nn.ReLU())  # fmt: skip


def test_use_masked_relus_in_an_int8_chain_saves_memory_and_trains_the_same():
    plain = _chain().train()
    masked = use_masked_relus(copy.deepcopy(plain))
    assert [type(m).__name__ for m in masked] == ["Conv2d", "BatchNorm2d", "MaskedReLU",
                                                  "QuantizedSparseConv2d", "BatchNorm2d", "MaskedReLU"]  # fmt: skip
    x = torch.randn(8, 3, 12, 12)
    before = saved_activation_bytes(plain, x)
    after = saved_activation_bytes(masked, x)
    act = 8 * 16 * 12 * 12 * 4  # one fp32 activation of the chain
    assert before - after >= 1.8 * act  # both ReLU outputs (fp32) are no longer kept
    ya, yb = plain(x), masked(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, p), q in zip(plain.named_parameters(), masked.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


def test_to_dense_puts_nn_relu_back_and_bad_input():
    net = use_masked_relus(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)))
    back = to_dense(net)
    assert type(back[1]) is nn.ReLU and back[1].inplace
    assert isinstance(use_masked_relus(nn.ReLU()), MaskedReLU)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        use_masked_relus("not a model")
