"""Every bad input raises a clear TypeError / ValueError naming the
argument, and leaves the caller's tensors untouched."""

import pytest
import torch

from conftest import prune_random_
from qsparseprop import QuantizedSparseLinear, SparseConv2d, SparseLinear, swap_modules_with_sparse


@pytest.fixture
def linear():
    return SparseLinear.from_dense(prune_random_(torch.nn.Linear(8, 4), 0.5))


@pytest.fixture
def conv():
    return SparseConv2d.from_dense(prune_random_(torch.nn.Conv2d(3, 4, 3), 0.5))


def _untouched(fn, *tensors):
    before = [t.clone() for t in tensors]
    fn()
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b) or (torch.isnan(t) == torch.isnan(b)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bfloat16])
def test_wrong_dtype(linear, dtype):
    x = torch.ones(2, 8, dtype=dtype)
    with pytest.raises(TypeError, match="input must be float32"):
        _untouched(lambda: linear(x), x)


def test_bf16_accepted_under_autocast(linear):
    x = torch.randn(2, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x)
    assert y.dtype == torch.float32 and y.shape == (2, 4)


def test_not_a_tensor_and_wrong_device(linear):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        linear([[1.0] * 8])
    with pytest.raises(ValueError, match="must be on the CPU"):
        linear(torch.ones(2, 8, device="meta"))


def test_wrong_shape_and_rank(linear, conv):
    x = torch.ones(2, 9)
    with pytest.raises(ValueError, match="in_features=8"):
        _untouched(lambda: linear(x), x)
    with pytest.raises(ValueError, match="at least 1-D"):
        linear(torch.tensor(1.0))
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        conv(torch.ones(1, 1, 3, 5, 5))
    with pytest.raises(ValueError, match="in_channels=3"):
        conv(torch.ones(1, 2, 5, 5))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(torch.ones(1, 3, 2, 5))


def test_layer_cast_to_double_is_refused(linear):
    linear.double()
    with pytest.raises(TypeError, match="values must be float32"):
        linear(torch.ones(2, 8))


def test_unsupported_conv_options():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        SparseConv2d.from_dense(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="divisible by groups"):
        SparseConv2d(3, 4, 3, [0] * 5, [], [], groups=2)
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'same' or 'valid'"):
        SparseConv2d(3, 4, 3, [0] * 5, [], [], padding="full")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        SparseConv2d(3, 4, 3, [0] * 5, [], [], padding="same", stride=2)
    with pytest.raises(TypeError, match="module must be a torch.nn.Conv2d"):
        SparseConv2d.from_dense(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="vectorizing_over_on"):
        SparseConv2d(3, 4, 3, [0] * 5, [], [], vectorizing_over_on="yes")


@pytest.mark.parametrize(
    "row_ptr,col_idx,values,match,exc",
    [
        ([0, 1, 2], [0, 1], [1.0, 2.0], "rows \\+ 1", ValueError),
        ([1, 1, 1, 2, 2], [0, 1], [1.0, 2.0], "row_ptr\\[0\\] must be 0", ValueError),
        ([0, 2, 1, 2, 2], [0, 1], [1.0, 2.0], "non-decreasing", ValueError),
        ([0, 1, 1, 1, 3], [0, 1], [1.0, 2.0], "number of column indices", ValueError),
        ([0, 1, 1, 1, 2], [0, 8], [1.0, 2.0], "out of range", ValueError),
        ([0, 2, 2, 2, 2], [3, 1], [1.0, 2.0], "strictly increasing", ValueError),
        ([0, 2, 2, 2, 2], [1, 1], [1.0, 2.0], "no duplicates", ValueError),
        ([0, 1, 1, 1, 2], [0, 1], [1.0], "values must have shape", ValueError),
        ([0.0, 1, 1, 1, 2], [0, 1], [1.0, 2.0], "row_ptr must hold integers", TypeError),
        ([0, 1, 1, 1, 2], [0, 1], [1, 2], "values must be a floating", TypeError),
        ([[0, 1, 1, 1, 2]], [0, 1], [1.0, 2.0], "row_ptr must be 1-D", ValueError),
    ],
)
def test_malformed_index_arrays(row_ptr, col_idx, values, match, exc):
    with pytest.raises(exc, match=match):
        SparseLinear(8, 4, torch.tensor(row_ptr), torch.tensor(col_idx), torch.tensor(values))


