"""ProjectedMultiheadAttention: nn.MultiheadAttention's attention with its
projections as layers it calls, so the swap can make them sparse. Checked
against torch's attention over its arguments (masks of both kinds and
dtypes, batch_first, unbatched inputs, cross attention with other key and
value widths, bias_k / bias_v, add_zero_attn, need_weights per head or
averaged, is_causal), gradients included; then what the swap does with a
pruned transformer (sparse projections, training keeps the pattern, eval
off torch's fast path, plans, checkpoints, to_dense, hooks, copies)."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import qsparseprop
from qsparseprop import ProjectedMultiheadAttention, QuantizedSparseLinear, SparseLinear

E, HEADS = 16, 4


def _attention(**kw) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, **kw)
    if mha.in_proj_bias is not None:  # torch starts them at zero: a bias mixed up would go unseen
        nn.init.normal_(mha.in_proj_bias)
        nn.init.normal_(mha.out_proj.bias)
    return mha


def _inputs(batch_first: bool, unbatched: bool, self_attention: bool, kdim: int, vdim: int):
    n, tgt, src = 3, 5, 7
    g = torch.Generator().manual_seed(1)

    def make(length, width):
        if unbatched:
            return torch.randn(length, width, generator=g)
        shape = (n, length, width) if batch_first else (length, n, width)
        return torch.randn(shape, generator=g)

    query = make(tgt, E)
    if self_attention:
        return query, query, query, tgt
    return query, make(src, kdim), make(src, vdim), src


def _masks(kind: str, unbatched: bool, tgt: int, src: int):
    g = torch.Generator().manual_seed(2)
    padding = torch.rand((src,) if unbatched else (3, src), generator=g) > 0.7
    if kind == "none":
        return None, None
    if kind == "bool":  # a 2-D boolean attn_mask and a boolean padding mask
        return torch.rand(tgt, src, generator=g) > 0.7, padding
    if kind == "float":  # a 3-D additive attn_mask per batch entry and head (not contiguous), a float padding mask
        heads = HEADS if unbatched else 3 * HEADS
        attn_mask = torch.randn(src, tgt, heads, generator=g).permute(2, 1, 0)
        return attn_mask, torch.zeros(padding.shape).masked_fill_(padding, -1e4)
    raise AssertionError(kind)


def _projection_grads(mha: nn.MultiheadAttention) -> list[torch.Tensor]:
    if mha._qkv_same_embed_dim:
        grads = list(mha.in_proj_weight.grad.chunk(3))
    else:
        grads = [mha.q_proj_weight.grad, mha.k_proj_weight.grad, mha.v_proj_weight.grad]
    return grads + [mha.out_proj.weight.grad]


CASES = list(
    itertools.product(
        [False, True],  # batch_first
        [False, True],  # unbatched
        ["self", "cross", "widths"],  # self-attention; another key/value; kdim/vdim other than embed_dim
        ["none", "bool", "float"],  # masks
        [True, False],  # need_weights
    )
)


@pytest.mark.parametrize("batch_first,unbatched,attention,masks,need_weights", CASES)
def test_it_computes_torchs_attention_and_gradients(batch_first, unbatched, attention, masks, need_weights):
    widths = {} if attention != "widths" else {"kdim": 12, "vdim": 10}
    mha = _attention(batch_first=batch_first, **widths)
    ours = ProjectedMultiheadAttention.from_attention(mha)
    query, key, value, src = _inputs(batch_first, unbatched, attention == "self", mha.kdim, mha.vdim)
    attn_mask, padding = _masks(masks, unbatched, query.shape[-2 if unbatched or batch_first else 0], src)
    kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
    query_ref = query.clone().requires_grad_()
    query_ours = query.clone().requires_grad_()
    same = attention == "self"
    want, want_w = mha(query_ref, query_ref if same else key, query_ref if same else value, **kwargs)
    got, got_w = ours(query_ours, query_ours if same else key, query_ours if same else value, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6, equal_nan=True)
    else:
        assert got_w is None and want_w is None
    if masks != "none":  # a fully masked row is NaN in both; its gradient too
        return
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(query_ours.grad, query_ref.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(
        [ours.q_proj.weight.grad, ours.k_proj.weight.grad, ours.v_proj.weight.grad, ours.out_proj.weight.grad],
        _projection_grads(mha),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([ours.q_proj.bias.grad, ours.k_proj.bias.grad, ours.v_proj.bias.grad]),
                               mha.in_proj_bias.grad, rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("option", ["bias_kv", "zero_attn", "both", "no_bias", "per_head", "causal", "dropout"])
def test_its_options_are_torchs(option):
    kw = {
        "bias_kv": {"add_bias_kv": True},
        "zero_attn": {"add_zero_attn": True},
        "both": {"add_bias_kv": True, "add_zero_attn": True},
        "no_bias": {"bias": False},
        "dropout": {"dropout": 0.5},
    }.get(option, {})
    mha = _attention(batch_first=True, **kw)
    ours = ProjectedMultiheadAttention.from_attention(mha)
    x = torch.randn(3, 6, E)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, -2:] = True
    args = dict(key_padding_mask=padding)
    if option == "per_head":
        args["average_attn_weights"] = False
    if option == "causal":
        args = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(6), is_causal=True, need_weights=False)
    if option == "dropout":  # the same draws: the same random numbers in the same order
        torch.manual_seed(7)
        want = mha(x, x, x, **args)
        torch.manual_seed(7)
        got = ours(x, x, x, **args)
    else:
        want, got = mha(x, x, x, **args), ours(x, x, x, **args)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    back = ours.to_attention()
    assert back.bias_k is None if option not in ("bias_kv", "both") else torch.equal(back.bias_k, mha.bias_k)
    mha.eval(), back.eval()
    torch.testing.assert_close(back(x, x, x, **args)[0], mha(x, x, x, **args)[0])


def test_sparse_projections_compute_the_pruned_attention():
    """With SparseLinear projections (f32): the pruned attention's output and
    gradients; the sparse layers' values get the dense gradients at their
    pattern."""
    mha = _attention(batch_first=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        mha.in_proj_weight.mul_(torch.rand(mha.in_proj_weight.shape, generator=g) > 0.9)
        mha.out_proj.weight.mul_(torch.rand(mha.out_proj.weight.shape, generator=g) > 0.9)
    ours = ProjectedMultiheadAttention.from_attention(copy.deepcopy(mha))
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(ours, name, SparseLinear.from_dense(getattr(ours, name)))
    x = torch.randn(2, 9, E)
    want, got = mha(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.sum().backward()
    got.sum().backward()
    for ours_layer, dense_grad in zip(
        (ours.q_proj, ours.k_proj, ours.v_proj, ours.out_proj), _projection_grads(mha), strict=True
    ):
        rows = torch.repeat_interleave(torch.arange(E), ours_layer.row_ptr.diff())
        torch.testing.assert_close(ours_layer.values.grad, dense_grad[rows, ours_layer.col_idx.long()],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    # what torch's code reads of an attention, rebuilt from the projections
    torch.testing.assert_close(ours.in_proj_weight, mha.in_proj_weight)
    torch.testing.assert_close(ours.in_proj_bias, mha.in_proj_bias)
    assert ours.q_proj_weight is None


def test_bad_arguments_are_named_and_change_nothing():
    ours = ProjectedMultiheadAttention.from_attention(_attention(batch_first=True))
    x = torch.randn(2, 5, E)
    before = x.clone()
    with pytest.raises(ValueError, match="3-D"):
        ours(x, x[0], x)
    with pytest.raises(ValueError, match="embed_dim=16"):
        ours(torch.randn(2, 5, 8), x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating-point"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="is_causal"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="key and value"):
        ours(x, x, x[:, :3])
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        ProjectedMultiheadAttention.from_attention(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="bias_k and bias_v"):
        ProjectedMultiheadAttention(E, HEADS, nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E),
                                    bias_k=torch.zeros(E))  # fmt: skip
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ProjectedMultiheadAttention(E, 3, nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E))
    assert torch.equal(x, before)


# ---- what the swap makes of a pruned transformer --------------------------------------------


def _pruned_transformer(attention: float = 0.9) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=g) >= (attention if "self_attn" in name else 0.9))
    return model


def _matrices_pruned(model: nn.Module) -> nn.Module:
    """Every weight matrix of ``model`` 90 % zeros (torch's random stream)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape) >= 0.9)
    return model


def _zeros(model: nn.Module) -> list[int]:
    return [int((m.self_attn.in_proj_weight == 0).sum()) + int((m.self_attn.out_proj.weight == 0).sum())
            for m in model.layers]  # fmt: skip


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_the_swap_makes_a_pruned_attentions_projections_sparse(scheme):
    """A pruned attention gets projections of its own, each swapped like a
    Linear: the model computes what it did; training keeps the pattern;
    eval runs the sparse projections (torch's fast path would read the dense
    weights); to_dense gives torch's attention back with the trained
    weights."""
    x = torch.randn(4, 10, 32)
    dense = _pruned_transformer()
    zeros = _zeros(dense)
    model = qsparseprop.swap_modules_with_sparse(
        copy.deepcopy(dense), tuple(x.shape), verbose=False, min_speedup=0.0, persistent=False, scheme=scheme
    )
    rows = {r.name: r for r in model.qsparseprop_swap_report}
    cls = QuantizedSparseLinear if scheme == "s8" else SparseLinear
    for i in range(2):
        attn = model.layers[i].self_attn
        assert isinstance(attn, ProjectedMultiheadAttention)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert type(getattr(attn, p)) is cls and rows[f"layers.{i}.self_attn.{p}"].swapped
    with torch.no_grad():
        tol = dict(rtol=1e-4, atol=1e-4) if scheme == "f32" else dict(rtol=0.1, atol=0.1)
        torch.testing.assert_close(model(x), dense(x), **tol)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert _zeros(model) == zeros, "the pruned projections stay zero"
    calls = []
    for p in ("q_proj", "out_proj"):
        getattr(model.layers[0].self_attn, p).register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    assert len(calls) == 2, "eval calls the sparse projections"
    back = qsparseprop.to_dense(model)
    assert type(back.layers[0].self_attn) is nn.MultiheadAttention
    assert _zeros(back) == zeros
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), evaluated, **tol)  # (int8: dense fp32 against int8)
    assert type(model.layers[0].self_attn) is ProjectedMultiheadAttention, "to_dense copies by default"


