"""The main job: `qsparseprop finetune --quick` end to end, and its
DistributedDataParallel path keeping ranks identical."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from qsparseprop import SparseConv2d, SparseLinear, finetune, warmup

FIELDS = {
    "variant", "epoch_s", "speedup_vs_fp32", "speedup_vs_best_dense", "memory_mib", "memory_vs_dense", "accuracy",
    "accuracy_vs_dense", "first_loss", "losses", "accuracy_curve", "wall_curve", "sparse_share", "swapped_layers",
    "pruned_weights_zero", "step_ms", "saved", "speedup_vs_best_eager_dense", "diverged_epoch",
}  # fmt: skip


def test_fashion_mnist_loads_with_its_idx_reader():
    xtr, ytr, xte, yte = finetune.load_dataset("fashion-mnist")
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert ytr.unique().tolist() == list(range(10)) and 0.0 <= xtr.min() and xtr.max() <= 1.0


def test_a_missing_data_set_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        finetune.load_dataset("fashion-mnist", str(tmp_path))


def test_quick_run_reports_every_field_trains_and_keeps_pruned_weights_zero(tmp_path, capsys):
    report = finetune.main(
        ["--quick", "--no-progress", "--out", str(tmp_path), "--json", str(tmp_path / "r.json"),
         "--png", str(tmp_path / "c.png")]
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["variants"] == json.loads(json.dumps(report["variants"]))
    names = [r["variant"] for r in report["variants"]]
    # bf16 autocast only where the CPU computes bf16 (emulated it is ~60x slower)
    native = finetune.machine()["bf16_native"]
    eager = ["dense fp32", "dense bf16 autocast"] if native else ["dense fp32"]
    # each also under torch.compile: a user's best dense may be compiled
    dense = [*eager, *(f"{n} compiled" for n in eager)]
    assert names == [*dense, "qsparseprop f32", "qsparseprop int8"]
    said = said_first = capsys.readouterr().out
    if not native:
        assert set(report["skipped"]) == {"dense bf16 autocast"}
        assert "dense bf16 autocast: skipped: this CPU has no native bf16" in said
        assert "not run: dense bf16 autocast: this CPU has no native bf16" in finetune.format_report(report)
        assert report["best_eager_dense"] == "dense fp32"
        assert report["best_dense"] in ("dense fp32", "dense fp32 compiled")
    # one line per phase and per epoch, without progress bars
    compiles = (f"{n} compiled: compiled (inductor) in " for n in eager)
    for phase in ("dense pre-training: 1 epochs", "pruned ", *compiles, *(f"{n}: epoch 1/1 in " for n in names)):
        assert phase in said, (phase, said)
    for r in report["variants"]:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["losses"][-1] < r["first_loss"], f"{r['variant']}: the loss did not fall"
        assert r["pruned_weights_zero"], r["variant"]
        assert 0.0 < r["accuracy"] <= 1.0 and r["epoch_s"] > 0
    for r in report["variants"][: len(dense)]:
        assert r["step_ms"]["sparse layers"] == 0.0 and r["step_ms"]["dense conv/linear"] > 0.0
    for r in report["variants"][len(dense) :]:
        assert r["swapped_layers"], "some layers must have been swapped"
        assert 0.0 < r["sparse_share"] < 1.0
        assert r["step_ms"]["sparse layers"] > 0.0 and r["step_ms"]["batchnorm"] > 0.0
    assert report["best_dense"] in dense and report["best_eager_dense"] in eager
    fastest = min(dense, key=lambda n: report["variants"][names.index(n)]["epoch_s"])
    assert report["best_dense"] == fastest
    for r in report["variants"]:
        best, best_eager = (
            report["variants"][names.index(report[k])]["epoch_s"] for k in ("best_dense", "best_eager_dense")
        )
        assert r["speedup_vs_best_dense"] == pytest.approx(best / r["epoch_s"])
        assert r["speedup_vs_best_eager_dense"] == pytest.approx(best_eager / r["epoch_s"])
    # a variant whose swap kept every layer dense says so under the table
    assert "kept every layer dense" not in finetune.format_report(report)
    assert "compiled rows: inductor's fused kernels" in finetune.format_report(report)
    report["variants"][-1]["swapped_layers"] = []
    assert "note: qsparseprop int8: no layer measured faster" in finetune.format_report(report)
    assert (tmp_path / "c.png").stat().st_size > 0
    # the dense model is cached: a second run loads it instead of training
    cached = list((tmp_path / "cache").glob("dense_*.pt"))
    assert len(cached) == 1
    cfg = finetune.Config(**report["config"])
    said = []
    data = finetune._subset(finetune.load_dataset(cfg.dataset), cfg)
    model = finetune.pretrained(cfg, data, said.append)
    assert said == [f"dense model: {cached[0]} (cached)"]
    assert finetune.evaluate(model, data[2], data[3], cfg.batch_size) == report["accuracy_dense_unpruned"]
    # each variant's fine-tuned model is saved and loads back, ready to use:
    # the report's accuracy again (the swapped ones rebuilt from their plan)
    assert "fine-tuned models: " in said_first
    for r in on_disk["variants"]:  # (as run: the report's last row was edited above)
        path = r["saved"]
        assert path == str(tmp_path / ("finetuned_" + r["variant"].replace(" ", "_") + ".pt"))
        loaded = finetune.load_finetuned(path)
        assert not loaded.training
        swapped = [n for n, m in loaded.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))]
        assert swapped == r["swapped_layers"]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in r["variant"] else contextlib.nullcontext()
        with ctx:
            accuracy = finetune.evaluate(loaded, data[2], data[3], cfg.batch_size)
        # f32 sums of a kernel picked again may round apart: an image or two
        exact = r["variant"] != "qsparseprop f32"
        assert accuracy == r["accuracy"] if exact else abs(accuracy - r["accuracy"]) <= 2 / len(data[3]), r
    with pytest.raises(ValueError, match="not a model saved by qsparseprop finetune"):
        finetune.load_finetuned(cached[0])
    # and goes to the warm-up tool as it is: its swapped layers' patterns
    int8 = next(r for r in on_disk["variants"] if r["variant"] == "qsparseprop int8")
    warmup.export_main([int8["saved"], "--input-shape", "64,1,28,28", "-o", str(tmp_path / "p.json")])
    patterns = warmup.load_patterns(str(tmp_path / "p.json"))
    assert len(patterns) == len(int8["swapped_layers"]) > 0
    saved = torch.load(on_disk["variants"][-1]["saved"], weights_only=True)
    for edit, says in (
        ({"plan": "swap_plan_s8.json"}, "its 'plan' is missing or not a list or None"),
        ({"width": None}, "its 'width' is missing or not an integer"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
    ):
        torch.save(saved | edit, tmp_path / "edited.pt")
        with pytest.raises(ValueError, match=says):
            finetune.load_finetuned(tmp_path / "edited.pt")


def test_the_variants_epochs_run_in_turn_the_order_rotating(tmp_path, capsys):
    # one variant after the other, the machine's drift over minutes moved the
    # ratio to dense bf16 by a tenth between runs; in turn, it moves them alike
    report = finetune.main(
        ["--quick", "--no-progress", "--epochs", "2", "--train-images", "1024", "--out", str(tmp_path),
         "--no-dense-compile"]
    )  # fmt: skip
    names = [r["variant"] for r in report["variants"]]
    said = capsys.readouterr().out.splitlines()
    done = [line.split(": epoch ")[0] + " " + line.split(": epoch ")[1][:3] for line in said if ": epoch " in line]
    done = [d for d in done if not d.startswith("dense pre-training")]
    rotated = names[1:] + names[:1]
    assert done == [f"{n} 1/2" for n in names] + [f"{n} 2/2" for n in rotated], done
    assert all(len(r["accuracy_curve"]) == 2 for r in report["variants"])


def test_two_ddp_processes_stay_identical(tmp_path):
    report = finetune.main(
        ["--quick", "--no-progress", "--dataset", "digits", "--nproc", "2", "--threads", "1", "--out", str(tmp_path)]
    )
    assert report["world_size"] == 2
    assert report["ranks_identical"] is True
    assert report["skipped"]["dense fp32 compiled"] == finetune.DENSE_COMPILE_DDP
    assert all(r["ranks_identical"] for r in report["variants"])
    assert torch.distributed.is_available()


def test_a_torchrun_job_trains_the_same_on_every_rank(tmp_path):
    """What a multi-machine job runs on each machine, here two processes of
    one torchrun: the env:// rendezvous, rank 0's model, plan and report."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "qsparseprop", "finetune", "--quick", "--no-progress", "--dataset", "digits", "--threads", "1",
         "--out", str(tmp_path), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["world_size"] == 2 and report["ranks_identical"] is True
    assert all(r["ranks_identical"] for r in report["variants"])
    assert out.stdout.count("qsparseprop finetune: ") == 1, "one header, from rank 0"
    assert "processes=2 (torchrun)" in out.stdout


