"""The persistent cache from Python (swap timings, tuner decisions) and the
warm-up tool: a cold swap fills it, a warm one decides the same without
timing; damaged entries are ignored; patterns files round-trip and are
validated; warmup tunes every layer, shape and thread count."""

import base64
import json

import pytest
import torch
from torch import nn

import qsparseprop
from qsparseprop import warmup as wu


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "qsp-cache"
    qsparseprop.set_persistent_cache_dir(d)
    qsparseprop._C.clear_tuning_decisions()
    yield d
    qsparseprop.set_persistent_cache_dir("")  # the suite's default: off
    qsparseprop._C.clear_tuning_decisions()


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 32))
    with torch.no_grad():
        for layer in (m[0], m[3]):
            layer.weight[torch.rand_like(layer.weight) < 0.9] = 0
    return m


def test_cold_swap_fills_the_cache_and_a_warm_one_decides_the_same_without_timing(cache_dir, capsys):
    shape = (4, 8, 6, 6)
    cold = qsparseprop.swap_modules_with_sparse(_model(), shape, min_speedup=0.0, repeats=2, verbose=True)
    err = capsys.readouterr().err
    assert "timing 1/2" in err
    info = qsparseprop.persistent_cache_info()
    assert info["enabled"] and info["dir"] == str(cache_dir) and info["entries"] >= 2
    assert (cache_dir.stat().st_mode & 0o777) == 0o700
    warm = qsparseprop.swap_modules_with_sparse(_model(), shape, min_speedup=0.0, repeats=2, verbose=True)
    out = capsys.readouterr()
    assert "timing" not in out.err, "a warm cache times nothing"
    assert "timings from the persistent cache" in out.out  # the table says so
    for a, b in zip(cold.qsparseprop_swap_report, warm.qsparseprop_swap_report, strict=True):
        assert (a.name, a.swapped, a.dense_ms, a.sparse_ms) == (b.name, b.swapped, b.dense_ms, b.sparse_ms)
        assert "persistent cache" in b.reason
    # another input shape is another key: timed again
    qsparseprop.swap_modules_with_sparse(_model(), (2, 8, 6, 6), min_speedup=0.0, repeats=2, verbose=True)
    assert "timing 1/2" in capsys.readouterr().err


def test_persistent_false_and_an_empty_dir_setting_store_nothing(cache_dir):
    qsparseprop.swap_modules_with_sparse(_model(), (4, 8, 6, 6), verbose=False, repeats=1, persistent=False)
    swap_entries = list(cache_dir.glob("swap-*.qspc"))
    assert swap_entries == []
    qsparseprop.set_persistent_cache_dir("")
    info = qsparseprop.persistent_cache_info()
    assert not info["enabled"] and "turned off" in info["reason"]


