"""The runtime a user can see: exact cache keys, bounded caches, scratch
memory given back, and tuning as an explicit, stored step."""

import gc

import pytest
import torch

import qsparseprop
from conftest import prune_random_
from qsparseprop import _C, QuantizedSparseLinear, SparseLinear


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture
def forced_hash():
    _C._force_pattern_hash_for_testing(True, 0xC0FFEE)
    yield
    _C._force_pattern_hash_for_testing(False)


@pytest.mark.parametrize("cls", [SparseLinear, QuantizedSparseLinear])
def test_layers_whose_patterns_share_a_hash_compute_their_own_results(forced_hash, cls):
    a = prune_random_(torch.nn.Linear(96, 80), 0.85, generator_seed=1)
    b = prune_random_(torch.nn.Linear(96, 80), 0.85, generator_seed=2)
    sa, sb = cls.from_dense(a), cls.from_dense(b)
    assert not torch.equal(sa.col_idx, sb.col_idx)
    x = torch.randn(70, 96)
    for layer, dense in ((sa, a), (sb, b), (sa, a)):
        y = layer(x)
        want = dense(x)
        tol = 1e-5 if cls is SparseLinear else 0.03
        assert (y - want).abs().max() <= tol * want.abs().max(), type(layer).__name__


def _caches():
    return {c["name"]: c for c in qsparseprop.cache_info()}


def test_a_deleted_layers_plans_and_code_go_with_it():
    """Caches are bounded in bytes; beyond the bound they let go of what
    nobody uses: with a bound of 0, deleting the layers frees every plan and
    every piece of code they had, and a live layer keeps its own."""
    x = torch.randn(8, 64)

    seeds = iter(range(1000))  # every layer its own pattern (one plan each)

    def layers(n):
        out = []
        for _ in range(n):
            dense = prune_random_(torch.nn.Linear(64, 64), 0.9, generator_seed=next(seeds))
            layer = SparseLinear.from_dense(dense)
            layer(x).sum().backward()
            out.append(layer)
        return out

    try:
        qsparseprop.set_cache_memory_limit(0)
        kept = layers(1)[0]
        many = layers(50)
        held = _caches()
        if "jit_plan" not in held:  # the portable tier makes no plans
            assert qsparseprop.cpu_isa() == "ref"
            return
        assert held["jit_plan"]["bytes"] == 0 and held["jit_plan"]["in_use_elsewhere"] >= 51 * 3
        del many
        gc.collect()
        after = _caches()
        for name, c in after.items():
            if name.startswith("jit_"):
                assert c["size"] == 0 and c["bytes"] == 0, c
        # the live layer's three directions are still in use, and still work
        assert after["jit_plan"]["in_use_elsewhere"] == 3
        kept(x).sum().backward()
        assert _caches()["jit_plan"]["generations"] == after["jit_plan"]["generations"]
        # tuning decisions are bounded by count only: a bound of 0 keeps them
        assert after["tuning_decisions"]["size"] > 0
        # with a bound, what is held stays within it
        qsparseprop.set_cache_memory_limit(1 << 20)
        many = layers(50)
        del many
        gc.collect()
        for name, c in _caches().items():
            if name.startswith("jit_"):
                assert c["bytes"] <= c["memory_limit"] == 1 << 20, c
    finally:
        qsparseprop.set_cache_memory_limit(64 << 20)
    with pytest.raises(ValueError, match="nbytes"):
        qsparseprop.set_cache_memory_limit(-1)


def test_every_cache_is_bounded_and_visible():
    layer = SparseLinear.from_dense(prune_random_(torch.nn.Linear(40, 30), 0.8))
    for batch in range(1, 41):  # the last batch of an epoch, a few times over
        layer(torch.randn(batch, 40)).sum().backward()
    infos = {c["name"]: c for c in qsparseprop.cache_info()}
    assert {"jit_plan", "tuning_decisions"} <= set(infos) or qsparseprop.cpu_isa() == "ref"
    for c in infos.values():
        assert c["size"] <= c["capacity"], c
    # Plans do not depend on the batch size: one per direction for all 40.
    if "jit_plan" in infos:
        assert infos["jit_plan"]["generations"] <= infos["jit_plan"]["misses"]


