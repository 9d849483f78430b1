"""The fused MLP block (Linear -> ReLU -> Linear, qsparseprop.fuse): the two
swapped layers run in one call per direction, the hidden activation and its
gradient in the kernels' tile layout between them (kept, where both layers'
implementations read it natively), and the block computes what the same
layers unfused compute — output and every gradient bit for bit, f32 and s8,
over steps, odd batch sizes, 3-D inputs, 1-3 threads, train and eval — while
it stays the same model to everything around it (state_dict, deepcopy,
pickle, to_dense, swap plans, hooks, torch.compile)."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import qsparseprop as q
from conftest import property_settings, prune_random_
from qsparseprop import _ops

CLASSES = {"f32": q.SparseLinear, "s8": q.QuantizedSparseLinear}


@pytest.fixture(autouse=True)
def _a_fixed_team(monkeypatch):
    # one team size for both models of a comparison: under another load the
    # ops drop to one thread (_ops._contended), and a layer tuned for that
    # team may run another kernel of the same sums (f32: other rounding)
    monkeypatch.setattr(_ops, "_ADAPT", False)


def _mlp(width=24, hidden=40, bias=True, seed=0, act=None):
    torch.manual_seed(seed)
    return nn.Sequential(
        prune_random_(nn.Linear(width, hidden, bias=bias), 0.8),
        act or nn.ReLU(),
        prune_random_(nn.Linear(hidden, width), 0.8),
    )


def _swapped(model, scheme="f32"):
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, CLASSES[scheme].from_dense(child, seed=5))
        else:
            _swapped(child, scheme)
    return model


def _pair(dense, scheme):
    unfused = _swapped(copy.deepcopy(dense), scheme)
    q.use_masked_relus(unfused)
    return unfused, q.fuse(copy.deepcopy(unfused))


def _tiles_read_as_s8():
    """Whether the JIT's s8 SpMMs read plain s8 tiles here (entry pairs:
    where vpdpbusd is not native, AVX2 without AVX-VNNI and AVX-512 without
    VNNI), so an s8 chain keeps its hidden layout."""
    isa = q._C.effective_cpu_isa()
    return isa == "avx512_core" or (isa == "avx2" and not q._C.avx_vnni_usable())


def _chain_calls(monkeypatch):
    calls = []
    real = _ops.linear_act_linear
    monkeypatch.setattr(_ops, "linear_act_linear", lambda *a: calls.append(a[2].shape) or real(*a))
    return calls


def _step(model, x, g):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(g)
    return [out, x.grad] + [p.grad for p in model.parameters()]


def _sgd_both(*models, lr=0.05):
    """One plain SGD step of each model on its own gradients."""
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                p -= lr * p.grad


def _dropping_runs_the_modules_and_eval_the_block(unfused, fused, calls, x, g):
    """With a dropout that drops (training, p > 0) the fused model calls the
    modules, drawing what the unfused one draws; in eval the block runs."""
    torch.manual_seed(7)
    want = _step(unfused, x, g)
    torch.manual_seed(7)
    _same(_step(fused, x, g), want, "a dropout that drops")
    assert not calls
    fused.eval(), unfused.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), unfused(x)) and len(calls) == 1  # eval: the dropout is the identity


def _same(got, want, what, tolerance=None):
    """Bit for bit, or within (rtol, atol) where torch's own vector code
    rounds an element differently at another position (its GELU's tails)."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), f"{what}: gradient {i} missing"
        if a is None:
            continue
        if tolerance is None:
            assert torch.equal(a, b), f"{what}: tensor {i} differs (max {(a - b).abs().max().item()})"
        else:
            torch.testing.assert_close(a, b, rtol=tolerance[0], atol=tolerance[1], msg=f"{what}: tensor {i}")


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_a_fused_mlp_trains_as_the_unfused_layers(scheme, threads, act, monkeypatch):
    # ReLU: bit for bit (the same kernels, the same mask pass). GELU is
    # torch's on the same values, but its vector code rounds an element
    # differently in a tail than in a full vector (the kept tensor is padded
    # to 64 rows), and between calls at times: f32 within rounding; s8
    # within a few rounding flips of the int8 hidden activation (an element
    # one quantum off)
    tolerance = None if act == "relu" else ((1e-4, 1e-5) if scheme == "f32" else (2e-2, 2e-3))
    unfused, fused = _pair(_mlp(act=ACTIVATIONS[act]()), scheme)
    assert "forward" in fused.__dict__  # the Sequential's forward was rewritten
    calls = _chain_calls(monkeypatch)
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(2)
        for step, shape in enumerate([(1, 24), (65, 24), (130, 24), (3, 7, 24)]):
            x = torch.randn(shape, generator=gen)
            g = torch.randn(*shape[:-1], 24, generator=gen)
            _same(_step(fused, x, g), _step(unfused, x, g), f"step {step}, input {shape}", tolerance)
            _sgd_both(unfused, fused)
        unfused.eval(), fused.eval()
        with torch.no_grad():
            x = torch.randn(17, 24, generator=gen)
            _same([fused(x)], [unfused(x)], "eval", tolerance)
    finally:
        torch.set_num_threads(2)
    assert len(calls) == 5  # every call ran as one block, eval included


def test_the_hidden_layout_is_kept_where_both_layers_read_it(monkeypatch):
    # f32 on the JIT tiers keeps the tiles; s8 where the JIT's kernels read
    # s8 tiles (entry pairs, _tiles_read_as_s8); oneDNN's int8, the JIT's
    # quads and the reference tier keep the plain layout
    unfused, fused = _pair(_mlp(), "f32")
    fused(torch.randn(70, 24))
    chain = _ops._chain_of(fused[0]._kernel(), fused[2]._kernel())
    impls = chain.implementations(70, _ops._threads())
    native = q._C.effective_cpu_isa() not in ("ref", "sse41")
    assert impls.endswith("(hidden kept)" if native else "(hidden plain)"), impls
    s8 = _pair(_mlp(), "s8")[1]
    s8(torch.randn(70, 24))
    impls = _ops._chain_of(s8[0]._kernel(), s8[2]._kernel()).implementations(70, _ops._threads())
    entry_pairs = _tiles_read_as_s8()
    assert impls.endswith("(hidden kept)" if entry_pairs else "(hidden plain)"), impls


def test_a_skipped_relu_would_be_seen(monkeypatch):
    # the test above compares with MaskedReLU between the layers: a chain
    # without its ReLU differs
    unfused, fused = _pair(_mlp(), "f32")
    x = torch.randn(9, 24)
    without = copy.deepcopy(unfused)
    without[1] = nn.Identity()
    assert not torch.equal(without(x), fused(x))
    assert torch.equal(unfused(x), fused(x))


def test_a_second_relu_and_no_bias_are_kept():
    torch.manual_seed(0)
    dense = nn.Sequential(
        prune_random_(nn.Linear(8, 16, bias=False), 0.7), nn.ReLU(), prune_random_(nn.Linear(16, 8), 0.7), nn.ReLU()
    )
    unfused, fused = _pair(dense, "f32")
    x, g = torch.randn(5, 8), torch.randn(5, 8)
    _same(_step(fused, x, g), _step(unfused, x, g), "relu after the second layer")
    assert (fused(x) >= 0).all()


def test_a_traced_transformer_mlp_fuses_and_a_longer_chain_fuses_its_first_pair(monkeypatch):
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 12)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    dense = Mlp()
    for m in (dense.fc1, dense.fc2):
        prune_random_(m, 0.8)
    unfused, fused = _pair(dense, "f32")
    assert fused.__dict__.get("_qsparseprop_fused_forward") and type(fused.act) is q.FusedReLU
    calls = _chain_calls(monkeypatch)
    x, g = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    _same(_step(fused, x, g), _step(unfused, x, g), "traced MLP")
    assert len(calls) == 1
    # Linear-ReLU-Linear-ReLU-Linear: the first pair runs as one block, the
    # third layer after it
    torch.manual_seed(1)
    three = nn.Sequential(*[m for i in range(3) for m in (prune_random_(nn.Linear(10, 10), 0.7), nn.ReLU())][:-1])
    unfused, fused = _pair(three, "s8")
    calls.clear()
    x, g = torch.randn(4, 10), torch.randn(4, 10)
    _same(_step(fused, x, g), _step(unfused, x, g), "three layers")
    assert len(calls) == 1