@pytest.mark.parametrize(
    "env,says",
    [({"RANK": "0"}, "RANK set but not WORLD_SIZE"), ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "RANK 3 is not in")],
)  # fmt: skip
def test_a_half_set_torchrun_environment_is_refused(monkeypatch, env, says):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match=says):
        finetune.main(["--quick", "--no-progress"])


@pytest.mark.parametrize(
    "make_args,says",
    [
        (lambda d: ["--json", str(d)], "--json"),  # a directory
        (lambda d: ["--json", str(d / "missing" / "r.json")], "does not exist"),
        (lambda d: ["--png", str(d / "missing" / "c.png")], "does not exist"),
        (lambda d: ["--out", str(d / "file")], "--out"),  # a file where the directory goes
        (lambda d: ["--data-dir", str(d / "nowhere")], "--data-dir"),
        (lambda d: ["--data-dir", str(d)], "Fashion-MNIST not found"),
        # an epoch without a step (a ZeroDivisionError in the learning-rate schedule, after pre-training)
        (lambda d: ["--train-images", "100"], "--train-images 100 is less than one batch (--batch-size 128)"),
        (lambda d: ["--batch-size", "1", "--nproc", "2"], "--batch-size 1 gives some of the 2 processes no images"),
    ],
)
def test_bad_paths_and_bounds_are_refused_before_any_work(tmp_path, capsys, make_args, says):
    """Every output path, the data set and the bounds are checked first: one
    argparse error (exit status 2) naming the flag. They used to fail late:
    --json after the whole run (the report lost), --out and too few
    --train-images after the dense pre-training, a missing --data-dir with
    a traceback."""
    (tmp_path / "file").write_text("x")
    args = ["--quick", "--no-progress", "--out", str(tmp_path / "out"), *make_args(tmp_path)]
    with pytest.raises(SystemExit) as e:
        finetune.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert "Traceback" not in err