def test_an_attention_without_a_swapped_projection_stays_torchs():
    """Nothing swapped in it (timed slower, here by min_speedup): the model
    keeps torch's attention, masked as before; the rows say why."""
    x = torch.randn(4, 10, 32)
    dense = _pruned_transformer()
    original = dense.layers[0].self_attn
    model = qsparseprop.swap_modules_with_sparse(dense, tuple(x.shape), verbose=False, min_speedup=1e9,
                                                 persistent=False)  # fmt: skip
    attn = model.layers[0].self_attn
    assert attn is original, "the very module back"
    assert prune.is_pruned(attn)
    rows = {r.name: r for r in model.qsparseprop_swap_report}
    assert "the attention stays torch's" in rows["layers.0.self_attn.q_proj"].reason
    assert "in_proj_weight_mask" in rows["layers.0.self_attn.out_proj"].reason
    model(x).sum().backward()


def test_a_plan_and_a_checkpoint_rebuild_the_sparse_attention(tmp_path):
    x = torch.randn(4, 10, 32)
    swapped = qsparseprop.swap_modules_with_sparse(
        _pruned_transformer(), tuple(x.shape), verbose=False, min_speedup=0.0, persistent=False
    )
    # one projection kept dense: the plan and checkpoint hold it masked
    report = swapped.qsparseprop_swap_report
    qsparseprop.save_swap_plan(report, tmp_path / "plan.json")
    again = qsparseprop.swap_modules_with_sparse(_pruned_transformer(), plan=str(tmp_path / "plan.json"),
                                                 verbose=False)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(again(x), swapped(x))
    opt = torch.optim.SGD(swapped.parameters(), lr=0.1)
    swapped(x).square().mean().backward()
    opt.step()
    torch.manual_seed(9)  # another dense model: every weight comes from the checkpoint
    other = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)  # fmt: skip
    rebuilt = qsparseprop.apply_swap_plan(other, report, state_dict=swapped.state_dict())
    assert isinstance(rebuilt.layers[1].self_attn, ProjectedMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), swapped(x))


