"""SparseConv2d (f32) against dense torch.nn.Conv2d."""

import numpy as np
import pytest
import torch

from conftest import assert_close_rel, prune_random_
from qsparseprop import SparseConv2d


def _compare(dense: torch.nn.Conv2d, x: torch.Tensor, rel=1e-4, **kw):
    sparse = SparseConv2d.from_dense(dense, **kw)
    dense.zero_grad(set_to_none=True)
    xd = x.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    yd, ys = dense(xd), sparse(xs)
    assert ys.shape == yd.shape
    assert_close_rel(ys, yd, rel, "forward")
    g = torch.randn_like(yd)
    yd.backward(g)
    ys.backward(g)
    assert_close_rel(xs.grad, xd.grad, rel, "input grad")
    mask = (dense.weight != 0).reshape(dense.out_channels, -1)
    sparse_grad = torch.zeros_like(mask, dtype=torch.float32)
    rows = torch.repeat_interleave(torch.arange(dense.out_channels), sparse.row_ptr.diff())
    sparse_grad[rows, sparse.col_idx.long()] = sparse.values.grad
    assert_close_rel(sparse_grad[mask], dense.weight.grad.reshape(dense.out_channels, -1)[mask], rel, "weight grad")
    if dense.bias is not None:
        assert_close_rel(sparse.bias.grad, dense.bias.grad, rel, "bias grad")
    return ys


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize(
    "conv_args",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2),
        dict(in_channels=2, out_channels=3, kernel_size=5, stride=3, padding=2),
        dict(in_channels=3, out_channels=4, kernel_size=7, stride=2, padding=3),
        dict(in_channels=4, out_channels=4, kernel_size=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2),
        dict(in_channels=6, out_channels=6, kernel_size=3, padding="same", groups=6, bias=False),
        dict(in_channels=3, out_channels=2, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
        dict(in_channels=3, out_channels=2, kernel_size=(3, 1), stride=(1, 2), padding="valid"),
        dict(in_channels=4, out_channels=6, kernel_size=1, stride=2),  # subsampled, then stride 1
        dict(in_channels=4, out_channels=2, kernel_size=1, stride=(3, 2), groups=2, bias=False),
        dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, padding=1),  # padded: not subsampled
    ],
)
@pytest.mark.parametrize("vectorizing_over_on", [None, True, False])
def test_matches_dense(conv_args, sparsity, vectorizing_over_on):
    dense = prune_random_(torch.nn.Conv2d(**conv_args), sparsity)
    _compare(dense, torch.randn(2, conv_args["in_channels"], 11, 9), vectorizing_over_on=vectorizing_over_on)


def test_batch_one_unbatched_and_channels_last():
    dense = prune_random_(torch.nn.Conv2d(3, 8, 3, padding=1), 0.9)
    _compare(dense, torch.randn(1, 3, 7, 7))
    _compare(dense, torch.randn(3, 7, 7))
    x = torch.randn(2, 3, 6, 5).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    ys = _compare(dense, x)
    assert ys.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(2, 1, 5, 5), (2, 3, 1, 1), (1, 1, 1, 1), (2, 1, 1, 5), (2, 4, 5, 5)])
