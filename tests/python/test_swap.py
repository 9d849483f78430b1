"""swap_modules_with_sparse on a small CNN + MLP."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import qsparseprop
from conftest import prune_random_
from qsparseprop import (
    PrototypeQuantizedSparseConv2d,
    QuantizedSparseConv2d,
    QuantizedSparseLinear,
    SparseConv2d,
    SparseLinear,
    swap_modules_with_sparse,
)


def _model(sparsity=0.9):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    for mod in m:
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(mod, "weight", amount=sparsity)
    return m


def test_swap_f32_keeps_outputs_and_reports(capsys):
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    want = model(x)
    out = swap_modules_with_sparse(model, (4, 3, 8, 8), quantize=False, min_speedup=0.0, repeats=2, warmup=1)
    assert out is model
    assert [type(model[i]) for i in (0, 2, 5, 7)] == [SparseConv2d, SparseConv2d, SparseLinear, SparseLinear]
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    table = capsys.readouterr().out
    assert "dense ms" in table and "swap" in table and "(4, 256)" in table
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert rows["0"].endswith("; fused: its ReLU"), rows["0"]  # what each swapped layer runs with it
    assert rows["5"].endswith("; fused: its ReLU, one block with the next Linear"), rows["5"]
    assert "fused:" not in rows["7"]


def test_swap_int8_within_error_and_not_inplace():
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    want = model(x)
    out = swap_modules_with_sparse(model, (4, 3, 8, 8), inplace=False, verbose=False, min_speedup=0.0, repeats=1)
    assert out is not model and isinstance(model[0], nn.Conv2d)
    assert isinstance(out[0], QuantizedSparseConv2d) and isinstance(out[7], QuantizedSparseLinear)
    err = ((out(x) - want).norm() / want.norm()).item()
    assert err < 0.05


def test_min_sparsity_and_min_speedup_are_respected():
    model = _model(sparsity=0.5)
    swap_modules_with_sparse(model, (2, 3, 8, 8), verbose=False, min_speedup=0.0, repeats=1)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model)
    report = model.qsparseprop_swap_report
    assert all(not r.swapped and "min_sparsity" in r.reason for r in report)

    model = _model(sparsity=0.9)
    swap_modules_with_sparse(model, (2, 3, 8, 8), verbose=False, min_speedup=1e9, repeats=1)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model)
    assert all(r.dense_ms > 0 and r.sparse_ms > 0 for r in model.qsparseprop_swap_report)


def test_prototype_swap():
    model = _model()
    swap_modules_with_sparse(model, (2, 3, 8, 8), verbose=False, prototype=True)
    assert isinstance(model[0], PrototypeQuantizedSparseConv2d)
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_the_probe_leaves_batchnorm_statistics_and_modes_alone():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )
    for mod in (m[0], m[4]):
        prune.l1_unstructured(mod, "weight", amount=0.9)
    m.train()
    bn = {k: v.clone() for k, v in m[1].state_dict().items()}
    swap_modules_with_sparse(m, (2, 3, 8, 8), verbose=False, min_speedup=0.0)
    for k, v in m[1].state_dict().items():
        assert torch.equal(v, bn[k]), f"BatchNorm {k} changed"
    assert all(mod.training for mod in m.modules())


def test_subclasses_are_considered_and_every_skip_is_listed():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ff = nn.Linear(16, 16)

        def forward(self, x):
            return self.ff(self.attn(x, x, x)[0])

    m = Block()
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            prune.l1_unstructured(mod, "weight", amount=0.9)
    swap_modules_with_sparse(m, (2, 5, 16), verbose=False, min_speedup=0.0)
    rows = {r.name: r for r in m.qsparseprop_swap_report}
    assert "attn.out_proj" in rows, "a subclass of nn.Linear is a candidate"
    # the attention calls its pruned out_proj once it has projections of its own
    assert rows["attn.out_proj"].swapped and isinstance(m.attn, qsparseprop.ProjectedMultiheadAttention)
    assert all("< min_sparsity" in rows[f"attn.{p}_proj"].reason for p in "qkv")  # in_proj is dense
    assert rows["ff"].swapped
    m(torch.randn(2, 5, 16)).sum().backward()  # the block still trains


def test_a_saved_plan_reproduces_the_swaps_and_rebuilds_from_a_checkpoint(tmp_path):
    model = _model()
    swapped = swap_modules_with_sparse(model, (2, 3, 8, 8), inplace=False, verbose=False, min_speedup=1.0)
    # make the decisions mixed whatever the timings said
    report = swapped.qsparseprop_swap_report
    report[0].swapped, report[0].scheme = False, ""
    from qsparseprop import apply_swap_plan, load_swap_plan, save_swap_plan

    plan_path = tmp_path / "plan.json"
    save_swap_plan(report, plan_path)
    plan = load_swap_plan(plan_path)
    assert [(d.name, d.swapped) for d in plan] == [(d.name, d.swapped) for d in report]
    # the same swaps, without timing, on another copy of the pruned model
    again = swap_modules_with_sparse(_model(), plan=plan_path, verbose=False)
    kinds = [type(again.get_submodule(d.name)).__name__ for d in plan]
    assert kinds == [
        ("QuantizedSparseLinear" if d.kind == "Linear" else "QuantizedSparseConv2d") if d.swapped else d.kind
        for d in plan
    ]
    # a swapped model's state_dict rebuilds a model from the dense architecture
    for d in plan:
        if d.swapped:
            again.get_submodule(d.name).values.data.mul_(1.5)  # "fine-tuned"
    sd = again.state_dict()
    rebuilt = apply_swap_plan(_model(), plan, state_dict=sd)
    x = torch.randn(2, 3, 8, 8)
    again.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(x), again(x))


def test_a_plan_refuses_a_model_pruned_differently():
    plan = swap_modules_with_sparse(_model(0.9), (2, 3, 8, 8), verbose=False, prototype=True).qsparseprop_swap_report
    import pytest

    with pytest.raises(ValueError, match="pattern differs"):
        swap_modules_with_sparse(_model(0.95), plan=plan, verbose=False)


def test_to_dense_round_trip_and_export():
    from qsparseprop import to_dense

    model = swap_modules_with_sparse(_model(), (2, 3, 8, 8), verbose=False, min_speedup=0.0, quantize=False)
    model.eval()
    dense = to_dense(model)
    assert not any(type(m).__module__.startswith("qsparseprop") for m in dense.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)
    exported = torch.export.export(dense, (x,))
    torch.testing.assert_close(exported.module()(x), dense(x))
    exported_sparse = torch.export.export(model, (x,))  # the swapped model exports too
    torch.testing.assert_close(exported_sparse.module()(x), model(x))
    # TorchScript cannot take the layers' kernels: clear refusals naming what
    # works (they failed on "graphs differed across invocations" and
    # "Expected a single top-level function")
    with pytest.raises(RuntimeError, match=r"jit.trace cannot record .*to_dense\(model\).*torch.export"):
        torch.jit.trace(model, x)
    with pytest.raises(RuntimeError, match=r"jit.script cannot compile .*to_dense\(model\).*torch.export"):
        torch.jit.script(model)
    for script in (torch.jit.trace(dense, x), torch.jit.script(dense)):
        torch.testing.assert_close(script(x), dense(x))


def test_decisions_against_bf16_autocast_with_progress(capsys):
    model = swap_modules_with_sparse(_model(), (2, 3, 8, 8), autocast=torch.bfloat16, min_speedup=0.0, repeats=2)
    err = capsys.readouterr().err
    assert "timing 1/4" in err and "timing 4/4" in err
    assert all("vs dense bfloat16" in r.reason for r in model.qsparseprop_swap_report if r.swapped)


def test_a_plan_saved_here_makes_the_same_swaps_in_another_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from qsparseprop import save_swap_plan

    model = swap_modules_with_sparse(_model(), (2, 3, 8, 8), verbose=False, min_speedup=1.0)
    plan = tmp_path / "plan.json"
    save_swap_plan(model, plan)
    here = [type(m).__name__ for m in model]
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); from test_swap import _model; "
        "from qsparseprop import swap_modules_with_sparse as s; "
        "m = s(_model(), plan=sys.argv[1], verbose=False); print(','.join(type(x).__name__ for x in m))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(plan), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().split(",") == here


def test_a_module_under_two_names_is_swapped_under_both_and_stays_tied():
    """Tied layers (one module reachable as `a` and as `b`) were swapped under
    the first name only: `b` kept the dense layer and after a few SGD steps the
    two copies differed, silently."""
    torch.manual_seed(0)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = prune_random_(torch.nn.Linear(64, 64), 0.9)
            self.mid = torch.nn.ReLU()
            self.b = self.a

        def forward(self, x):
            return self.b(self.mid(self.a(x)))

    net = Tied()
    swapped = qsparseprop.swap_modules_with_sparse(net, (8, 64), verbose=False, min_speedup=0.0, quantize=False)
    assert isinstance(swapped.a, qsparseprop.SparseLinear) and swapped.b is swapped.a
    row = swapped.qsparseprop_swap_report[0]
    assert row.name == "a" and "also b" in row.reason, row.reason
    opt = torch.optim.SGD(swapped.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        swapped(torch.randn(8, 64)).square().mean().backward()
        opt.step()
    assert swapped.b is swapped.a
    dense = qsparseprop.to_dense(swapped)
    assert isinstance(dense.a, torch.nn.Linear) and dense.b is dense.a, "to_dense keeps the tie"
    again = qsparseprop.apply_swap_plan(Tied(), swapped.qsparseprop_swap_report, strict=False)
    assert again.b is again.a and isinstance(again.a, qsparseprop.SparseLinear)


def test_kept_dense_layers_keep_their_pruning():
    """A pruned layer the swap keeps dense trained densely afterwards and its
    pruned weights filled in (14 747 zeros -> 128 after 5 SGD steps in the
    report). It now gets its pattern as a torch pruning mask; mask_kept=False
    leaves it plain (and the zeros regrow, which shows the test can fail)."""

    def net():
        torch.manual_seed(0)
        return nn.Sequential(prune_random_(nn.Linear(64, 64), 0.9), nn.ReLU(), prune_random_(nn.Linear(64, 8), 0.5))

    def train_steps(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()

    # min_speedup huge: every layer is kept dense
    kept = swap_modules_with_sparse(net(), (16, 64), verbose=False, min_speedup=1e9, persistent=False)
    zeros = [(m.weight == 0).sum().item() for m in (kept[0], kept[2])]
    assert all(prune.is_pruned(m) for m in (kept[0], kept[2]))
    assert all("pruning mask" in r.reason for r in kept.qsparseprop_swap_report), kept.qsparseprop_swap_report
    train_steps(kept)
    assert [(m.weight == 0).sum().item() for m in (kept[0], kept[2])] == zeros
    assert "0.weight_mask" in kept.state_dict() and "0.weight_orig" in kept.state_dict()
    # to_dense makes them plain, zeros in place: an ordinary model TorchScript
    # takes (jit.script failed on the masks' hooks)
    dense = qsparseprop.to_dense(kept)
    assert not prune.is_pruned(dense) and [(m.weight == 0).sum().item() for m in (dense[0], dense[2])] == zeros
    x = torch.randn(3, 64)
    torch.testing.assert_close(torch.jit.script(dense)(x), dense(x))
    prune.remove(kept[0], "weight")  # plain again, zeros in place
    assert not prune.is_pruned(kept[0]) and (kept[0].weight == 0).sum().item() == zeros[0]
    # a plan applied elsewhere (another DDP rank) masks the same layers
    again = qsparseprop.apply_swap_plan(net(), kept.qsparseprop_swap_report)
    assert prune.is_pruned(again[0]) and prune.is_pruned(again[2])
    # a checkpoint rebuilt on the dense architecture (random, unpruned
    # weights): the checkpoint's masks decide, and it loads whole
    masked = swap_modules_with_sparse(net(), (16, 64), verbose=False, min_speedup=1e9, persistent=False)
    rebuilt = qsparseprop.apply_swap_plan(
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)),
        masked.qsparseprop_swap_report,
        state_dict=masked.state_dict(),
    )
    rebuilt(torch.randn(2, 64))  # the pruning hook recomputes .weight on the next forward
    assert prune.is_pruned(rebuilt[0]) and torch.equal(rebuilt[0].weight, masked[0].weight)

    plain = swap_modules_with_sparse(net(), (16, 64), verbose=False, min_speedup=1e9, persistent=False, mask_kept=False)
    assert not prune.is_pruned(plain[0])
    train_steps(plain)
    assert (plain[0].weight == 0).sum().item() < zeros[0], "without the mask the zeros regrow"


def _pruned_90(model: nn.Module, attention: float = 0.9) -> nn.Module:
    """Every matrix of ``model`` 90 % exact zeros, an attention's
    projections ``attention`` (below min_sparsity's 0.8 the swap leaves the
    attention torch's, its projections masked)."""
    g = torch.Generator().manual_seed(1)
    in_attention = {id(p) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=g) >= (attention if id(p) in in_attention else 0.9))
    return model


