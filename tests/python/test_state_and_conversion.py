"""Conversion from pruned modules, and the module plumbing users rely on:
state_dict, deepcopy, pickle, .to(), to_dense, zeros staying zero."""

import copy
import io
import pickle

import pytest
import torch
from torch.nn.utils import prune

from conftest import prune_random_
from qsparseprop import (
    QuantizedSparseConv2d,
    QuantizedSparseLinear,
    SparseConv2d,
    SparseLinear,
    apply_swap_plan,
    swap_modules_with_sparse,
)

LAYERS = [
    (SparseLinear, lambda: torch.nn.Linear(12, 7), (5, 12)),
    (QuantizedSparseLinear, lambda: torch.nn.Linear(12, 7), (5, 12)),
    (SparseConv2d, lambda: torch.nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
    (QuantizedSparseConv2d, lambda: torch.nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
]


@pytest.mark.parametrize("cls,make,shape", LAYERS)
def test_state_dict_round_trip_and_copies(cls, make, shape):
    layer = cls.from_dense(prune_random_(make(), 0.8), seed=4).eval()
    x = torch.randn(shape)
    y = layer(x)
    sd = layer.state_dict()
    assert set(sd) == {"values", "bias", "row_ptr", "col_idx", "rounding_step"}
    fresh = cls.from_dense(prune_random_(make(), 0.8, generator_seed=0)).eval()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    assert torch.equal(copy.deepcopy(layer)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    assert torch.equal(layer.to(torch.device("cpu"))(x), y)


def test_load_state_dict_with_another_pattern_rebuilds_the_kernel():
    # Two patterns of the same nnz: loading one into the other must not run
    # the first pattern's cached kernel.
    a = SparseLinear(4, 3, [0, 1, 2, 3], [0, 1, 2], torch.ones(3))
    b = SparseLinear(4, 3, [0, 2, 2, 3], [1, 3, 0], torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(5, 4)
    a(x)  # builds a's kernel
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a(x), b.to_dense()(x))


def test_prune_mask_defines_pattern_even_where_weight_is_zero():
    lin = torch.nn.Linear(8, 4)
    prune.l1_unstructured(lin, "weight", amount=0.75)
    kept = lin.weight_mask.bool()
    r, c = kept.nonzero()[0]
    with torch.no_grad():
        lin.weight_orig[r, c] = 0.0  # kept by the mask, but exactly zero
    s = SparseLinear.from_dense(lin)
    assert s.nnz == int(kept.sum())
    torch.testing.assert_close(s.to_dense().weight, lin.weight)


def test_parametrization_mask_is_understood():
    from torch.ao.pruning import WeightNormSparsifier

    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    sparsifier = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    lin = model[0]
    mask = lin.parametrizations.weight[0].mask
    s = SparseLinear.from_dense(lin)
    assert s.nnz == int(mask.sum())
    x = torch.randn(4, 16)
    torch.testing.assert_close(s(x), lin(x))


def test_pruned_weights_stay_zero_through_training():
    dense = prune_random_(torch.nn.Linear(20, 10), 0.9)
    zeros = dense.weight == 0
    for cls in (SparseLinear, QuantizedSparseLinear):
        s = cls.from_dense(dense)
        opt = torch.optim.AdamW(s.parameters(), lr=0.1, weight_decay=0.1)
        for _ in range(5):
            opt.zero_grad()
            s(torch.randn(8, 20)).pow(2).mean().backward()
            opt.step()
        w = s.to_dense().weight
        assert torch.all(w[zeros] == 0)
        assert not torch.equal(w[~zeros], dense.weight[~zeros]), "training changed nothing"


def test_to_dense_round_trip_conv():
    conv = prune_random_(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), 0.7)
    back = SparseConv2d.from_dense(conv).to_dense()
    assert torch.equal(back.weight, conv.weight)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(back(x), conv(x))


def test_threshold_conversion():
    lin = torch.nn.Linear(30, 20)
    s = SparseLinear.from_dense(lin, threshold=0.1)
    assert s.nnz == int((lin.weight.abs() > 0.1).sum())


def test_torch_compile_traces_the_custom_ops():
    s = SparseLinear.from_dense(prune_random_(torch.nn.Linear(12, 6), 0.8))
    x = torch.randn(4, 12, requires_grad=True)
    compiled = torch.compile(s, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, s(x))
    assert x.grad is not None


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_model_made_on_the_meta_device_or_emptied_loads_its_checkpoint(scheme):
    # torch's ways to build a model without initializing it: on the meta
    # device, then load_state_dict(assign=True) (the values used to fail
    # with "incompatible tensor type"), or to_empty() then a load (the
    # kernel cache's slot was then uninitialized memory, naming another
    # layer's kernel or none; the step count too)
    from qsparseprop import swap_modules_with_sparse

    torch.manual_seed(0)
    dense = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
    )  # fmt: skip
    for m in dense.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            prune_random_(m, 0.8)
    model = swap_modules_with_sparse(
        dense, (2, 3, 5, 5), verbose=False, scheme=scheme, min_sparsity=0.5, min_speedup=0.0, repeats=1, warmup=0,
        persistent=False,
    )  # fmt: skip
    x = torch.randn(2, 3, 5, 5)
    model(x).sum().backward()  # a step taken: the step counts are 1
    sd = model.state_dict()
    on_meta = copy.deepcopy(model).to("meta")
    assert on_meta[0].values.is_meta
    on_meta.load_state_dict(sd, assign=True)
    emptied = copy.deepcopy(model).to_empty(device="cpu")
    emptied.load_state_dict(sd)
    model.eval()
    want = model(x)
    for built in (on_meta, emptied):
        layers = [m for m in built.modules() if hasattr(m, "values")]
        assert len(layers) == 3
        for layer, original in zip(layers, (m for m in model.modules() if hasattr(m, "values")), strict=True):
            assert layer._handle.device.type == "cpu" and int(layer._handle) != int(original._handle)
            assert int(layer.rounding_step) == int(original.rounding_step) == 1
            assert not layer.values.is_meta and layer.values.requires_grad
        torch.testing.assert_close(built.eval()(x), want, rtol=0, atol=0)


def _pruned_cnn() -> torch.nn.Module:
    torch.manual_seed(5)
    dense = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10),
    )  # fmt: skip
    for m in dense.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            prune_random_(m, 0.8)
    return dense