def test_unpruned_layers_are_swap_candidates_only_without_an_exact_zero_weight():
    """An unpruned layer swapped gets its nonzeros as its pattern: a weight
    exactly zero would stay zero, so the tool then leaves such layers to
    torch (min_sparsity 0.5)."""
    torch.manual_seed(0)
    model = finetune.make_model("cnn", 28, 8)
    finetune.prune_model(model, 0.9, "layer")
    masks = finetune._masks(model)
    assert "0" not in masks  # the first convolution is not pruned
    assert finetune._no_exact_zeros(model, masks)
    with torch.no_grad():
        model[0].weight[0, 0, 1, 1] = 0.0
    assert not finetune._no_exact_zeros(model, masks)


@pytest.mark.parametrize("method", ["layer", "global"])
def test_an_attentions_projections_are_pruned_as_layers_and_stay_pruned(method):
    """The transformer's attentions: their q/k/v projections (rows of torch's
    in_proj_weight) are pruned as layers of their own, named as the swap
    names the layers it makes of them; every other layer exactly as torch's
    pruning does it; training keeps the pruned rows zero, swapped or not."""
    import copy

    from torch.nn.utils import prune

    from qsparseprop import swap_modules_with_sparse

    torch.manual_seed(0)
    model = finetune.make_model("transformer", 28, 8)
    torch_pruned = copy.deepcopy(model)
    finetune.prune_model(model, 0.9, method)
    names = [n for n, _ in finetune.prunable(model)]
    for i in range(2):
        attention = f"encoder.layers.{i}.self_attn"
        assert [f"{attention}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")] == [
            n for n in names if n.startswith(attention)
        ]
    assert "head" not in names
    weights = dict(finetune.prunable(model))
    if method == "layer":
        for name, w in weights.items():  # each layer to the sparsity on its own
            assert int((w == 0).sum()) == round(0.9 * w.numel()), name
    # torch's own pruning of the same weights, in_proj_weight's rows as three
    # layers in the attention's place (global pruning's ties go by order: the
    # encoder's layers start as copies of one another)
    layers = []
    for n, m in torch_pruned.named_modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            for j in range(3):
                rows = torch.nn.Module()
                e = m.embed_dim
                rows.weight = torch.nn.Parameter(m.in_proj_weight.detach()[j * e : (j + 1) * e].clone())
                layers.append((rows, "weight"))
        elif isinstance(m, torch.nn.Linear) and n != "head":
            layers.append((m, "weight"))
    if method == "layer":
        for m, p in layers:
            prune.l1_unstructured(m, p, amount=0.9)
    else:
        prune.global_unstructured(layers, prune.L1Unstructured, amount=0.9)
    assert [torch.equal(w, m.weight) for w, (m, _) in zip(weights.values(), layers, strict=True)] == [True] * len(
        layers
    )
    masks = finetune._masks(model)
    data = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)), torch.randn(8, 1, 28, 28), torch.zeros(8).long())
    # dense: the tool's masks keep the in_proj rows zero; without them they fill in
    for kept in (masks, None):
        dense = copy.deepcopy(model)
        finetune.train(dense, finetune.Variant("v"), data, 1, 32, 0.1, 0, masks=kept, progress=False, measure=False)
        assert finetune._pruned_weights_zero(dense, masks) == (kept is not None)
    # swapped: every projection a layer of its own, swapped or kept dense
    swapped = swap_modules_with_sparse(
        copy.deepcopy(model), (32, 1, 28, 28), verbose=False, min_sparsity=0.0, min_speedup=0.0,
        persistent=False, repeats=1, mask_kept=False,
    )  # fmt: skip
    sparse = {n for n, m in swapped.named_modules() if isinstance(m, SparseLinear)}
    assert "encoder.layers.0.self_attn.q_proj" in sparse
    kept = {n: m for n, m in masks.items() if finetune._kept_dense(swapped, n)}
    assert set(kept) == set(masks) - sparse
    finetune.train(swapped, finetune.Variant("v"), data, 1, 32, 0.1, 0, masks=kept, progress=False, measure=False)
    assert finetune._pruned_weights_zero(swapped, masks)