def test_hooks_and_replaced_modules_are_called_as_the_sequential_would(monkeypatch):
    unfused, fused = _pair(_mlp(), "f32")
    calls = _chain_calls(monkeypatch)
    x = torch.randn(6, 24)
    want = unfused(x)
    seen = []
    for module in (fused[0], fused[1], fused[2]):
        handle = module.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
        assert torch.equal(fused(x), want)
        handle.remove()
    assert seen == ["SparseLinear", "FusedReLU", "SparseLinear"] and not calls
    assert torch.equal(fused(x), want) and len(calls) == 1
    fused[2] = nn.Linear(40, 24)  # another module in the second layer's place runs there
    torch.testing.assert_close(fused(x), fused[2](torch.relu(unfused[0](x))))


def test_the_fused_mlp_stays_the_same_model(tmp_path):
    unfused, fused = _pair(_mlp(), "s8")
    assert list(fused.state_dict()) == list(unfused.state_dict())
    x = torch.randn(4, 24)
    with torch.no_grad():
        fused.eval(), unfused.eval()
        want = unfused(x)
        assert torch.equal(fused(x), want)
        twin = copy.deepcopy(fused)
        assert twin.forward.__self__ is twin and torch.equal(twin(x), want)
        torch.save(fused, tmp_path / "mlp.pt")
        back = torch.load(tmp_path / "mlp.pt", weights_only=False)
        assert torch.equal(back(x), want) and torch.equal(q.fuse(back)(x), want)
        dense = q.to_dense(fused)
        assert "forward" not in dense.__dict__ and type(dense[1]) is nn.ReLU
        torch.testing.assert_close(dense(x), want, rtol=0.05, atol=0.05)  # fp32 now, not int8


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_the_swap_fuses_the_mlp_and_its_plan_records_it(tmp_path, act):
    dense = _mlp(64, 128, act=ACTIVATIONS[act]())
    pristine = copy.deepcopy(dense)  # the swap and the plan change models in place
    fresh = copy.deepcopy(dense)
    swapped = q.swap_modules_with_sparse(dense, (32, 64), verbose=False, min_sparsity=0.5, min_speedup=0.0)
    rows = {r.name: r for r in swapped.qsparseprop_swap_report}
    assert rows["0"].fused_kept_layout and not rows["2"].fused_kept_layout
    q.save_swap_plan(swapped, tmp_path / "plan.json")
    again = q.apply_swap_plan(fresh, tmp_path / "plan.json")
    assert "forward" in again.__dict__
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), swapped.eval()(x))
    # a model whose second layer is not there any more is refused, naming the layer
    broken = copy.deepcopy(pristine)
    broken[2] = nn.Identity()
    plan = [r for r in swapped.qsparseprop_swap_report if r.name != "2"]
    with pytest.raises(ValueError, match="0 ran as one block"):
        q.apply_swap_plan(broken, plan)


