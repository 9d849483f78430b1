"""What used to be silently wrong, now correct or a clear error: in-place
pattern edits, geometry changes, double backward, index buffers on every
load path, dense checkpoints, first use from several threads, a swapped
network under torch.inference_mode."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import prune_random_
from qsparseprop import QuantizedSparseLinear, SparseConv2d, SparseLinear, swap_modules_with_sparse


@pytest.mark.parametrize("how", ["data", "numpy"])
def test_a_pattern_edited_in_place_takes_effect(how):
    row_ptr = torch.tensor([0, 2, 3, 5])
    col_idx = torch.tensor([1, 5, 0, 2, 6], dtype=torch.int32)
    layer = SparseLinear(8, 3, row_ptr, col_idx, torch.randn(5), torch.randn(3))
    x = torch.randn(4, 8)
    y_before = layer(x)
    if how == "data":
        layer.col_idx.data[1] = 7  # row 0: columns 1, 5 -> 1, 7
    else:
        layer.col_idx.numpy()[1] = 7
    fresh = SparseLinear(8, 3, layer.row_ptr.clone(), layer.col_idx.clone(), layer.values.detach(), layer.bias.detach())
    y_after = layer(x)
    assert torch.equal(y_after, fresh(x)), "the kernel of the old pattern kept running"
    assert not torch.equal(y_after, y_before)


def test_an_invalid_in_place_edit_is_refused():
    layer = SparseLinear.from_dense(prune_random_(torch.nn.Linear(16, 4), 0.5))
    layer(torch.randn(2, 16))
    layer.col_idx.data[0] = 99  # out of range
    with pytest.raises(ValueError, match="col_idx"):
        layer(torch.randn(2, 16))


def test_a_stride_or_padding_assigned_later_takes_effect():
    dense = prune_random_(torch.nn.Conv2d(3, 4, 3, padding=1), 0.6)
    layer = SparseConv2d.from_dense(dense)
    x = torch.randn(2, 3, 9, 9)
    layer(x)
    layer.stride, layer.padding = 2, 0
    torch.testing.assert_close(layer(x), F.conv2d(x, dense.weight, dense.bias, stride=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [SparseLinear, QuantizedSparseLinear])
def test_double_backward_raises_instead_of_dropping_terms(cls):
    layer = cls.from_dense(prune_random_(torch.nn.Linear(8, 4), 0.5))
    x = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()


def test_an_int64_index_beyond_int32_is_refused_on_load():
    layer = SparseLinear.from_dense(prune_random_(torch.nn.Linear(16, 4), 0.5))
    sd = layer.state_dict()
    before = layer.col_idx.clone()
    sd["col_idx"] = sd["col_idx"].long() + 2**32  # used to load as the same column
    with pytest.raises(RuntimeError, match="outside the torch.int32 range"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.col_idx, before)


def test_a_malformed_pattern_is_refused_on_load():
    layer = SparseLinear.from_dense(prune_random_(torch.nn.Linear(16, 4), 0.5))
    sd = layer.state_dict()
    sd["row_ptr"] = sd["row_ptr"].flip(0)  # decreasing
    with pytest.raises(RuntimeError, match="row_ptr"):
        layer.load_state_dict(sd)


def test_a_pattern_with_another_nnz_loads():
    a = SparseLinear.from_dense(prune_random_(torch.nn.Linear(16, 8), 0.5))
    b = SparseLinear.from_dense(prune_random_(torch.nn.Linear(16, 8), 0.9))
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(b(x), a(x))


def test_a_dense_checkpoint_loads_when_its_pattern_matches():
    dense = prune_random_(torch.nn.Linear(16, 8), 0.7)
    layer = SparseLinear.from_dense(dense)
    with torch.no_grad():
        dense.weight.mul_(2.0)  # fine-tuned elsewhere, same zeros
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), dense(x))
    other = prune_random_(torch.nn.Linear(16, 8), 0.3)  # another pattern
    with pytest.raises(RuntimeError, match="outside this layer's pattern"):
        layer.load_state_dict(other.state_dict())


def test_first_use_from_several_threads_is_safe():
    layer = SparseLinear.from_dense(prune_random_(torch.nn.Linear(64, 32), 0.8))
    x = torch.randn(8, 64)
    with torch.no_grad():
        want = F.linear(x, layer.weight, layer.bias)
    fresh = SparseLinear(64, 32, layer.row_ptr, layer.col_idx, layer.values.detach(), layer.bias.detach())
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def run(i):
        try:
            barrier.wait()
            with torch.no_grad():
                results[i] = fresh(x)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        torch.testing.assert_close(r, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_swapped_network_runs_under_inference_mode_as_under_no_grad(scheme):
    # a BatchNorm recalibration pass (training mode, no autograd) and
    # evaluation under torch.inference_mode: an int8 block's BatchNorm
    # handed its maximum to the next block's convolutions with the tensor's
    # version, which an inference tensor does not keep (RuntimeError)
    from qsparseprop.finetune import make_model

    torch.manual_seed(0)
    dense = make_model("cnn", 12, 4)
    for m in dense.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            prune_random_(m, 0.8)
    model = swap_modules_with_sparse(
        dense, (6, 1, 12, 12), verbose=False, scheme=scheme, min_sparsity=0.5, min_speedup=0.0, repeats=1,
        persistent=False,
    )  # fmt: skip
    x = torch.randn(6, 1, 12, 12)
    for training in (True, False):
        inference, reference = copy.deepcopy(model).train(training), copy.deepcopy(model).train(training)
        with torch.inference_mode():
            got = inference(x)
        with torch.no_grad():
            want = reference(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for (name, a), b in zip(inference.named_buffers(), reference.buffers(), strict=True):
            assert name.endswith("_handle") or torch.equal(a, b), name  # (_handle: the kernel cache's slot)


def test_an_ema_of_the_parameters_trains_along_and_one_over_every_buffer_says_what_broke():
    # torch's EMA (AveragedModel + get_ema_multi_avg_fn) averages integer
    # buffers too when use_buffers=True, as e * decay + m * (1 - decay)
    # copied back into the integer tensor: a column index 7 may come back
    # 6. The pattern is then invalid; the error says what wrote it.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for m in (dense[0], dense[2]):
        prune_random_(m, 0.8)
    model = swap_modules_with_sparse(
        dense, (4, 24), verbose=False, scheme="s8", min_sparsity=0.5, min_speedup=0.0, repeats=1, persistent=False
    )
    x = torch.randn(4, 24)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averages = {
        flag: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=flag) for flag in (False, True)
    }
    want = None  # the first update copies, the next ones average
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
        for average in averages.values():
            average.update_parameters(model)
        now = {k: v.detach().clone() for k, v in model.named_parameters()}
        want = now if want is None else {k: 0.9 * want[k] + 0.1 * v for k, v in now.items()}
    got = dict(averages[False].module.named_parameters())
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
    averages[False].eval()(x)  # the parameters' average runs
    corrupted = any(
        not torch.equal(a, b)
        for (n, a), b in zip(averages[True].module.named_buffers(), model.buffers(), strict=True)
        if n.endswith(("row_ptr", "col_idx"))
    )
    assert corrupted, "torch's EMA kept the integer buffers: this test no longer tests the message"
    with pytest.raises(ValueError, match="use_buffers=False"):
        averages[True].eval()(x)