def test_a_huge_one_off_layer_leaves_no_scratch_resident():
    qsparseprop.release_scratch()
    gc.collect()
    before = _resident_bytes()
    layer = SparseLinear.from_dense(prune_random_(torch.nn.Linear(4096, 4096), 0.999))
    x = torch.randn(16384, 4096)  # 256 MiB; its tiles and the output's need 512 MiB of scratch
    y = layer(x)
    assert qsparseprop.scratch_info()["peak_bytes"] >= 512 << 20
    del x, y, layer
    gc.collect()
    info = qsparseprop.scratch_info()
    assert info["in_use_bytes"] == 0
    assert info["idle_bytes"] <= info["capacity_bytes"]  # the pool keeps at most its capacity
    grown = _resident_bytes() - before
    assert grown < info["idle_bytes"] + (64 << 20), f"{grown >> 20} MiB resident after the layer is gone"
    qsparseprop.release_scratch()
    grown = _resident_bytes() - before
    assert grown < 64 << 20, f"{grown >> 20} MiB still resident after release_scratch()"


def test_tuning_is_stored_and_reused(capfd):
    layer = QuantizedSparseLinear.from_dense(prune_random_(torch.nn.Linear(256, 512), 0.99))
    qsparseprop.set_verbose(2)
    try:
        layer(torch.randn(64, 256)).sum().backward()
        first = capfd.readouterr().out
        layer(torch.randn(64, 256)).sum().backward()
        second = capfd.readouterr().out
    finally:
        qsparseprop.set_verbose(0)
    assert "qsp_verbose,tune,sparse_linear_forward," in first
    assert "qsp_verbose,tune," not in second, "a shape is tuned once"


def test_a_batch_size_only_evaluated_makes_and_tunes_only_its_forward(capfd):
    """An evaluation at a batch size training never ran (batches of 1000
    after training at 128) needs no backward: none is made or tuned until a
    backward of that shape runs, and then both directions are."""
    layer = QuantizedSparseLinear.from_dense(prune_random_(torch.nn.Linear(256, 512), 0.9))
    x = torch.randn(40, 256)
    qsparseprop.set_verbose(2)
    try:
        with torch.no_grad():
            y_eval = layer(x)
        evaluated = capfd.readouterr().out
        y = layer(x)
        y.sum().backward()
        trained = capfd.readouterr().out
    finally:
        qsparseprop.set_verbose(0)
    assert "qsp_verbose,tune,sparse_linear_forward," in evaluated, evaluated
    assert "sparse_linear_backward" not in evaluated, evaluated
    for direction in ("backward_data", "backward_weights"):
        assert f"qsp_verbose,tune,sparse_linear_{direction}," in trained, trained
    assert "qsp_verbose,tune,sparse_linear_forward," not in trained, "the forward was made once"
    assert torch.equal(y.detach(), y_eval)
    assert layer.values.grad is not None and torch.isfinite(layer.values.grad).all()


def test_outputs_live_in_pooled_memory_until_torch_frees_them():
    """Outputs (y, dx, the s8 workspace) are lent by the pool: in use while a
    tensor holds them, back in the pool (and reused, no fresh pages) once
    torch frees them."""
    qsparseprop.release_scratch()
    gc.collect()
    layer = QuantizedSparseLinear.from_dense(prune_random_(torch.nn.Linear(512, 1024), 0.9))
    x = torch.randn(256, 512, requires_grad=True)
    y = layer(x)
    held = qsparseprop.scratch_info()["in_use_bytes"]
    assert held >= y.numel() * 4  # y, and the int8 workspace autograd keeps
    y.backward(torch.randn_like(y))
    assert x.grad is not None and torch.isfinite(x.grad).all()
    del y
    gc.collect()
    assert qsparseprop.scratch_info()["in_use_bytes"] < held  # y went back
    x.grad = None
    del x
    gc.collect()
    assert qsparseprop.scratch_info()["in_use_bytes"] == 0


def test_profiling_splits_each_direction_into_kernel_and_passes():
    layer = SparseLinear.from_dense(prune_random_(torch.nn.Linear(256, 512), 0.9))
    x = torch.randn(64, 256, requires_grad=True)
    layer(x).sum().backward()  # tuning and plans out of the way
    qsparseprop.set_profiling(False)
    qsparseprop.clear_profile()
    layer(x).sum().backward()
    assert all(e["calls"] == 0 for e in qsparseprop.profile_info()), "off: nothing recorded"
    qsparseprop.set_profiling(True)
    try:
        for _ in range(3):
            layer(x).sum().backward()
        info = {e["direction"]: e for e in qsparseprop.profile_info()}
        for d in ("forward", "backward_data", "backward_weights"):
            assert info[d]["calls"] == 3, info[d]
            assert 0 < info[d]["kernel_ms"] <= info[d]["total_ms"], info[d]
        qsparseprop.clear_profile()
        assert all(e["calls"] == 0 and e["total_ms"] == 0 for e in qsparseprop.profile_info())
    finally:
        qsparseprop.set_profiling(False)