def test_every_autograd_function_of_the_library_counts_for_a_part_of_the_step():
    # an op the profiler records under a function's name that no part
    # matches would land in "other" (the paired convolutions once did)
    import torch

    from qsparseprop import _ops, prototype

    functions = [
        cls
        for module in (_ops, prototype)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls.__module__ == module.__name__
    ]
    assert len(functions) >= 10
    for cls in functions:
        for name in (cls.__name__.lower(), cls.__name__.lower() + "backward"):
            assert any(p in name for _, patterns in finetune.STEP_PARTS for p in patterns), name


@pytest.mark.parametrize("scheme", ["f32", "s8"])
def test_the_memory_measure_leaves_the_model_as_it_was(scheme):
    # its training-mode forward is a probe: BatchNorm statistics, the int8
    # layers' rounding steps and the mode are put back (under DDP a rank's
    # own kernels would otherwise leave the ranks unequal)
    from qsparseprop import swap_modules_with_sparse

    torch.manual_seed(0)
    model = finetune.make_model("cnn", 28, 8)
    finetune.prune_model(model, 0.9, "layer")
    model = swap_modules_with_sparse(
        model, (4, 1, 28, 28), verbose=False, scheme=scheme, min_speedup=0.0, persistent=False, repeats=1
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 28, 28)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    model.eval()
    before = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    assert finetune._training_memory(model, opt, x + 1, torch.autocast("cpu", enabled=False)) > 0
    after = list(model.parameters()) + list(model.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not model.training
    # the measure did run a training-mode forward (the statistics it put back moved)
    model.train()
    model(x + 1)
    assert not all(
        torch.equal(a, b) for a, b in zip(before, list(model.parameters()) + list(model.buffers()), strict=True)
    )


def test_a_dense_variant_torch_compile_fails_on_is_skipped_with_the_reason():
    # e.g. a machine without a C++ compiler for inductor: the job goes on
    # without the compiled variant and says why, instead of failing
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # (no graph compiled earlier in this process reused)
    cxx = inductor.cpp.cxx
    model = finetune.make_model("cnn", 28, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    said, skipped = [], {}
    # inductor's own patch (pytest's monkeypatch deletes a config entry at undo)
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        got = finetune._compiled(model, torch.randn(4, 1, 28, 28), None, "dense fp32 compiled", said.append, skipped)
    torch._dynamo.reset()
    assert inductor.cpp.cxx == cxx  # the configuration as it was, for the tests after this one
    assert got is None
    assert skipped["dense fp32 compiled"].startswith("torch.compile failed here (")
    assert said == [f"dense fp32 compiled: skipped: {skipped['dense fp32 compiled']}"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_dense_variant_compiled_into_something_else_is_skipped_with_the_reason(monkeypatch):
    # a stale inductor cache made one compute garbage (loss NaN) and the job
    # called it the best dense: its first output is now checked against the
    # eager model's
    class Miscompiled(torch.nn.Module):  # (stands in for a miscompiled model)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) + 1.0

    monkeypatch.setattr(torch, "compile", Miscompiled)
    model = finetune.make_model("cnn", 28, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    said, skipped = [], {}
    got = finetune._compiled(model, torch.randn(4, 1, 28, 28), None, "dense fp32 compiled", said.append, skipped)
    assert got is None
    assert skipped["dense fp32 compiled"].startswith("its output is not the eager model's (max |difference| 1 ")
    assert said[-1] == f"dense fp32 compiled: skipped: {skipped['dense fp32 compiled']}"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def _variant(name, epoch_s, losses):
    return finetune.Variant(name, epoch_s=[epoch_s] * 2, losses=losses, first_loss=2.3, accuracy=[0.8, 0.85],
                            wall=[epoch_s, 2 * epoch_s], memory_bytes=2**20)  # fmt: skip


def test_a_diverged_variant_is_flagged_and_never_the_best_dense():
    nan = float("nan")
    variants = [
        _variant("dense fp32", 12.0, [0.5, 0.4]),
        _variant("dense bf16 autocast", 7.0, [0.5, 0.4]),
        _variant("dense fp32 compiled", 3.0, [nan, nan]),  # the fastest, and trained nothing
        _variant("dense bf16 autocast compiled", 6.0, [0.5, 0.4]),
        _variant("qsparseprop int8", 4.0, [0.5, float("inf")]),
    ]
    report = finetune._report(finetune.Config(), variants, 0.8, 0.2, 0, 1)
    assert report["best_dense"] == "dense bf16 autocast compiled"
    assert report["best_eager_dense"] == "dense bf16 autocast"
    rows = {r["variant"]: r for r in report["variants"]}
    assert [rows[n]["diverged_epoch"] for n in rows] == [None, None, 1, None, 2]
    assert rows["qsparseprop int8"]["speedup_vs_best_dense"] == pytest.approx(1.5)
    text = finetune.format_report(report)
    assert (
        "diverged: dense fp32 compiled: mean training loss nan in epoch 1 (its first step's 2.3): it trained "
        "nothing usable (so not the best dense)" in text
    )
    assert (
        "diverged: qsparseprop int8: mean training loss inf in epoch 2 (its first step's 2.3): it trained "
        "nothing usable\n" in text
    )
    # every dense one diverged: the fastest is still named, each flagged
    for v in variants[:4]:
        v.losses = [nan, nan]
    report = finetune._report(finetune.Config(), variants, 0.8, 0.2, 0, 1)
    assert (report["best_dense"], report["best_eager_dense"]) == ("dense fp32 compiled", "dense bf16 autocast")
    text = finetune.format_report(report)
    assert text.count("(so not the best dense)") == 3
    # a finite loss that blew up (a learning rate far too high) is divergence too; a rise is not
    variants[0].losses, variants[1].losses = [0.5, 23.1], [0.5, 22.9]
    report = finetune._report(finetune.Config(), variants, 0.8, 0.2, 0, 1)
    assert [r["diverged_epoch"] for r in report["variants"][:2]] == [2, None]
    variants[0].first_loss = 9.0  # 23.1 is under ten times it
    assert finetune._report(finetune.Config(), variants, 0.8, 0.2, 0, 1)["variants"][0]["diverged_epoch"] is None
    assert "(its first step's 2.3): it trained nothing usable (every dense variant did: the ratios are against" in text