def test_damaged_entries_are_timed_again_never_trusted(cache_dir, capsys):
    shape = (4, 8, 6, 6)
    qsparseprop.swap_modules_with_sparse(_model(), shape, min_speedup=0.0, repeats=1, verbose=False)
    files = list(cache_dir.glob("swap-*.qspc"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:-3])  # truncated
    raw = bytearray(files[1].read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit flipped
    files[1].write_bytes(bytes(raw))
    qsparseprop.swap_modules_with_sparse(_model(), shape, min_speedup=0.0, repeats=1, verbose=True)
    assert "timing 2/2" in capsys.readouterr().err, "both timed again"
    check = qsparseprop.check_persistent_cache()
    assert check["removed"] == 0 and check["valid"] == qsparseprop.persistent_cache_info()["entries"]


def _swapped(shape=(4, 8, 6, 6)):
    return qsparseprop.swap_modules_with_sparse(_model(), shape, min_speedup=0.0, repeats=1, verbose=False)


def test_patterns_round_trip_and_warmup_tunes_every_layer_shape_and_thread_count(cache_dir, tmp_path):
    model = _swapped()
    path = tmp_path / "patterns.json"
    assert wu.export_patterns(model, path) == 2
    layers = wu.load_patterns(path)
    for entry in layers:
        original = model.get_submodule(entry["name"])
        assert type(entry["layer"]) is type(original)
        assert torch.equal(entry["layer"].row_ptr, original.row_ptr)
        assert torch.equal(entry["layer"].col_idx, original.col_idx)
        assert entry["layer"].extra_repr() == original.extra_repr()
    rows = wu.warmup(path, batches=(2, 4), threads=(1, 2), progress=False)
    assert len(rows) == 2 * 2 * 2
    assert {(r["batch"], r["threads"]) for r in rows} == {(2, 1), (2, 2), (4, 1), (4, 2)}
    assert all(r["implementations"].count("/") == 2 for r in rows)
    if qsparseprop.cpu_isa() != "ref":  # where implementations compete, decisions were stored
        assert list(cache_dir.glob("tuning-*.qspc"))
    table = wu.format_rows(rows)
    assert rows[0]["implementations"] in table and rows[0]["name"] in table


def test_warmup_tunes_each_thread_count_apart(cache_dir, tmp_path):
    """A layer runs a shape at a new thread count with the implementations
    it first ran it with: the tool warms each thread count on its own copy,
    so every (shape, thread count) gets its tuned decision on disk, as a
    fresh process at that thread count would make it."""
    path = tmp_path / "patterns.json"
    wu.export_patterns(_swapped(), path)
    counts = []
    for threads in ((1,), (1, 2)):
        d = tmp_path / f"cache-{len(threads)}"
        qsparseprop.set_persistent_cache_dir(d)
        qsparseprop._C.clear_tuning_decisions()
        wu.warmup(path, batches=(4,), threads=threads, progress=False)
        counts.append(len(list(d.glob("tuning-*.qspc"))))
    if qsparseprop.cpu_isa() != "ref":  # where implementations compete
        assert counts[0] > 0
    assert counts[1] == 2 * counts[0], counts


def test_warmup_in_parallel_processes_leaves_a_valid_cache(cache_dir, tmp_path):
    path = tmp_path / "patterns.json"
    wu.export_patterns(_swapped(), path)
    rows = wu.warmup(path, batches=(3,), threads=(1,), jobs=2, progress=False)
    assert len(rows) == 2
    check = qsparseprop.check_persistent_cache()
    assert check["removed"] == 0


def test_export_needs_shapes_and_probes_without_side_effects(tmp_path):
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    with torch.no_grad():
        m[2].weight[:, :6] = 0
    m[2] = qsparseprop.QuantizedSparseLinear.from_dense(m[2])
    with pytest.raises(ValueError, match="pass input_shape"):
        wu.export_patterns(m, tmp_path / "p.json")
    before = m[1].running_mean.clone()
    assert wu.export_patterns(m, tmp_path / "p.json", input_shape=(5, 8)) == 1
    assert torch.equal(m[1].running_mean, before)
    (entry,) = json.loads((tmp_path / "p.json").read_text())["layers"]
    assert entry["input_shape"] == [5, 8] and entry["cls"] == "QuantizedSparseLinear"


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(format=99), "not a patterns file"),
        (lambda d: d["layers"][0].update(cls="os.system"), "is not one of"),
        (lambda d: d["layers"][0].update(row_ptr=d["layers"][0]["row_ptr"][:-8]), "row_ptr"),
        (lambda d: d["layers"][0].update(col_idx="!!!"), "layer 0"),
        (lambda d: d["layers"][0].update(input_shape=[0, 8, 6, 6]), "input_shape"),
        (lambda d: d["layers"][0].update(rows=-1), "rows must be in"),
        (
            lambda d: d["layers"][0].update(
                col_idx=base64.b64encode(b"\xff\xff\xff\x7f" * d["layers"][0]["nnz"]).decode()
            ),
            "layer 0",
        ),  # column indices out of range: validate_csr refuses them
    ],
)
def test_bad_patterns_files_are_refused_naming_the_layer(tmp_path, change, message):
    path = tmp_path / "patterns.json"
    wu.export_patterns(_swapped(), path)
    _edit(path, change)
    with pytest.raises(ValueError, match=message):
        wu.load_patterns(path)