def test_a_contended_machine_runs_the_kernels_on_one_thread(monkeypatch):
    from qsparseprop import _ops

    monkeypatch.setattr(_ops, "_ADAPT", True)
    monkeypatch.setattr(_ops, "_CPUS", 2)
    for running, want in ((2, 2), (5, 2), (6, 1), (40, 1), (None, 2)):
        monkeypatch.setattr(_ops, "_runnable_threads", lambda r=running: r)
        _ops._CONTENTION["checked"] = -1.0  # re-read now
        torch.set_num_threads(2)
        assert _ops._threads() == want, (running, want)
    monkeypatch.setattr(_ops, "_ADAPT", False)
    _ops._CONTENTION["checked"] = -1.0
    assert _ops._threads() == 2
    _ops._CONTENTION["busy"] = False


@pytest.mark.parametrize("cls", [SparseLinear, QuantizedSparseLinear])
def test_results_do_not_depend_on_the_team_size_between_forward_and_backward(monkeypatch, cls):
    from qsparseprop import _ops

    torch.set_num_threads(2)
    dense = prune_random_(torch.nn.Linear(96, 80), 0.85, generator_seed=3)
    x, g = torch.randn(33, 96), torch.randn(33, 80)
    results = []
    for forward_threads, backward_threads in ((2, 2), (1, 2), (2, 1), (1, 1)):
        layer = cls.from_dense(dense, seed=5)
        xi = x.clone().requires_grad_()
        monkeypatch.setattr(_ops, "_threads", lambda n=forward_threads: n)
        y = layer(xi)
        monkeypatch.setattr(_ops, "_threads", lambda n=backward_threads: n)
        y.backward(g)
        results.append((y.detach(), xi.grad, layer.values.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def _another_implementation(picked: str) -> str:
    """An implementation other than ``picked`` that runs the same problem:
    the other variant of the JIT tier (Linear's pattern code or not, Conv2d's
    width or batch family); ``picked`` itself where there is none (the
    reference on a CPU without AVX2)."""
    kind, _, variant = picked.rpartition(":")
    if picked.startswith("jit:") and kind.startswith("jit:"):  # jit:<isa>:<variant>
        return {"pattern": kind, "width": kind + ":batch", "batch": kind + ":width"}.get(variant, picked)
    if picked.startswith("jit:"):  # jit:<isa>, the plain Linear kernels
        return picked + ":pattern"
    return picked


@pytest.mark.parametrize("cls", ["SparseConv2d", "SparseLinear"])
def test_a_smaller_team_runs_a_shape_with_the_larger_teams_implementations(cls):
    """A shape that ran on a team runs the same implementations on a smaller
    one (one thread while other processes keep every core busy, or
    torch.set_num_threads), so its f32 results stay the same to the bit: two
    implementations' sums differ in rounding, and the tuner, timing each
    team size apart, may pick others (on a loaded machine it did). The
    larger team's picks are forced to differ from what the smaller would
    pick. A larger team than any before is tuned for."""
    torch.manual_seed(0)

    def layer():
        if cls == "SparseConv2d":
            dense = prune_random_(torch.nn.Conv2d(16, 24, 3, padding=1), 0.8, generator_seed=1)
            return qsparseprop.SparseConv2d.from_dense(dense)
        return SparseLinear.from_dense(prune_random_(torch.nn.Linear(96, 80), 0.8, generator_seed=1))

    if cls == "SparseConv2d":
        x, g = torch.randn(5, 16, 13, 11), torch.randn(5, 24, 13, 11)
    else:
        x, g = torch.randn(33, 96), torch.randn(33, 80)
    shape = list(x.shape) if cls == "SparseConv2d" else x.shape[0]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    usual = layer()._kernel().implementations(shape, 1).split("/")  # what team 1 picks
    others = [_another_implementation(p) for p in usual]
    if cls == "SparseLinear":
        others[2] = usual[2]  # f32 backward-weights has one JIT kernel per tier
    model, results, picks = layer(), [], []
    try:
        for threads, forced in ((2, others), (1, ["", "", ""])):
            _C._force_implementations_for_testing(*forced)
            torch.set_num_threads(threads)
            model.values.grad = None
            xi = x.clone().requires_grad_()
            y = model(xi)
            y.backward(g)
            results.append((y.detach(), xi.grad, model.values.grad.clone()))
            picks.append(model._kernel().implementations(shape, threads))
    finally:
        _C._force_implementations_for_testing("", "", "")
        torch.set_num_threads(before)
    assert picks[0] == "/".join(others), (picks, usual)
    assert picks[1] == picks[0], f"team 1 picked {picks[1]}, team 2 ran {picks[0]}"
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    torch.set_num_threads(3)
    try:  # a larger team is tuned for (here: picks as usual, not the forced ones)
        assert model._kernel().implementations(shape, 3) == layer()._kernel().implementations(shape, 3)
    finally:
        torch.set_num_threads(before)