def test_compile_runs_the_layers_as_custom_ops():
    unfused, fused = _pair(_mlp(), "f32")
    compiled = torch.compile(fused, backend="eager", fullgraph=False)
    x, g = torch.randn(5, 24), torch.randn(5, 24)
    _same(_step(compiled, x, g), _step(unfused, x, g), "compiled")


def test_bad_input_is_refused_with_the_layers_message():
    _, fused = _pair(_mlp(), "f32")
    with pytest.raises(TypeError, match="float32"):
        fused(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="in_features=24"):
        fused(torch.randn(3, 23))
    assert fused(torch.randn(0, 24)).shape == (0, 24)


def test_the_main_jobs_step_table_counts_the_block_as_sparse_layers():
    from qsparseprop import finetune

    _, fused = _pair(_mlp(), "f32")
    opt = torch.optim.SGD(fused.parameters(), lr=0.01)
    x, y = torch.randn(16, 24), torch.randint(0, 24, (16,))
    parts = finetune.step_breakdown(fused, opt, x, y, torch.autocast("cpu", enabled=False))
    assert parts["sparse layers"] > 0.0 and parts["dense conv/linear"] == 0.0, parts


def test_a_gelu_mlp_keeps_its_hidden_layout_and_the_relu_only_mlp_fuses_its_relu(monkeypatch):
    # a GELU is not fused into the first layer (no fused_relu, the module
    # stays) and runs between the two layers' calls on the kept tensor
    unfused, fused = _pair(_mlp(act=nn.GELU()), "f32")
    assert type(fused[1]) is nn.GELU and not fused[0].fused_relu and "forward" in fused.__dict__
    calls = _chain_calls(monkeypatch)
    x, g = torch.randn(70, 24), torch.randn(70, 24)
    _same(_step(fused, x, g), _step(unfused, x, g), "gelu", (1e-4, 1e-5))
    assert len(calls) == 1
    impls = _ops._chain_of(fused[0]._kernel(), fused[2]._kernel()).implementations(70, _ops._threads())
    native = q._C.effective_cpu_isa() not in ("ref", "sse41")
    assert impls.endswith("(hidden kept)" if native else "(hidden plain)"), impls
    # another activation module (a subclass, a Tanh) is called as it is
    for other in (nn.Tanh(), type("MyGELU", (nn.GELU,), {})()):
        unfused, fused = _pair(_mlp(act=other), "f32")
        calls.clear()
        # (within rounding: torch's own Tanh / GELU rounds an element
        # differently between calls at times, its vector code against its
        # tails; the two models' Linear layers give the same bits)
        _same(_step(fused, x, g), _step(unfused, x, g), type(other).__name__, (1e-3, 1e-4))
        assert not calls