@pytest.mark.parametrize("layout", ["nchw", "to_channels_last", "contiguous_channels_last", "permuted"])
def test_output_layout_follows_torch_also_where_strides_are_ambiguous(shape, layout):
    """One channel or a 1x1 image make both layouts "contiguous": torch
    decides by the strides (a 1-channel input made channels_last with
    .to() comes back channels_last from nn.Conv2d); ours gave NCHW."""
    base = torch.randn(*shape)
    x = {
        "nchw": base.contiguous(),
        "to_channels_last": base.to(memory_format=torch.channels_last),
        "contiguous_channels_last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    }[layout]
    dense = prune_random_(torch.nn.Conv2d(shape[1], 4, 3, padding=2), 0.5)
    want = dense(x)
    got = SparseConv2d.from_dense(dense)(x)
    assert got.stride() == want.stride(), (x.stride(), got.stride(), want.stride())
    assert_close_rel(got, want, 1e-5)


def test_vectorizing_over_on_picks_the_kernels():
    """True: output-width-innermost, False: batch-innermost, None: the tuner's
    choice of either; every choice matches dense torch."""
    from qsparseprop import _C

    dense = prune_random_(torch.nn.Conv2d(3, 4, 3, padding=1), 0.8)
    for flag, strategy in ((None, None), (True, "width"), (False, "batch")):
        s = SparseConv2d.from_dense(dense, vectorizing_over_on=flag)
        assert s.vectorizing_over_on is flag
        _compare(dense, torch.randn(2, 3, 8, 8), vectorizing_over_on=flag)
        kernel = s._kernel()
        assert kernel.vectorization == {None: "any", True: "output_width", False: "batch"}[flag]
        impls = kernel.implementations([2, 3, 8, 8], torch.get_num_threads()).split("/")
        assert len(impls) == 3
        if _C.effective_cpu_isa() != "ref":
            assert all(i.startswith("jit:") for i in impls), impls
            if strategy:
                assert all(i.endswith(":" + strategy) for i in impls), impls


def test_conv2d_kernel_refuses_an_unknown_vectorization():
    from qsparseprop import _C

    with pytest.raises(ValueError, match="vectorization must be 'any', 'batch' or 'output_width'"):
        _C.Conv2dKernel(3, 4, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1, np.array([0, 0, 0, 0, 0]),
                        np.array([], dtype=np.int32), "f32", False, "rows")  # fmt: skip


def test_nan_propagates_like_dense():
    dense = prune_random_(torch.nn.Conv2d(2, 3, 3, padding=1), 0.9)
    sparse = SparseConv2d.from_dense(dense)
    x = torch.randn(2, 2, 6, 6)
    x[0, 1, 2, 2] = float("nan")
    yd, ys = dense(x), sparse(x)
    assert torch.equal(torch.isnan(yd), torch.isnan(ys))


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_f32():
    from qsparseprop import _ops

    dense = prune_random_(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), 0.5)
    sparse = SparseConv2d.from_dense(dense)
    inputs = (
        torch.randn(2, 2, 5, 5, requires_grad=True),
        sparse.values.detach().clone().requires_grad_(),
        sparse.bias.detach().clone().requires_grad_(),
    )
    seed = torch.zeros((), dtype=torch.int64)

    def op(x, v, b):
        return _ops.conv2d_forward(
            x, v, b, sparse.row_ptr, sparse.col_idx, sparse._handle, seed, sparse._spec(), "f32", "any"
        )[0]

    assert torch.autograd.gradcheck(op, inputs, eps=1e-2, atol=1e-2, rtol=1e-2)


def test_a_strided_1x1_convolution_runs_its_kernels_on_the_pixels_it_reads():
    dense = prune_random_(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), 0.8)
    sparse = SparseConv2d.from_dense(dense)
    assert sparse._subsampled() and sparse._spec()[4:6] == [1, 1]
    assert not SparseConv2d.from_dense(torch.nn.Conv2d(8, 16, 1, stride=2, padding=1))._subsampled()
    assert not SparseConv2d.from_dense(torch.nn.Conv2d(8, 16, 3, stride=2))._subsampled()
    # batch 1, unbatched, channels_last, odd sizes: as torch
    _compare(dense, torch.randn(1, 8, 7, 5))
    _compare(dense, torch.randn(8, 6, 9))
    ys = _compare(dense, torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last))
    assert ys.is_contiguous(memory_format=torch.channels_last)
    # the stride stays the layer's: assigning it reaches the kernels
    sparse.stride = 1
    assert not sparse._subsampled()
    torch.testing.assert_close(sparse(torch.ones(1, 8, 3, 3)).shape, torch.Size([1, 16, 3, 3]))


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 1, 1, 1), (3, 2, 4, 5)])
@pytest.mark.parametrize("stride", [(2, 2), (3, 2), (1, 3)])
def test_subsampled_pixels_and_their_gradient_are_torchs_slices(shape, stride):
    from qsparseprop import _ops

    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(*shape).contiguous(memory_format=layout).requires_grad_()
        got = _ops.subsample_pixels(x, *stride)
        want = x[:, :, :: stride[0], :: stride[1]]
        assert got.is_contiguous() and torch.equal(got, want)
        grad = torch.randn(want.shape)
        (gx,) = torch.autograd.grad(got, x, grad)
        (want_gx,) = torch.autograd.grad(want, x, grad)
        assert torch.equal(gx, want_gx)
    with torch.no_grad():
        assert torch.equal(_ops.subsample_pixels(x, *stride), x[:, :, :: stride[0], :: stride[1]])