def test_mixed_projections_some_kept_dense_with_their_masks(monkeypatch):
    """A projection below min_sparsity beside swapped ones: it stays an
    nn.Linear in the projected attention, masked (its zeros kept)."""
    model = _pruned_transformer()
    with torch.no_grad():  # v's rows of in_proj 50 % sparse: below min_sparsity
        w = model.layers[0].self_attn.in_proj_weight
        w[64:] = torch.randn(32, 32) * (torch.rand(32, 32) > 0.5)
    x = torch.randn(4, 10, 32)
    model = qsparseprop.swap_modules_with_sparse(model, tuple(x.shape), verbose=False, min_speedup=0.0,
                                                 persistent=False)  # fmt: skip
    attn = model.layers[0].self_attn
    assert isinstance(attn, ProjectedMultiheadAttention)
    assert type(attn.v_proj) is nn.Linear and prune.is_pruned(attn.v_proj)
    zeros = int((attn.v_proj.weight == 0).sum())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert int((attn.v_proj.weight == 0).sum()) == zeros
    back = qsparseprop.to_dense(model)
    assert not prune.is_pruned(back.layers[0].self_attn)


_SEEN: list[str] = []


def _seen(module, args, out):  # (module level: a pickled model holds it)
    _SEEN.append(type(module).__name__)