def test_bad_constructor_and_swap_arguments():
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        SparseLinear(0, 4, [0] * 5, [], [])
    with pytest.raises(TypeError, match="module must be a torch.nn.Linear"):
        SparseLinear.from_dense(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        SparseLinear.from_dense(torch.nn.Linear(3, 3), threshold=-1.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        QuantizedSparseLinear.from_dense(torch.nn.Linear(3, 3), seed=1.5)
    with pytest.raises(ValueError, match="input_shape"):
        swap_modules_with_sparse(torch.nn.Linear(3, 3), (0, 3))
    with pytest.raises(ValueError, match="min_sparsity"):
        swap_modules_with_sparse(torch.nn.Linear(3, 3), (1, 3), min_sparsity=2)
    with pytest.raises(TypeError, match="model must be"):
        swap_modules_with_sparse("model", (1, 3))


def test_forward_and_backward_leave_inputs_untouched(linear):
    x = torch.randn(3, 8, requires_grad=True)
    before = x.detach().clone()
    y = linear(x)
    g = torch.randn_like(y)
    g_before = g.clone()
    y.backward(g)
    assert torch.equal(x.detach(), before)
    assert torch.equal(g, g_before)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stride=0), "stride_h must be >= 1, got 0"),
        (dict(stride=(1, -1)), "stride_w must be >= 1, got -1"),
        (dict(padding=-1), "pad_top must be >= 0, got -1"),
        (dict(padding=(0, -2)), "pad_left must be >= 0, got -2"),
        (dict(dilation=0), "dilation_h must be >= 1"),
        (dict(groups=2), "in_channels \\(3\\) must be divisible by groups \\(2\\)"),
        (dict(groups=0), "groups must be >= 1, got 0"),
        (dict(groups=1.5), "groups must be an int"),
        (dict(kernel_size=0), "kernel_h must be >= 1"),
        (dict(stride="2"), "stride must be an int or a pair of ints"),
    ],
)
def test_bad_conv_geometry_is_a_clear_error(kwargs, match):
    # The same C++ check, and message, as for C++ callers.
    args = dict(in_channels=3, out_channels=4, kernel_size=3, row_ptr=[0] * 5, col_idx=[], values=[])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SparseConv2d(**args)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("stride", (0, 1), "stride_h must be >= 1, got 0"),
        ("stride", (1, 0), "stride_w must be >= 1, got 0"),
        ("dilation", (0, 1), "dilation_h must be >= 1"),
        ("padding", -1, "pad_top must be >= 0, got -1"),
    ],
)
def test_geometry_assigned_after_construction_is_checked_at_once(conv, field, value, match):
    # Assigning stride / padding / dilation goes through the same C++ checks
    # as construction (a stride of 0 used to end the process with SIGFPE);
    # the layer keeps its previous, valid geometry.
    before = conv(torch.ones(1, 3, 5, 5))
    with pytest.raises(ValueError, match=match):
        setattr(conv, field, value)
    assert torch.equal(conv(torch.ones(1, 3, 5, 5)), before)


@pytest.mark.parametrize("field", ["in_channels", "out_channels", "groups", "kernel_size"])
def test_geometry_the_pattern_depends_on_is_read_only(conv, field):
    with pytest.raises(AttributeError, match=f"{field} is fixed at construction"):
        setattr(conv, field, 2)


def test_private_geometry_tampering_is_still_refused_in_cpp(conv):
    conv._pads = (0, -1, 0, 0)  # skips the Python checks: the C++ core checks again
    with pytest.raises(ValueError, match="pad_left must be >= 0, got -1"):
        conv(torch.ones(1, 3, 5, 5))


def test_cpp_kernel_refuses_bad_geometry_directly():
    from qsparseprop import _C

    rp, ci = torch.zeros(5, dtype=torch.int64).numpy(), torch.zeros(0, dtype=torch.int32).numpy()
    good = dict(kernel_size=[3, 3], stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1)
    for change, match in [
        (dict(stride=[0, 0]), "stride_h must be >= 1"),
        (dict(padding=[0, 0, -1, 0]), "pad_bottom must be >= 0"),
        (dict(dilation=[1, 0]), "dilation_w must be >= 1"),
        (dict(groups=2), "in_channels \\(3\\) must be divisible by groups \\(2\\)"),
        (dict(groups=0), "groups must be >= 1"),
    ]:
        args = dict(good, **change)
        with pytest.raises(ValueError, match=match):
            _C.Conv2dKernel(3, 4, row_ptr=rp, col_idx=ci, scheme="f32", with_bias=False, **args)


def test_batch_norm_statistics_given_in_the_wrong_shape_are_refused_by_name():
    from qsparseprop import _C

    y = torch.randn(2, 3, 4, 4).numpy()
    ones, zeros = torch.ones(3).numpy(), torch.zeros(3).numpy()
    for known in (torch.zeros(3), torch.zeros(4, 3), torch.zeros(12, dtype=torch.float64)):
        with pytest.raises((ValueError, TypeError), match="known"):
            _C.batch_norm_relu_forward(y, ones, zeros, None, None, 1e-5, True, True, True, None, 1, known.numpy())
    with pytest.raises(ValueError, match="known statistics stand for the batch's"):
        _C.batch_norm_relu_forward(
            y, ones, zeros, zeros, ones, 1e-5, False, True, False, None, 1, torch.zeros(12).numpy()
        )


def test_the_batch_norm_writing_a_convolutions_int8_input_refuses_bad_arguments_by_name():
    from qsparseprop import _C

    rp, ci = torch.tensor([0, 1, 2], dtype=torch.int64).numpy(), torch.tensor([0, 4], dtype=torch.int32).numpy()
    y = torch.randn(2, 1, 5, 5).numpy()
    values = torch.ones(2).numpy()
    args = dict(
        kernel_size=[3, 3], stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1, row_ptr=rp, col_idx=ci
    )
    f32 = _C.Conv2dKernel(1, 2, scheme="f32", with_bias=False, **args)
    with pytest.raises(ValueError, match="must be s8"):
        f32.forward_after_batch_norm(y, None, None, 1e-5, None, values, None, 1, False)
    s8 = _C.Conv2dKernel(1, 2, scheme="s8", with_bias=False, **args)
    with pytest.raises((ValueError, TypeError), match="known"):
        s8.forward_after_batch_norm(y, None, None, 1e-5, torch.zeros(3).numpy(), values, None, 1, False)
    with pytest.raises((ValueError, TypeError), match="gamma"):
        s8.forward_after_batch_norm(y, torch.ones(2).numpy(), None, 1e-5, None, values, None, 1, False)
    with pytest.raises(ValueError, match="4-D"):
        s8.forward_after_batch_norm(y[0], None, None, 1e-5, None, values, None, 1, False)
    out, *bn = s8.forward_after_batch_norm(y, None, None, 1e-5, None, values, None, 1, False)
    assert out[0].shape == (2, 2, 5, 5) and bn[0].shape == ((2 * 25 + 7) // 8,)