def _swapped_cnn(scheme: str) -> torch.nn.Module:
    return swap_modules_with_sparse(
        _pruned_cnn(), (4, 3, 6, 6), verbose=False, scheme=scheme, min_sparsity=0.5, min_speedup=0.0, repeats=1,
        persistent=False,
    )  # fmt: skip


def _train(model, opt, steps: int, first: int) -> None:
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_run_resumed_from_its_checkpoint_goes_on_bit_for_bit(scheme):
    # The int8 layers round each step's gradients with a stream of their own
    # step count: a resumed run that started the count afresh repeated the
    # first steps' streams (and differed from the run it resumed).
    model = _swapped_cnn(scheme)
    assert sum(isinstance(m, SparseConv2d | SparseLinear) for m in model.modules()) == 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 3, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, 3)

    # the same swap made again, or the model rebuilt from its plan and checkpoint
    for how in ("swap", "plan"):
        buf.seek(0)
        checkpoint = torch.load(buf)  # (each its own: the optimizer trains the momenta it loaded in place)
        if how == "swap":
            resumed = _swapped_cnn(scheme)
            resumed.load_state_dict(checkpoint["model"])
        else:
            resumed = apply_swap_plan(_pruned_cnn(), model.qsparseprop_swap_report, state_dict=checkpoint["model"])
        opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
        opt2.load_state_dict(checkpoint["opt"])
        _train(resumed, opt2, 3, 3)
        for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(got, want), (how, name)
        layers = [m for m in resumed.modules() if isinstance(m, SparseConv2d | SparseLinear)]
        assert [int(m.rounding_step) for m in layers] == [6, 6, 6], how


def test_the_step_count_loads_checked_and_stays_the_layers_own():
    layer = QuantizedSparseLinear.from_dense(prune_random_(torch.nn.Linear(12, 7), 0.8), seed=4)
    layer(torch.randn(5, 12)).sum().backward()
    sd = layer.state_dict()
    assert int(sd["rounding_step"]) == 1
    fresh = QuantizedSparseLinear.from_dense(prune_random_(torch.nn.Linear(12, 7), 0.8), seed=4)
    old = {k: v for k, v in sd.items() if k != "rounding_step"}  # a checkpoint saved before the count was
    fresh.load_state_dict(old)  # strict: not a missing key
    assert int(fresh.rounding_step) == 0
    fresh.rounding_step.fill_(2)
    for bad, what in (
        (torch.tensor(1.0), "must be one integer"),
        (torch.tensor([1, 2]), "must be one integer"),
        (torch.tensor(True), "must be one integer"),
        (torch.tensor(-1), "must be in \\[0, 2\\*\\*63\\)"),
        ("3", "must be one integer"),
    ):
        with pytest.raises(RuntimeError, match=f"rounding_step {what}"):
            fresh.load_state_dict(old | {"rounding_step": bad})
        assert int(fresh.rounding_step) == 2  # nothing taken from a refused checkpoint
    fresh.load_state_dict(old | {"rounding_step": torch.tensor(7, dtype=torch.int32)})
    assert int(fresh.rounding_step) == 7 and fresh.rounding_step.dtype == torch.int64
    # assign=True copies the count: training counts up in the layer, not in the checkpoint
    fresh.load_state_dict(sd, assign=True)
    fresh(torch.randn(5, 12)).sum().backward()
    assert int(fresh.rounding_step) == 2 and int(sd["rounding_step"]) == 1


def test_a_layer_pickled_with_the_old_step_buffer_loads_with_its_count():
    layer = QuantizedSparseConv2d.from_dense(prune_random_(torch.nn.Conv2d(3, 4, 3), 0.8), seed=4)
    layer(torch.randn(2, 3, 6, 6)).sum().backward()
    # as a layer pickled before the count was named rounding_step and saved
    layer._buffers["_step"] = layer._buffers.pop("rounding_step")
    layer._non_persistent_buffers_set.add("_step")
    copy_ = pickle.loads(pickle.dumps(layer))
    assert int(copy_.rounding_step) == 1 and "rounding_step" in copy_.state_dict()
    copy_(torch.randn(2, 3, 6, 6)).sum().backward()
    assert int(copy_.rounding_step) == 2