def test_cli_check_clear_and_errors(cache_dir, tmp_path, capsys):
    path = tmp_path / "patterns.json"
    wu.export_patterns(_swapped(), path)
    wu.main([str(path), "--batch", "2", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "layer shapes warmed" in out and str(cache_dir) in out
    (cache_dir / "swap-0000000000000000.qspc").write_bytes(b"garbage")
    wu.main(["--check"])
    out = capsys.readouterr().out
    assert "removed: " in out and "1 removed" in out
    wu.main(["--clear"])
    assert "entries from" in capsys.readouterr().out
    assert qsparseprop.persistent_cache_info()["entries"] == 0
    with pytest.raises(SystemExit):
        wu.main(["--batch", "0", str(path)])
    assert "integers >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        wu.main([str(tmp_path / "missing.json")])
    qsparseprop.set_persistent_cache_dir("")
    with pytest.raises(SystemExit):
        wu.main(["--check"])
    assert "persistent cache is off" in capsys.readouterr().err


def test_profile_verbose_and_perf_map_in_a_fresh_process(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import os, torch, qsparseprop\n"
        "l = qsparseprop.SparseLinear.from_dense(torch.nn.Linear(64, 32))\n"
        "l(torch.randn(8, 64, requires_grad=True)).sum().backward()\n"
        "print('pid', os.getpid())\n"
    )
    env = dict(os.environ, QSP_VERBOSE="profile", QSP_PERF_MAP="1", QSP_CACHE_DIR="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    execs = [line for line in out.splitlines() if line.startswith("qsp_verbose,exec,")]
    assert len(execs) == 3 and all(",kernel_ms=" in e and ",passes_ms=" in e for e in execs)
    pid = out.split("pid ")[-1].strip()
    perf_map = f"/tmp/perf-{pid}.map"
    try:
        lines = open(perf_map).read().splitlines()
        assert lines and all(len(x.split(" ")) == 3 and x.split(" ")[2].startswith("qsp_jit_") for x in lines)
        int(lines[0].split(" ")[0], 16), int(lines[0].split(" ")[1], 16)  # START SIZE in hex
    finally:
        if os.path.exists(perf_map):
            os.remove(perf_map)


def _cpp_tool():
    import pathlib

    tool = pathlib.Path(__file__).resolve().parents[2] / "build" / "tools" / "qsp-warmup"
    assert tool.exists(), f"{tool} is built by the test command (scripts/setup.sh builds build/)"
    return str(tool)


def test_the_cpp_tool_warms_the_same_cache_and_refuses_bad_files(tmp_path):
    import os
    import subprocess

    path = tmp_path / "patterns.json"
    wu.export_patterns(_swapped(), path)
    cache = tmp_path / "cpp-cache"
    env = dict(os.environ, QSP_CACHE_DIR=str(cache))
    run = [_cpp_tool(), str(path), "--batch", "2,4", "--threads", "1"]
    first = subprocess.run(run, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    rows = [line for line in first.stdout.splitlines() if line.startswith(("0", "3"))]  # layer names "0", "3"
    assert len(rows) == 2 * 2, first.stdout
    assert "layer shapes warmed" in first.stdout and str(cache) in first.stdout
    if qsparseprop.cpu_isa() != "ref":
        assert any(" tuned " in r for r in rows)  # where implementations compete, measured once...
        second = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
        again = [line for line in second.stdout.splitlines() if line.startswith(("0", "3"))]
        assert not any(" tuned " in r for r in again)  # ...and read back by the next process
        assert [r.split()[-1] for r in rows] == [r.split()[-1] for r in again]  # same implementations
    check = subprocess.run([_cpp_tool(), "--check"], env=env, capture_output=True, text=True, check=True)
    assert " 0 removed" in check.stdout
    _edit(path, lambda d: d["layers"][1].update(col_idx=d["layers"][1]["col_idx"][:-4]))
    bad = subprocess.run(run, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "layer 1 (3)" in bad.stderr and "col_idx" in bad.stderr
    off = subprocess.run(
        [_cpp_tool(), "--clear"], env=dict(os.environ, QSP_CACHE_DIR=""), capture_output=True, text=True
    )
    assert off.returncode == 2 and "persistent cache is off" in off.stderr


def test_export_patterns_cli(tmp_path, capsys):
    model = _swapped()
    torch.save(model, tmp_path / "model.pt")
    wu.export_main([str(tmp_path / "model.pt"), "--input-shape", "4,8,6,6", "-o", str(tmp_path / "p.json")])
    assert "2 sparse layers written" in capsys.readouterr().out
    assert len(wu.load_patterns(tmp_path / "p.json")) == 2
    torch.save(model.state_dict(), tmp_path / "state.pt")
    for bad, says in ((tmp_path / "missing.pt", "cannot read"), (tmp_path / "state.pt", "not a torch.nn.Module"),
                      (tmp_path / "p.json", "not a model saved")):  # fmt: skip
        with pytest.raises(SystemExit):
            wu.export_main([str(bad), "--input-shape", "4,8,6,6", "-o", str(tmp_path / "q.json")])
        assert says in capsys.readouterr().err


def test_unreadable_inputs_and_bounds_are_refused_before_any_work(tmp_path, capsys):
    """A directory, /dev/zero, JSON nested past the recursion limit, a thread
    count beyond the machine, an output into a missing folder: one clear line
    and exit status 2, before any model is loaded or layer built (they used
    to raise RecursionError / MemoryError, or fail after loading the model)."""
    import os
    import subprocess

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    bad_files = [(tmp_path, "is a directory"), (deep, "nested too deeply")]
    if os.path.exists("/dev/zero"):
        bad_files.append(("/dev/zero", "not a regular file"))
    for path, says in bad_files:
        with pytest.raises(ValueError, match=says):
            wu.load_patterns(path)
        with pytest.raises(SystemExit) as e:
            wu.main([str(path), "--no-progress"])
        assert e.value.code == 2 and says in capsys.readouterr().err
    good = tmp_path / "patterns.json"
    wu.export_patterns(_swapped(), good)
    with pytest.raises(SystemExit) as e:
        wu.main([str(good), "--threads", str(qsparseprop._C.max_num_threads() + 1)])
    assert e.value.code == 2 and "--threads: integers <=" in capsys.readouterr().err
    # export-patterns checks -o before it loads the model (here: a model file
    # that does not exist, so a late check would complain about the model)
    with pytest.raises(SystemExit) as e:
        wu.export_main([str(tmp_path / "no-model.pt"), "--input-shape", "4,8,6,6", "-o", str(tmp_path / "x" / "a")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        wu.export_main([str(tmp_path / "no-model.pt"), "--input-shape", "4,8,6,6", "-o", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err
    # the C++ tool: the same refusals, no abort or segfault
    cases = [([str(tmp_path)], "not a regular file"), ([str(deep)], str(deep)),
             ([str(good), "--threads", "70000"], "--threads")]  # fmt: skip
    if os.path.exists("/dev/zero"):
        cases.append((["/dev/zero"], "not a regular file"))
    for args, says in cases:
        r = subprocess.run([_cpp_tool(), *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr, (args, r.returncode, r.stderr)


def _set(layer: int, key: str, value, in_config: bool = False):
    def change(d):
        (d["layers"][layer]["config"] if in_config else d["layers"][layer])[key] = value

    return change


# Hostile variants of a patterns file (layer 0: a Conv2d, layer 1: a Linear);
# the Python reader used to accept eight kinds that qsp-warmup refused
# (floats truncated to integers, strings or numbers taken for booleans), and
# neither bounded the memory an input shape implies.
_HOSTILE = {
    "format true": lambda d: d.update(format=True),
    "format 1.0": lambda d: d.update(format=1.0),
    "rows float": _set(1, "rows", 32.7),
    "nnz float": _set(1, "nnz", 1828.0),
    "rows bool": _set(1, "rows", True),
    "bias string": _set(1, "bias", "yes", True),
    "bias number": _set(1, "bias", 1, True),
    "fused_relu string": _set(0, "fused_relu", "yes", True),
    "in_features float": _set(1, "in_features", 576.0, True),
    "input_shape float": _set(1, "input_shape", [4.0, 576]),
    "kernel_size floats": _set(0, "kernel_size", [3.0, 3.0], True),
    "groups bool": _set(0, "groups", True, True),
    "stride bool": _set(0, "stride", [True, 1], True),
    "padding negative": _set(0, "padding", [-1, 1], True),
    "padding word": _set(0, "padding", "full", True),
    "vectorizing_over_on string": _set(0, "vectorizing_over_on", "yes", True),
    "name number": _set(1, "name", 5),
    "huge Linear input": _set(1, "input_shape", [10_000_000, 576]),
    "huge Conv2d output": _set(0, "padding", [50_000, 50_000], True),  # a tiny input, a 10^11 output
    "huge Conv2d batch": _set(0, "input_shape", [10_000_000, 8, 6, 6]),
    "layer not an object": lambda d: d["layers"].__setitem__(0, [1, 2]),
}


@pytest.mark.parametrize("kind", sorted(_HOSTILE))
def test_both_readers_refuse_the_same_hostile_patterns_files(tmp_path, kind):
    """One rule set: the Python reader and qsp-warmup (--validate: the C++
    reader alone) refuse the same files, each naming the layer."""
    import subprocess

    path = tmp_path / "patterns.json"
    if not hasattr(test_both_readers_refuse_the_same_hostile_patterns_files, "exported"):
        wu.export_patterns(_swapped(), tmp_path / "base.json")
        test_both_readers_refuse_the_same_hostile_patterns_files.exported = (tmp_path / "base.json").read_text()
    path.write_text(test_both_readers_refuse_the_same_hostile_patterns_files.exported)
    base = subprocess.run([_cpp_tool(), "--validate", str(path)], capture_output=True, text=True)
    assert base.returncode == 0, base.stderr  # the unchanged file is valid to both
    _edit(path, _HOSTILE[kind])
    with pytest.raises(ValueError):
        wu.load_patterns(path)
    cpp = subprocess.run([_cpp_tool(), "--validate", str(path)], capture_output=True, text=True)
    assert cpp.returncode == 2 and "Traceback" not in cpp.stderr, (kind, cpp.returncode, cpp.stdout, cpp.stderr)