@pytest.mark.parametrize("schemes", [("f32", "s8"), ("s8", "f32")])
def test_layers_of_two_schemes_fuse_as_scheme_auto_may_leave_them(schemes):
    # scheme="auto" picks per layer: a block of an f32 and an int8 layer
    # trains as the unfused pair, bit for bit; its hidden activation stays
    # in tiles only where both read them (the f32 JIT, the s8 JIT's entry
    # pairs: AVX2 without AVX-VNNI), plain otherwise (one side converts)
    dense = _mlp()
    unfused = copy.deepcopy(dense)
    for i, scheme in zip((0, 2), schemes, strict=True):
        unfused[i] = CLASSES[scheme].from_dense(unfused[i], seed=5)
    q.use_masked_relus(unfused)
    fused = q.fuse(copy.deepcopy(unfused))
    x, g = torch.randn(33, 24), torch.randn(33, 24)
    for step in range(2):
        _same(_step(fused, x, g), _step(unfused, x, g), f"{schemes} step {step}")
    chain = _ops._chain_of(fused[0]._kernel(), fused[2]._kernel())
    entry_pairs = _tiles_read_as_s8()
    impls = chain.implementations(33, _ops._threads())
    assert impls.endswith("(hidden kept)" if entry_pairs else "(hidden plain)"), impls


# Random MLP blocks (hypothesis; derandomized as test_properties.py, whose
# QSP_PROPERTY_EXAMPLES / QSP_PROPERTY_RANDOM it shares): widths 1-70,
# hidden sizes 1-90, 1-40 tokens after 0-2 leading dimensions of 1-5, biases,
# each layer's sparsity (empty and full rows included), the activation, the
# scheme. The fused block equals the unfused layers as the fixed test above
# states it: ReLU bit for bit, GELU within its tolerances.
@property_settings(25)
@given(
    width=st.integers(1, 70),
    hidden=st.integers(1, 90),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    tokens=st.integers(1, 40),
    bias=st.booleans(),
    sparsities=st.tuples(*[st.sampled_from([0.0, 0.5, 0.8, 0.95, 1.0])] * 2),
    act=st.sampled_from(list(ACTIVATIONS)),
    scheme=st.sampled_from(["f32", "s8"]),
    seed=st.integers(0, 2**16),
)
def test_random_fused_mlps_equal_their_unfused_layers(width, hidden, lead, tokens, bias, sparsities, act, scheme, seed):
    torch.manual_seed(seed)
    dense = nn.Sequential(
        prune_random_(nn.Linear(width, hidden, bias=bias), sparsities[0], seed),
        ACTIVATIONS[act](),
        prune_random_(nn.Linear(hidden, width, bias=bias), sparsities[1], seed + 1),
    )
    unfused, fused = _pair(dense, scheme)
    tolerance = None if act == "relu" else ((1e-4, 1e-5) if scheme == "f32" else (2e-2, 2e-3))
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, tokens, width)
    x, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    _same(_step(fused, x, g), _step(unfused, x, g), f"input {shape}", tolerance)
    unfused.eval(), fused.eval()
    with torch.no_grad():
        _same([fused(x)], [unfused(x)], "eval", tolerance)


# torch's nn.TransformerEncoderLayer: fx cannot trace its forward, so its MLP
# (linear1 -> activation -> dropout -> linear2) is matched by class and its
# _ff_block rebound to the instance.
ENCODER_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh_module": lambda: nn.GELU(approximate="tanh"),
    "relu_module": nn.ReLU,
}