def _pruned_encoder(attention: float = 0.9) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return _pruned_90(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), attention)


class _CrossAttention(nn.Module):
    """Attention over a memory of other widths (kdim, vdim): separate q, k, v
    projection weights instead of in_proj_weight."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, kdim=16, vdim=24)
        self.head = nn.Linear(32, 32)

    def forward(self, x, keys, values):
        return self.head(self.attn(x, keys, values, need_weights=False)[0])


def _attention_zeros(mha: nn.MultiheadAttention) -> list[int]:
    names = ["in_proj_weight"] if mha._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return [(getattr(mha, n) == 0).sum().item() for n in names] + [(mha.out_proj.weight == 0).sum().item()]


def _sgd_steps(model: nn.Module, *inputs: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        model(*inputs).square().mean().backward()
        opt.step()


def test_a_pruned_attention_keeps_its_pruning_like_a_kept_dense_layer():
    """nn.MultiheadAttention reads its projections' weights itself (and never
    calls out_proj); left torch's (here its projections are below
    min_sparsity; test_attention.py has those the swap makes sparse) and
    pruned, it trained densely: every zero of a 90 % pruned encoder layer's attention was gone
    after 5 SGD steps while its swapped MLP stayed sparse. Its projections
    now get their patterns as pruning masks (out_proj's applied by a hook on
    the attention); the table says so; eval after a step reads the stepped
    weights; a copy, a plan or a checkpoint masks the same; prune.remove
    makes each plain again; mask_kept=False leaves them (and the zeros
    regrow: the test can fail)."""
    kwargs = dict(verbose=False, min_speedup=0.0, persistent=False)
    x = torch.randn(4, 10, 32)
    swapped = swap_modules_with_sparse(_pruned_encoder(0.5), tuple(x.shape), **kwargs)
    mha = swapped.layers[0].self_attn
    zeros = _attention_zeros(mha)
    assert all(z > 0 for z in zeros)
    assert prune.is_pruned(mha) and prune.is_pruned(mha.out_proj)
    row = next(r for r in swapped.qsparseprop_swap_report if r.name == "layers.0.self_attn.out_proj")
    assert "(in_proj_weight_mask, out_proj.weight_mask)" in row.reason, row.reason
    _sgd_steps(swapped, x)
    assert _attention_zeros(mha) == zeros
    # eval right after a step reads the weights of after it (the masks' hooks
    # run: torch's fast path, which would read them from before, stays off)
    with torch.no_grad():
        got = swapped.eval()(x)
        want = swapped.train()(x)
    torch.testing.assert_close(got, want)
    swapped.train()
    assert {k for k in swapped.state_dict() if k.startswith("layers.0.self_attn.") and k.endswith("_mask")} == {
        "layers.0.self_attn.in_proj_weight_mask",
        "layers.0.self_attn.out_proj.weight_mask",
    }
    # a copy is masked and trains its own weights
    twin = copy.deepcopy(swapped)
    _sgd_steps(twin, x)
    assert _attention_zeros(twin.layers[0].self_attn) == zeros
    # the plan on another rank; a checkpoint rebuilt on the dense architecture
    again = qsparseprop.apply_swap_plan(_pruned_encoder(0.5), swapped.qsparseprop_swap_report)
    assert prune.is_pruned(again.layers[0].self_attn.out_proj) and prune.is_pruned(again.layers[0].self_attn)
    torch.manual_seed(5)
    dense = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
    )
    rebuilt = qsparseprop.apply_swap_plan(dense, swapped.qsparseprop_swap_report, state_dict=swapped.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), swapped(x))
    assert _attention_zeros(rebuilt.layers[0].self_attn) == zeros
    # to_dense: plain parameters, the zeros in place, no hook left, and
    # TorchScript takes it (torch's pruning hooks are no TorchScript); the
    # swapped model keeps its masks
    dense = qsparseprop.to_dense(swapped).eval()
    assert not prune.is_pruned(dense) and not dense.layers[0].self_attn._forward_pre_hooks
    assert _attention_zeros(dense.layers[0].self_attn) == zeros
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(dense)(x), dense(x))
    assert prune.is_pruned(mha)
    # prune.remove: plain parameters, the zeros in place, the hook a no-op
    prune.remove(mha, "in_proj_weight")
    prune.remove(mha.out_proj, "weight")
    assert not prune.is_pruned(mha) and _attention_zeros(mha) == zeros
    swapped(x).sum().backward()

    plain = swap_modules_with_sparse(_pruned_encoder(0.5), tuple(x.shape), mask_kept=False, **kwargs)
    assert not prune.is_pruned(plain.layers[0].self_attn)
    _sgd_steps(plain, x)
    assert all(a < b for a, b in zip(_attention_zeros(plain.layers[0].self_attn), zeros, strict=True))


def test_an_encoder_layer_kept_dense_with_its_masks_evaluates_its_latest_weights():
    """torch's encoder layer fast path (eval, no autograd) reads linear1,
    linear2 and the attention's weights itself: where they hold pruning
    masks (every layer kept dense here) it would read them as the masks'
    hooks left them on the last training forward, before the optimizer's
    step. torch leaves the path where a submodule has hooks; this holds it
    to that."""
    x = torch.randn(4, 10, 32)
    kept = swap_modules_with_sparse(_pruned_encoder(), tuple(x.shape), verbose=False, min_speedup=1e9, persistent=False)
    layer = kept.layers[0]
    assert all(prune.is_pruned(m) for m in (layer.linear1, layer.linear2, layer.self_attn))
    _sgd_steps(kept, x)
    with torch.no_grad():
        got = kept.eval()(x)  # right after the step
        want = kept.train()(x)  # each module's forward: its hooks recompute its weights
    torch.testing.assert_close(got, want)


def test_an_out_proj_pruned_by_its_owner_trains_through_the_attention():
    """torch's pruning hook on an attention's out_proj recomputes its weight
    on out_proj's own forward, which the attention never calls: the weight
    stays the product made at pruning time, and a second backward through
    it fails (its graph was freed). The swap leaves the owner's mask and
    recomputes the weight before each call of the attention."""
    x = torch.randn(4, 10, 32)
    enc = _pruned_encoder(0.5)  # (the owner's mask makes out_proj 75 % sparse: below min_sparsity)
    out_proj = enc.layers[0].self_attn.out_proj
    prune.random_unstructured(out_proj, "weight", amount=0.5)  # the owner's, not removed
    mask = out_proj.weight_mask.clone()
    swapped = swap_modules_with_sparse(enc, tuple(x.shape), verbose=False, min_speedup=0.0, persistent=False)
    out_proj = swapped.layers[0].self_attn.out_proj
    _sgd_steps(swapped, x)  # failed at the second backward
    with torch.no_grad():
        swapped(x)  # the weight as of this call: after the last step
    assert torch.equal(out_proj.weight_mask, mask)
    torch.testing.assert_close(out_proj.weight, out_proj.weight_orig * mask)


def test_an_attention_with_separate_projections_keeps_its_pruning():
    """kdim / vdim unlike embed_dim: q, k and v have weights of their own,
    each masked."""
    torch.manual_seed(0)
    inputs = (torch.randn(4, 6, 32), torch.randn(4, 5, 16), torch.randn(4, 5, 24))
    model = swap_modules_with_sparse(
        _pruned_90(_CrossAttention(), attention=0.5),
        None,
        example_inputs=inputs,
        verbose=False,
        min_speedup=0.0,
        persistent=False,
    )
    mha = model.attn
    zeros = _attention_zeros(mha)
    assert all(z > 0 for z in zeros) and len(zeros) == 4
    assert prune.is_pruned(mha.out_proj)
    assert all(f"{n}_mask" in dict(mha.named_buffers()) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    _sgd_steps(model, *inputs)
    assert _attention_zeros(mha) == zeros


def test_a_model_with_kept_dense_layers_deep_copies_and_pickles_like_before_the_swap(tmp_path):
    """torch's pruning leaves ``layer.weight`` a non-leaf tensor (weight_orig
    * weight_mask), which copy.deepcopy refuses: a pruned-then-plain model
    that deep-copied before the swap (copy.deepcopy(best), AveragedModel)
    failed after it once a layer was kept dense with its mask. The copy is
    whole: its weight is its own weight_orig * weight_mask, trains its own
    weight_orig, and stays masked."""
    from torch.optim.swa_utils import AveragedModel

    def net():
        torch.manual_seed(0)
        return nn.Sequential(prune_random_(nn.Linear(64, 64), 0.9), nn.ReLU(), prune_random_(nn.Linear(64, 8), 0.5))

    kept = swap_modules_with_sparse(net(), (16, 64), verbose=False, min_speedup=1e9, persistent=False)
    assert prune.is_pruned(kept[0]) and kept[0].weight.grad_fn is not None
    x = torch.randn(16, 64)
    for when in ("after the swap", "after a training step"):
        twin = copy.deepcopy(kept)
        AveragedModel(kept)  # deep-copies at construction
        assert prune.is_pruned(twin[0]), when
        assert twin[0].weight_orig is not kept[0].weight_orig, when
        torch.testing.assert_close(twin[0].weight, kept[0].weight)
        before = kept[0].weight_orig.detach().clone()
        grad_before = kept[0].weight_orig.grad
        twin.zero_grad(set_to_none=True)
        opt = torch.optim.SGD(twin.parameters(), lr=0.5)
        # the copy's weight, read outside forward as users do for a penalty,
        # leads to the copy's own weight_orig
        (twin(x).square().mean() + twin[0].weight.square().sum()).backward()
        assert twin[0].weight_orig.grad is not None and kept[0].weight_orig.grad is grad_before, when
        opt.step()
        twin(x)
        assert torch.equal(kept[0].weight_orig, before), f"{when}: training the copy moved the original"
        assert bool((twin[0].weight[kept[0].weight_mask == 0] == 0).all()), f"{when}: the copy regrew pruned weights"
        copy.deepcopy(twin)  # a copy of a copy too
        kept(x).square().mean().backward()  # the next case: after a training step
    torch.save(kept, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), kept(x))
    copy.deepcopy(loaded)
    prune.remove(loaded[0], "weight")
    assert not prune.is_pruned(loaded[0]) and isinstance(loaded[0].weight, nn.Parameter)


class _TinyLM(nn.Module):
    """Token ids in, an embedding, a pruned hidden layer, an output layer
    (tied to the embedding or pruned on its own)."""

    def __init__(self, tie: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(300, 64)
        self.fc = prune_random_(nn.Linear(64, 64), 0.9)
        self.head = nn.Linear(64, 300, bias=False)
        if tie:
            self.head.weight = self.emb.weight
            with torch.no_grad():  # pruned in place: both still hold it
                self.emb.weight.mul_(
                    torch.rand(self.emb.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.9
                )
        else:
            prune_random_(self.head, 0.9)

    def forward(self, ids, temperature=1.0):
        return self.head(torch.relu(self.fc(self.emb(ids)))) / temperature


def test_a_model_taking_token_ids_is_swapped_from_example_inputs(tmp_path):
    """The probe forward ran on torch.randn(input_shape): a model whose
    input is token ids (every language model) could not be swapped whole.
    example_inputs takes the model's arguments as a training batch would be
    (a tensor, a tuple, or keyword arguments) and leaves them untouched;
    input_shape on such a model says to use it."""
    from qsparseprop.warmup import export_patterns

    ids = torch.randint(0, 300, (8, 12))
    kept = ids.clone()
    with pytest.raises(RuntimeError, match="example_inputs"):
        swap_modules_with_sparse(_TinyLM(tie=False), (8, 12), verbose=False)
    swapped = []
    for example in (ids, (ids,), (ids, 2.0), {"ids": ids, "temperature": 2.0}):
        model = swap_modules_with_sparse(
            _TinyLM(tie=False), example_inputs=example, verbose=False, min_speedup=0.0, scheme="f32"
        )
        rows = {r.name: r for r in model.qsparseprop_swap_report}
        assert rows["fc"].input_shape == (8, 12, 64) and rows["head"].input_shape == (8, 12, 64), rows
        swapped.append(sorted(n for n, r in rows.items() if r.swapped))
        torch.testing.assert_close(model(ids), _TinyLM(tie=False)(ids), rtol=1e-4, atol=1e-5)
    assert swapped == [["fc", "head"]] * 4, swapped
    assert torch.equal(ids, kept), "the probe changed the caller's input"
    with pytest.raises(ValueError, match="one of them"):
        swap_modules_with_sparse(_TinyLM(tie=False), (8, 12), example_inputs=ids, verbose=False)
    with pytest.raises(ValueError, match="one of them"):
        swap_modules_with_sparse(_TinyLM(tie=False), verbose=False)
    with pytest.raises(TypeError, match="example_inputs must be a tensor, a tuple"):
        swap_modules_with_sparse(_TinyLM(tie=False), example_inputs={1, 2}, verbose=False)
    model = swap_modules_with_sparse(_TinyLM(tie=False), example_inputs=ids, verbose=False, min_speedup=0.0)
    plain = _TinyLM(tie=False)
    for name in ("fc", "head"):  # export_patterns probes the same way without a swap report
        setattr(plain, name, getattr(model, name))
    assert export_patterns(plain, tmp_path / "patterns.json", example_inputs=ids) == 2


def test_a_layer_tied_to_another_modules_parameter_stays_dense_and_tied():
    """A language model's output layer sharing the embedding's weight was
    swapped: the sparse layer trained a copy of its own and the two drifted
    apart with every step, silently. It now stays dense, unmasked (a mask
    on one holder would untie them too), and says why."""
    ids = torch.randint(0, 300, (8, 12))
    model = swap_modules_with_sparse(_TinyLM(tie=True), example_inputs=ids, verbose=False, min_speedup=0.0)
    rows = {r.name: r for r in model.qsparseprop_swap_report}
    assert rows["fc"].swapped and not rows["head"].swapped, rows
    assert "weight is also emb.weight (tied)" in rows["head"].reason, rows["head"].reason
    assert not prune.is_pruned(model.head) and model.head.weight is model.emb.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids).square().mean().backward()
    opt.step()
    assert model.head.weight is model.emb.weight
    # the same module under two names is no tie: it is swapped under both
    shared = nn.Sequential(prune_random_(nn.Linear(64, 64), 0.9), nn.ReLU())
    shared.append(shared[0])
    shared = swap_modules_with_sparse(shared, (8, 64), verbose=False, min_speedup=0.0)
    assert all(r.swapped for r in shared.qsparseprop_swap_report if r.kind == "Linear")


class _TwoBranches(nn.Module):
    """Two copies of one pruned Linear on one input, summed: both get the
    same output gradient."""

    def __init__(self):
        super().__init__()
        self.a = prune_random_(nn.Linear(64, 48), 0.9, generator_seed=5)
        self.b = copy.deepcopy(self.a)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_each_swapped_layer_draws_its_own_rounding_stream():
    """Every swapped layer had seed 0: in a step all layers' int8 gradients
    were rounded with the same noise at the same flat index (two branches
    given one gradient got the same rounding errors, and a layer's gradient,
    computed from the next one's rounded gradient, met the noise that
    rounding had used). The seed now comes from the layer's name, the same
    again when a plan or a checkpoint rebuilds the model."""
    x, g = torch.randn(32, 64), torch.randn(32, 48)
    model = swap_modules_with_sparse(_TwoBranches(), (32, 64), verbose=False, min_speedup=0.0, scheme="s8")
    assert isinstance(model.a, QuantizedSparseLinear) and isinstance(model.b, QuantizedSparseLinear)
    assert model.a.seed != model.b.seed
    model(x).backward(g)
    ga, gb = model.a.values.grad, model.b.values.grad
    exact = (g.t() @ x)[model.a.to_dense().weight != 0]
    assert not torch.equal(ga, gb), "the two branches' gradients were rounded with the same noise"
    for got in (ga, gb):  # each still the int8 scheme's estimate of the same gradient
        assert (got - exact).norm() / exact.norm() < 0.05
    again = qsparseprop.apply_swap_plan(_TwoBranches(), model.qsparseprop_swap_report)
    assert (again.a.seed, again.b.seed) == (model.a.seed, model.b.seed)
    loaded = qsparseprop.apply_swap_plan(_TwoBranches(), model.qsparseprop_swap_report, state_dict=model.state_dict())
    assert (loaded.a.seed, loaded.b.seed) == (model.a.seed, model.b.seed)


def test_scheme_auto_keeps_the_faster_scheme_per_layer_and_says_why(tmp_path):
    import re

    qsparseprop.set_persistent_cache_dir(str(tmp_path / "cache"))
    try:
        model = swap_modules_with_sparse(
            _model(), (4, 3, 8, 8), scheme="auto", min_speedup=0.0, repeats=2, verbose=False
        )
        rows = [r for r in model.qsparseprop_swap_report if r.swapped]
        assert len(rows) == 4
        for r in rows:
            s8_ms, f32_ms = (float(v) for v in re.search(r"auto: int8 ([\d.]+) ms, f32 ([\d.]+) ms", r.reason).groups())
            bound = (1 + qsparseprop.swap.AUTO_INT8_MARGIN) * f32_ms
            want = "s8" if s8_ms <= bound else "f32"
            # the reason prints 3 decimals: within their rounding of the bound
            # the decision (made on the unrounded times) may go either way
            if abs(s8_ms - bound) <= 0.0005 * (2 + qsparseprop.swap.AUTO_INT8_MARGIN):
                want = r.scheme
            assert r.scheme == want, r.reason
            assert round(r.sparse_ms, 3) == (s8_ms if want == "s8" else f32_ms)
            assert model.get_submodule(r.name).scheme == want
        # a second swap reads both timings from the persistent cache and decides the same
        again = swap_modules_with_sparse(
            _model(), (4, 3, 8, 8), scheme="auto", min_speedup=0.0, repeats=2, verbose=False
        )
        for r, a in zip(rows, [r for r in again.qsparseprop_swap_report if r.swapped], strict=True):
            assert a.scheme == r.scheme and "persistent cache" in a.reason
    finally:
        qsparseprop.set_persistent_cache_dir("")  # the suite's default: off
    with pytest.raises(ValueError, match="auto"):
        swap_modules_with_sparse(_model(), (4, 3, 8, 8), scheme="auto", prototype=True, verbose=False)
    with pytest.raises(ValueError, match="'auto'"):
        swap_modules_with_sparse(_model(), (4, 3, 8, 8), scheme="fastest", verbose=False)


def _strided_block():
    from qsparseprop.finetune import _Residual

    torch.manual_seed(0)
    block = _Residual(6, 12, 2)
    for mod in block.modules():
        if isinstance(mod, nn.Conv2d):
            prune.l1_unstructured(mod, "weight", amount=0.9)
    return block


def _fixed_timings(monkeypatch, shortcut_sparse_ms):
    """Timings by layer (ms): the block's 3x3s 5 dense, 1 sparse; its
    strided 1x1 shortcut 1 dense, ``shortcut_sparse_ms`` sparse."""
    from qsparseprop import swap

    def conv_of(unit):
        return unit[0] if isinstance(unit, nn.Sequential) else unit

    def dense_ms(self):
        return 1.0 if conv_of(self.dense).kernel_size == (1, 1) else 5.0

    def sparse_ms(self, sparse):
        return shortcut_sparse_ms if conv_of(self.dense).kernel_size == (1, 1) else 1.0

    monkeypatch.setattr(swap._LayerTiming, "dense_ms", dense_ms)
    monkeypatch.setattr(swap._LayerTiming, "sparse_ms", sparse_ms)


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_blocks_first_convolution_and_its_shortcut_are_decided_together(scheme, monkeypatch, tmp_path):
    # the shortcut alone times 0.83x (its input's passes, which the fused
    # pair shares, counted in full), the pair 6 / 2.2 = 2.7x: both swapped
    _fixed_timings(monkeypatch, 1.2)
    block = swap_modules_with_sparse(_strided_block(), (2, 6, 8, 8), verbose=False, scheme=scheme, persistent=False)
    rows = {r.name: r for r in block.qsparseprop_swap_report}
    assert all(r.swapped for r in rows.values()), [r.reason for r in rows.values()]
    assert "0.83x" in rows["shortcut.0"].reason and "swapped with body.0" in rows["shortcut.0"].reason
    assert "the pair 2.73x" in rows["shortcut.0"].reason
    assert rows["shortcut.0"].fused_shared_input or rows["body.0"].fused_shared_input
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    block(x).sum().backward()  # the pair runs as one function
    assert x.grad is not None
    # a plan replays the joint decision
    qsparseprop.save_swap_plan(block, tmp_path / "plan.json")
    again = swap_modules_with_sparse(_strided_block(), plan=str(tmp_path / "plan.json"), verbose=False)
    assert all(r.swapped for r in again.qsparseprop_swap_report)


def test_a_pair_below_min_speedup_or_unfused_keeps_the_shortcut_dense(monkeypatch):
    _fixed_timings(monkeypatch, 1.2)
    # min_speedup 3: the first convolution (5x) is swapped, the pair (2.7x) is not enough
    block = swap_modules_with_sparse(_strided_block(), (2, 6, 8, 8), verbose=False, persistent=False, min_speedup=3.0)
    rows = {r.name: r for r in block.qsparseprop_swap_report}
    assert rows["body.0"].swapped and not rows["shortcut.0"].swapped
    assert isinstance(block.shortcut[0], nn.Conv2d)
    # unfused, the two run apart and share nothing: each is decided alone
    block = swap_modules_with_sparse(_strided_block(), (2, 6, 8, 8), verbose=False, persistent=False, fuse=False)
    rows = {r.name: r for r in block.qsparseprop_swap_report}
    assert rows["body.0"].swapped and not rows["shortcut.0"].swapped
    # a shortcut that times faster alone needs no pair
    _fixed_timings(monkeypatch, 0.5)
    block = swap_modules_with_sparse(_strided_block(), (2, 6, 8, 8), verbose=False, persistent=False)
    assert "swapped with" not in {r.name: r for r in block.qsparseprop_swap_report}["shortcut.0"].reason


@pytest.mark.parametrize("how", ["swap", "plan", "fuse"])
@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_a_transformer_layer_evaluates_with_its_sparse_layers(how, scheme, monkeypatch, tmp_path):
    # torch's TransformerEncoderLayer has an inference fast path (eval,
    # autograd off) that reads linear1.weight / linear2.weight itself: it
    # ran dense on the weights our property rebuilds (slower than the dense
    # original; fp32 where the layers are int8) until the swap kept it off
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    for m in (layer.linear1, layer.linear2):
        prune_random_(m, 0.9)
    dense = copy.deepcopy(layer)
    if how == "fuse":
        layer.linear1 = (QuantizedSparseLinear if scheme == "s8" else SparseLinear).from_dense(layer.linear1)
        qsparseprop.fuse(layer)
    else:
        layer = swap_modules_with_sparse(
            layer, (3, 5, 16), verbose=False, scheme=scheme, min_speedup=0.0, repeats=1, persistent=False
        )
    if how == "plan":
        qsparseprop.save_swap_plan(layer, tmp_path / "plan.json")
        layer = swap_modules_with_sparse(copy.deepcopy(dense), plan=str(tmp_path / "plan.json"), verbose=False)
    x = torch.randn(3, 5, 16)
    layer.train()
    trained = layer(x)  # the layers' own path (training: no fast path)
    calls = []
    real = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or real(*a))
    layer.eval(), dense.eval()
    with torch.no_grad():
        got = layer(x)
        dense(x)
    assert len(calls) == 1  # the dense layer's
    # eval without dropout computes what training does, with the sparse layers
    # (the attention's kernels differ by rounding)
    torch.testing.assert_close(got, trained.detach(), rtol=1e-4, atol=1e-5)
    back = qsparseprop.to_dense(layer).eval()
    assert back.activation_relu_or_gelu == dense.activation_relu_or_gelu == 1
    with torch.no_grad():
        back(x)
    assert len(calls) == 2  # the dense model takes torch's path again


def test_hooks_on_the_layers_go_with_them_into_the_swap_and_back():
    # A user's hooks on a layer the swap replaced stayed on the replaced
    # module, which is never called again: they stopped firing, silently.
    # Now they go with the layer (the very dicts: handles still remove them)
    # and back with to_dense; use_masked_relus the same; a pruned layer's
    # own torch.nn.utils.prune hook is dropped (the mask is the pattern).
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # the swap fuses these
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ReLU(),  # no layer before it fuses this one: MaskedReLU
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip
    prune.l1_unstructured(dense[3], "weight", amount=0.9)  # a pruning hook of torch's own
    prune_random_(dense[9], 0.9)
    prune_random_(dense[11], 0.9)
    seen = {}

    def record(name):
        def hook(module, args, *rest):
            seen[name] = [t.detach().clone() for t in (*args, *rest) if isinstance(t, torch.Tensor)]

        return hook

    def record_grad(module, grad_input, grad_output):
        seen["11 backward"] = [grad_output[0].detach().clone()]

    handles = [
        dense[3].register_forward_hook(record("3")), dense[8].register_forward_hook(record("8")),
        dense[9].register_forward_pre_hook(record("9 pre")), dense[10].register_forward_hook(record("10")),
        dense[11].register_full_backward_hook(record_grad),
    ]  # fmt: skip
    x = torch.randn(4, 2, 6, 6)

    def run(model):
        seen.clear()
        model(x).square().sum().backward()
        return dict(seen)

    want = run(dense)
    assert set(want) == {"3", "8", "9 pre", "10", "11 backward"}
    model = swap_modules_with_sparse(
        dense, (4, 2, 6, 6), verbose=False, scheme="f32", min_speedup=0.0, repeats=1, warmup=0, persistent=False
    )
    assert type(model[3]) is SparseConv2d and type(model[9]) is SparseLinear and type(model[11]) is SparseLinear
    assert not any(isinstance(h, prune.BasePruningMethod) for h in model[3]._forward_pre_hooks.values())
    qsparseprop.use_masked_relus(model)
    assert type(model[8]).__name__ == "MaskedReLU"
    for got in (run(model), run(qsparseprop.to_dense(model))):
        assert set(got) == set(want), "a hook stopped firing"
        for name, tensors in want.items():
            for a, b in zip(got[name], tensors, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for h in handles:
        h.remove()
    assert run(model) == {}, "a handle no longer removes its hook"


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm", "weight_norm_hook", "spectral_norm_hook"])
def test_a_layer_whose_weight_something_recomputes_stays_dense_and_says_why(how):
    # A pruned layer under weight_norm was swapped: its sparse values then
    # trained without the reparametrization (and the old hook-based
    # weight_norm's hook, now carried with the layer's hooks, would write a
    # weight the sparse layer does not have)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    for layer in (model[0], model[2]):
        prune_random_(layer, 0.9)
    apply = {
        "weight_norm": nn.utils.parametrizations.weight_norm, "spectral_norm": nn.utils.parametrizations.spectral_norm,
        "weight_norm_hook": nn.utils.weight_norm, "spectral_norm_hook": nn.utils.spectral_norm,
    }[how]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook forms are deprecated
        apply(model[0])
    reparametrized = model[0]
    swapped = swap_modules_with_sparse(
        model, (4, 32), verbose=False, scheme="f32", min_sparsity=0.5, min_speedup=0.0, repeats=1, warmup=0,
        persistent=False,
    )  # fmt: skip
    rows = {r.name: r for r in swapped.qsparseprop_swap_report}
    assert swapped[0] is reparametrized and not rows["0"].swapped
    assert "recomputes its weight" in rows["0"].reason and ("Norm" in rows["0"].reason), rows["0"].reason
    assert "mask" not in rows["0"].reason  # nor masked: its weight is not a parameter to mask
    assert type(swapped[2]) is SparseLinear and rows["2"].swapped
    swapped(torch.randn(4, 32)).sum().backward()  # trains as before, the reparametrization in place