def test_hooks_copies_and_pickles_go_with_the_projected_attention(tmp_path):
    x = torch.randn(4, 10, 32)
    model = _pruned_transformer()
    seen = _SEEN
    model.layers[0].self_attn.register_forward_hook(_seen)
    model = qsparseprop.swap_modules_with_sparse(model, tuple(x.shape), verbose=False, min_speedup=0.0,
                                                 persistent=False)  # fmt: skip
    seen.clear()
    model(x)
    assert seen == ["ProjectedMultiheadAttention"]
    seen.clear()
    twin = copy.deepcopy(model)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
        torch.testing.assert_close(loaded(x), model(x))
    assert pickle.loads(pickle.dumps(model.layers[1].self_attn)).embed_dim == 32
    assert seen == ["ProjectedMultiheadAttention"] * 4  # the copy, the model, the loaded one, the model
    seen.clear()
    back = qsparseprop.to_dense(model)
    back(x)
    assert seen == ["MultiheadAttention"]


@pytest.mark.parametrize("widths", [{}, {"kdim": 12, "vdim": 10}])
def test_a_checkpoint_of_torchs_attention_loads(widths):
    """torch's keys (in_proj_weight / in_proj_bias, or q/k/v_proj_weight)
    load into the projections, sparse ones included; the caller's dict
    keeps its keys."""
    mha = _attention(batch_first=True, **widths)
    with torch.no_grad():
        for p in (mha.in_proj_weight, mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight):
            if p is not None:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) > 0.9)
    ours = ProjectedMultiheadAttention.from_attention(copy.deepcopy(mha))
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(ours, name, SparseLinear.from_dense(getattr(ours, name)))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)  # trained away from the checkpoint
    checkpoint = mha.state_dict()
    keys = set(checkpoint)
    ours.load_state_dict(checkpoint)
    assert set(checkpoint) == keys
    x = torch.randn(2, 5, E)
    key = torch.randn(2, 6, mha.kdim)
    value = torch.randn(2, 6, mha.vdim)
    torch.testing.assert_close(ours(x, key, value)[0], mha(x, key, value)[0], rtol=1e-5, atol=1e-5)