def _encoder(act="relu", norm_first=False, batch_first=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    activation = ENCODER_ACTIVATIONS[act]
    layer = nn.TransformerEncoderLayer(
        16, 2, 48, dropout=dropout, activation=activation if isinstance(activation, str) else activation(),
        batch_first=batch_first, norm_first=norm_first,
    )  # fmt: skip
    for m in (layer.linear1, layer.linear2):
        prune_random_(m, 0.8)
    return layer


def _encoder_pair(dense, scheme):
    unfused = copy.deepcopy(dense)
    unfused.linear1 = CLASSES[scheme].from_dense(unfused.linear1, seed=5)
    unfused.linear2 = CLASSES[scheme].from_dense(unfused.linear2, seed=6)
    unfused.activation_relu_or_gelu = 0  # off torch's inference fast path (dense weights), as fuse does
    return unfused, q.fuse(copy.deepcopy(unfused))


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize("act", ENCODER_ACTIVATIONS)
@pytest.mark.parametrize("threads", [1, 3])
def test_a_transformer_encoder_layers_mlp_runs_as_one_block(scheme, act, threads, monkeypatch):
    # the unfused layer runs torch's _ff_block on the same two sparse layers:
    # ReLU bit for bit, GELU within its rounding as above
    tolerance = None if act.startswith("relu") else ((1e-4, 1e-5) if scheme == "f32" else (2e-2, 2e-3))
    for norm_first, batch_first in ((False, True), (True, False)):
        unfused, fused = _encoder_pair(_encoder(act, norm_first, batch_first), scheme)
        assert "_ff_block" in fused.__dict__ and "_ff_block" not in unfused.__dict__
        calls = _chain_calls(monkeypatch)
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(3)
            for step, shape in enumerate([(1, 1, 16), (3, 7, 16), (2, 33, 16)]):
                x, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
                _same(_step(fused, x, g), _step(unfused, x, g), f"{act} step {step} {shape}", tolerance)
                _sgd_both(unfused, fused)
            unfused.eval(), fused.eval()
            with torch.no_grad():  # (torch's fused inference path stays off: the layers are sparse)
                x = torch.randn(4, 5, 16, generator=gen)
                _same([fused(x)], [unfused(x)], "eval", tolerance)
        finally:
            torch.set_num_threads(2)
        assert len(calls) == 4  # every call ran as one block, eval included


def test_an_encoder_layers_mlp_without_its_relu_would_be_seen():
    unfused, fused = _encoder_pair(_encoder(), "s8")
    x = torch.randn(2, 9, 16)
    skipped = copy.deepcopy(unfused)
    skipped.activation = nn.Identity()
    assert torch.equal(fused(x), unfused(x)) and not torch.equal(skipped(x), unfused(x))


def test_an_encoder_layer_runs_torchs_mlp_where_the_block_cannot(monkeypatch):
    calls = _chain_calls(monkeypatch)
    x, g = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    # a dropout that drops (training), a hook on a layer, an activation the
    # block has no kernel for: torch's _ff_block, the same values
    unfused, fused = _encoder_pair(_encoder(dropout=0.3), "f32")
    _dropping_runs_the_modules_and_eval_the_block(unfused, fused, calls, x, g)
    unfused, fused = _encoder_pair(_encoder(), "f32")
    calls.clear()
    seen = []
    handle = fused.linear2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    _same(_step(fused, x, g), _step(unfused, x, g), "hooked")
    handle.remove()
    assert seen == [(2, 6, 16)] and not calls
    fused.activation = unfused.activation = torch.tanh
    _same(_step(fused, x, g), _step(unfused, x, g), "tanh")
    assert not calls

    # not fused at all: a subclass with its own MLP, or one sparse layer only
    class MyLayer(nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return super()._ff_block(x) * 2

    mine = MyLayer(16, 2, 48, dropout=0.0, batch_first=True)
    mine.linear1 = q.SparseLinear.from_dense(mine.linear1)
    mine.linear2 = q.SparseLinear.from_dense(mine.linear2)
    assert "_ff_block" not in q.fuse(mine).__dict__
    half = copy.deepcopy(_encoder())
    half.linear1 = q.SparseLinear.from_dense(half.linear1)
    assert "_ff_block" not in q.fuse(half).__dict__


def test_an_encoder_layer_fused_stays_the_same_model(tmp_path):
    unfused, fused = _encoder_pair(_encoder(), "s8")
    assert list(fused.state_dict()) == list(unfused.state_dict())
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        fused.eval(), unfused.eval()
        want = unfused(x)
        twin = copy.deepcopy(fused)
        assert twin._ff_block.__self__ is twin and torch.equal(twin(x), want)
        torch.save(fused, tmp_path / "enc.pt")
        back = torch.load(tmp_path / "enc.pt", weights_only=False)  # torch's _ff_block: the same values
        assert torch.equal(back(x), want) and torch.equal(q.fuse(back)(x), want)
        assert "_ff_block" in back.__dict__  # fused again
        dense = q.to_dense(fused)
        assert "_ff_block" not in dense.__dict__ and type(dense.linear1) is nn.Linear
        torch.testing.assert_close(dense(x), want, rtol=0.05, atol=0.05)  # fp32 now, not int8


def test_the_swap_fuses_an_encoder_layers_mlp_and_its_plan_records_it(tmp_path):
    # the main job's --model transformer: every layer's MLP, int8 keeping no
    # fp32 hidden activation for the backward (the saved bytes below: it kept
    # more than dense before, its int8 copy beside torch's ReLU output)
    from qsparseprop.memory import saved_activation_bytes

    torch.manual_seed(0)
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 128, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)  # fmt: skip
    for layer in dense.layers:
        for m in (layer.linear1, layer.linear2):
            prune_random_(m, 0.9)
    fresh = copy.deepcopy(dense)
    swapped = q.swap_modules_with_sparse(copy.deepcopy(dense), (8, 16, 32), verbose=False, min_speedup=0.0)
    rows = {r.name: r for r in swapped.qsparseprop_swap_report}
    assert all(rows[f"layers.{i}.linear1"].fused_kept_layout for i in range(2))
    assert all("_ff_block" in layer.__dict__ for layer in swapped.layers)
    x = torch.randn(8, 16, 32)
    hidden = 8 * 16 * 128 * 4  # one layer's fp32 hidden activation
    unfused = q.swap_modules_with_sparse(
        copy.deepcopy(dense), (8, 16, 32), verbose=False, min_speedup=0.0, fuse_relu=False
    )
    saved = {m: saved_activation_bytes(m, x) for m in (dense, unfused, swapped)}
    assert saved[unfused] > saved[dense] - hidden / 2  # (the int8 inputs' savings, about what the copy costs)
    assert saved[swapped] < saved[dense] - 1.5 * hidden  # each layer's hidden as int8 + a bit, not fp32
    q.save_swap_plan(swapped, tmp_path / "plan.json")
    again = q.apply_swap_plan(fresh, tmp_path / "plan.json")
    assert all("_ff_block" in layer.__dict__ for layer in again.layers)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), swapped.eval()(x))


@pytest.mark.parametrize("scheme", ["f32", "s8"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_a_transformer_decoder_layers_mlp_runs_as_one_block(scheme, act, monkeypatch):
    torch.manual_seed(0)
    dense = nn.TransformerDecoderLayer(16, 2, 48, dropout=0.0, activation=act, batch_first=True)
    for m in (dense.linear1, dense.linear2):
        prune_random_(m, 0.8)
    unfused = copy.deepcopy(dense)
    unfused.linear1 = CLASSES[scheme].from_dense(unfused.linear1, seed=5)
    unfused.linear2 = CLASSES[scheme].from_dense(unfused.linear2, seed=6)
    fused = q.fuse(copy.deepcopy(unfused))
    assert "_ff_block" in fused.__dict__
    calls = _chain_calls(monkeypatch)
    tolerance = None if act == "relu" else ((1e-4, 1e-5) if scheme == "f32" else (2e-2, 2e-3))
    gen = torch.Generator().manual_seed(4)
    tgt, memory, g = (torch.randn(3, n, 16, generator=gen) for n in (5, 7, 5))

    def step(model):
        t, mem = tgt.clone().requires_grad_(), memory.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        out = model(t, mem)
        out.backward(g)
        return [out, t.grad, mem.grad] + [p.grad for p in model.parameters()]

    _same(step(fused), step(unfused), f"decoder {act}", tolerance)
    assert len(calls) == 1
    assert "_ff_block" not in q.to_dense(fused).__dict__


def test_an_encoder_layer_fused_compiles_and_exports():
    # torch.compile and torch.export trace torch's _ff_block (the layers as
    # custom ops): the same values (export's attention decomposed: within
    # fp32 rounding)
    unfused, fused = _encoder_pair(_encoder(), "s8")
    x, g = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    compiled = torch.compile(fused, backend="eager")
    _same(_step(compiled, x, g), _step(unfused, x, g), "compiled")
    with torch.no_grad():
        program = torch.export.export(fused.eval(), (x,))
        torch.testing.assert_close(program.module()(x), unfused.eval()(x), rtol=1e-5, atol=1e-6)


class _TimmMlp(nn.Module):
    """timm's Mlp as ViTs use it: fc1 -> act -> drop1 -> norm -> fc2 -> drop2."""

    def __init__(self, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(24, 40), nn.GELU(), nn.Dropout(drop)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(40, 24), nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_an_mlp_with_dropout_and_identity_between_its_layers_fuses(scheme, monkeypatch):
    # a dropout (p 0, or in eval) and an identity between the activation and
    # the second layer no longer break the chain
    torch.manual_seed(0)
    dense = _TimmMlp()
    for m in (dense.fc1, dense.fc2):
        prune_random_(m, 0.8)
    unfused, fused = _pair(dense, scheme)
    assert "forward" in fused.__dict__
    calls = _chain_calls(monkeypatch)
    x, g = torch.randn(3, 9, 24), torch.randn(3, 9, 24)
    tolerance = (1e-4, 1e-5) if scheme == "f32" else (2e-2, 2e-3)  # GELU, as above
    _same(_step(fused, x, g), _step(unfused, x, g), "timm Mlp", tolerance)
    assert len(calls) == 1


def test_a_dropout_that_drops_runs_the_modules(monkeypatch):
    # training with p > 0: the modules are called in order (the same random
    # draws as the unfused model's); in eval the block runs
    torch.manual_seed(0)
    dense = nn.Sequential(
        prune_random_(nn.Linear(24, 40), 0.8), nn.ReLU(), nn.Dropout(0.3), prune_random_(nn.Linear(40, 24), 0.8)
    )
    unfused, fused = _pair(dense, "f32")
    assert "forward" in fused.__dict__
    calls = _chain_calls(monkeypatch)
    x = torch.randn(5, 24)
    _dropping_runs_the_modules_and_eval_the_block(unfused, fused, calls, x, torch.randn(5, 24))
    fused.train()
    fused[2].p = 0.0  # the identity now: the block runs in training too
    fused(x)
    assert len(calls) == 2


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU])
@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_batch_size_only_evaluated_makes_and_tunes_only_the_forwards(capfd, monkeypatch, scheme, act):
    """A fused block evaluated at a batch size training never ran (under
    torch.no_grad, or with nothing requiring a gradient) picks its hidden
    layout by the two forwards alone: no backward primitive is made or
    tuned for it until a backward of that shape runs; the outputs are the
    trained call's (bit for bit with the ReLU; torch's GELU rounds its
    tails apart at times)."""
    _, fused = _pair(_mlp(act=act()), scheme)
    calls = _chain_calls(monkeypatch)
    x = torch.randn(45, 24)
    q.set_verbose(2)
    try:
        with torch.no_grad():
            y_no_grad = fused(x)
        fused.requires_grad_(False)  # grad mode on, nothing requiring a gradient
        y_eval = fused(x)
        evaluated = capfd.readouterr().out
        fused.requires_grad_(True)
        y = fused(x.clone().requires_grad_())
        y.sum().backward()
        trained = capfd.readouterr().out
    finally:
        q.set_verbose(0)
    assert len(calls) == 3, "each call ran as one block"
    assert "qsp_verbose,tune,sparse_linear_forward," in evaluated, evaluated
    assert "sparse_linear_backward" not in evaluated, evaluated
    for direction in ("backward_data", "backward_weights"):
        assert f"qsp_verbose,tune,sparse_linear_{direction}," in trained, trained
    tolerance = None if act is nn.ReLU else (1e-4, 1e-5)
    _same([y_no_grad, y_eval], [y.detach(), y.detach()], "evaluated against trained", tolerance)
    assert not y_eval.requires_grad and fused[0].values.grad is not None
    assert torch.isfinite(fused[0].values.grad).all() and torch.isfinite(fused[2].values.grad).all()