def test_a_decoder_layers_self_and_cross_attention_are_both_projected():
    """nn.TransformerDecoderLayer: self-attention, then cross-attention over
    a memory of another length (key and value not the query)."""
    torch.manual_seed(0)
    dense = _matrices_pruned(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
    tgt, memory = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    model = qsparseprop.swap_modules_with_sparse(
        copy.deepcopy(dense), None, example_inputs=(tgt, memory), verbose=False, min_speedup=0.0,
        persistent=False, scheme="f32",
    )  # fmt: skip
    assert isinstance(model.self_attn, ProjectedMultiheadAttention)
    assert isinstance(model.multihead_attn, ProjectedMultiheadAttention)
    assert type(model.multihead_attn.k_proj) is SparseLinear
    want = dense(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    got = model(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got.sum().backward()
    assert model.multihead_attn.k_proj.values.grad.abs().sum() > 0


def test_compile_and_export_take_the_projected_attention():
    """torch.compile (forward and backward) and torch.export of an encoder
    layer whose attention the swap projected compute what eager does."""
    torch.manual_seed(0)
    layer = _matrices_pruned(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
    x = torch.randn(3, 7, 32)
    model = qsparseprop.swap_modules_with_sparse(layer, tuple(x.shape), verbose=False, min_speedup=0.0,
                                                 persistent=False, scheme="f32")  # fmt: skip
    assert isinstance(model.self_attn, ProjectedMultiheadAttention)
    eager = model(x)
    eager.sum().backward()
    want = model.self_attn.q_proj.values.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.self_attn.q_proj.values.grad, want, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        exported = torch.export.export(model, (x,)).module()(x)
        torch.testing.assert_close(exported, model(x))


def test_from_attention_leaves_a_pruned_attention_as_it_was():
    """torch's pruning hook on the attention recomputes its own weight: the
    projected copy does not take it, and the attention keeps it (and its
    other hooks, shared with the copy)."""
    mha = _attention(batch_first=True)
    prune.l1_unstructured(mha, "in_proj_weight", amount=0.5)
    seen = []
    mha.register_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    ours = ProjectedMultiheadAttention.from_attention(mha)
    assert prune.is_pruned(mha) and not any(
        isinstance(h, prune.BasePruningMethod) for h in ours._forward_pre_hooks.values()
    )
    x = torch.randn(2, 5, E)
    torch.testing.assert_close(ours(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)
    assert seen == ["ProjectedMultiheadAttention", "MultiheadAttention"]
    mha(x, x, x)[0].sum().backward()  # the attention still trains through its mask
    assert mha.in_proj_weight_orig.grad is not None


def test_a_probe_that_fails_hands_the_model_back_as_it_came():
    """The swap projects the attentions before its probe forward: a probe
    that cannot run (a wrong input shape) raises with the model untouched."""
    model = _pruned_transformer()
    attention = model.layers[0].self_attn
    with pytest.raises(ValueError, match="probe forward"):  # (ours: query must be embed_dim wide)
        qsparseprop.swap_modules_with_sparse(model, (4, 10, 31), verbose=False, persistent=False)
    assert model.layers[0].self_attn is attention
    assert model.layers[0].activation_relu_or_gelu == 1  # torch's fast path as it was


def test_an_attention_alone_and_to_dense_of_a_projected_one():
    """A model that is an attention itself stays torch's (nothing to put its
    projected version in); to_dense of a projected attention with sparse
    projections gives torch's attention computing the same."""
    mha = _attention(batch_first=True)
    with torch.no_grad():
        mha.out_proj.weight.mul_(torch.rand(mha.out_proj.weight.shape) > 0.9)
    x = torch.randn(2, 5, E)
    swapped = qsparseprop.swap_modules_with_sparse(mha, None, example_inputs=(x, x, x), verbose=False,
                                                   persistent=False, min_speedup=0.0)  # fmt: skip
    assert swapped is mha and type(mha) is nn.MultiheadAttention
    ours = ProjectedMultiheadAttention.from_attention(mha)
    ours.out_proj = SparseLinear.from_dense(ours.out_proj)
    back = qsparseprop.to_dense(ours)
    assert type(back) is nn.MultiheadAttention and type(back.out_proj) is not SparseLinear
    torch.testing.assert_close(back(x, x, x)[0], ours(x, x, x)[0], rtol=1e-5, atol=1e-5)
