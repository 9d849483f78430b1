"""The benchmark's own arithmetic (its timings are not asserted: speed is
shown by running it, docs/benchmarks.md)."""

import math
import os
import subprocess
import sys

import pytest
import torch

from qsparseprop import bench


def _no_int8_product(*args, **kwargs):
    raise RuntimeError("no int8 product here")


def test_int8_peak_without_a_torch_int8_product_is_the_lane_ratio(monkeypatch):
    monkeypatch.setattr(torch, "_int_mm", _no_int8_product)
    peak = bench.measured_peak_gflops(1)
    ratio = peak["s8"] / peak["f32"]
    assert ratio in (2, 4)
    assert "lane ratio" in peak["s8_from"]
    vnni = bench._C.effective_cpu_isa() == "avx512_core_vnni" or (
        bench._C.effective_cpu_isa() == "avx2" and bench._C.avx_vnni_usable()
    )
    assert ratio == (4 if vnni else 2)


@pytest.mark.parametrize("torch_s8", [1000.0, 150.0])
def test_int8_peak_is_torch_s_product_where_that_is_faster(monkeypatch, torch_s8):
    # the choice, on given rates (timed ones would make the test as noisy as
    # the machine): torch's int8 product where it beats the lane ratio
    monkeypatch.setattr(bench, "_product_rates", lambda: (100.0, torch_s8))
    peak = bench.measured_peak_gflops(1)
    isa = bench._C.effective_cpu_isa()
    ratio = 4 if isa == "avx512_core_vnni" or (isa == "avx2" and bench._C.avx_vnni_usable()) else 2
    if torch_s8 >= ratio * 100.0:
        assert peak["s8_from"] == "torch's int8 product" and peak["s8"] == torch_s8
    else:
        assert "lane ratio" in peak["s8_from"] and peak["s8"] == ratio * 100.0
    assert peak["f32"] == 100.0


@pytest.mark.parametrize("field", ["cpu", "amx", "avx512_vnni", "avx_vnni", "bf16_native"])
def test_machine_reports_plain_values(field):
    # the rows of --json spread machine() into them: plain JSON values only
    assert isinstance(bench.machine()[field], (str, bool))


def test_machine_names_the_family_and_model_behind_a_cut_model_name(tmp_path):
    # a hypervisor's "AMD EPYC" is Zen 3, 4 or 5: the numbers tell which
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
        "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\nmodel name\t: other\n"
    )
    m = bench.machine(str(info))
    assert m["cpu"] == "AMD EPYC (family 26, model 2)"
    assert m["bf16_native"] and not m["amx"]


@pytest.mark.parametrize(
    "cap, bf16, amx",
    [(None, True, True), ("AVX2", False, False), ("avx512_core_vnni", False, False),
     ("AVX512_CORE_BF16", True, False), ("AVX512_CORE_AMX", True, True)],
)  # fmt: skip
def test_machine_says_what_onednns_cap_leaves_torch(tmp_path, monkeypatch, cap, bf16, amx):
    # capped below bf16 (to stand in for a CPU without it) torch emulates
    # bf16 autocast: the benchmarks and the main job must not time it
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    m = bench.machine(str(info))
    assert (m["bf16_native"], m["amx"]) == (bf16, amx)


def test_machine_without_cpuinfo_says_unknown(tmp_path):
    m = bench.machine(str(tmp_path / "missing"))
    assert m["cpu"] == "unknown" and not m["amx"] and not m["bf16_native"]


def test_block_mode_times_the_dense_block_compiled_too():
    # a user's best dense may be compiled: the block mode times it and takes
    # the fastest dense as the best (the eager one's ratio kept beside it)
    row = bench.bench_block_case("B3", 0.9, "f32", repeats=1, warmup=1, dense_compile=True)
    native = bench.bf16_native()
    timed = ["fp32_ms", "fp32_compiled_ms", *(["bf16_ms", "bf16_compiled_ms"] if native else [])]
    assert all(row[k] > 0 for k in ("fused_ms", "unfused_ms", *timed)), row
    if not native:
        assert math.isnan(row["bf16_ms"]) and math.isnan(row["bf16_compiled_ms"])
    dense = [row[k] for k in timed]
    eager = [row[k] for k in timed if "compiled" not in k]
    assert row["fused_vs_best_dense"] == pytest.approx(min(dense) / row["fused_ms"])
    assert row["fused_vs_best_eager_dense"] == pytest.approx(min(eager) / row["fused_ms"])
    line = bench.format_block_rows([row]).splitlines()[-1]
    assert f"{row['fp32_compiled_ms']:.2f}" in line and f"{row['fused_vs_best_eager_dense']:.2f}" in line


def test_a_block_torch_compile_fails_on_is_left_out_saying_so(capsys):
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # (no graph compiled earlier in this process reused)
    cxx = inductor.cpp.cxx
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(4, 8)
    # inductor's own patch (pytest's monkeypatch deletes a config entry at undo)
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        got = bench._compiled_timer("dense_fp32_compiled", torch.compile(dense), dense, x, torch.ones(4, 8), False)
    torch._dynamo.reset()
    assert inductor.cpp.cxx == cxx  # the configuration as it was, for the tests after this one
    assert got is None
    assert "dense_fp32_compiled: not timed, torch.compile failed here (" in capsys.readouterr().out


def test_a_compiled_block_that_computes_something_else_is_left_out_saying_so(capsys):
    # timing a model that computes something else would be a fake result
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(4, 8)

    def other(t):  # (stands in for a miscompiled model)
        return dense(t) + 1.0

    assert bench._compiled_timer("dense_fp32_compiled", other, dense, x, torch.ones(4, 8), False) is None
    assert "dense_fp32_compiled: not timed, its output is not the eager model's" in capsys.readouterr().out
    assert bench._compiled_timer("dense_fp32_compiled", dense, dense, x, torch.ones(4, 8), False) is not None


def test_a_compiled_output_is_checked_within_its_rounding():
    ref = torch.tensor([[3.0, -40.0], [0.5, 2.0]])
    assert bench.compiled_output_problem(ref.clone(), ref, bf16=False) is None
    assert bench.compiled_output_problem(ref + 0.03, ref, bf16=False) is None  # 1e-3 of max |ref| = 0.04
    assert "max |difference| 0.05" in bench.compiled_output_problem(ref + 0.05, ref, bf16=False)
    assert bench.compiled_output_problem(ref + 1.5, ref, bf16=True) is None  # bf16 autocast: 5e-2 of 40
    assert "its output is not" in bench.compiled_output_problem(ref * 1e30, ref, bf16=True)
    nan = ref.clone()
    nan[1, 1] = math.nan
    assert "max |difference| nan" in bench.compiled_output_problem(nan, ref, bf16=False)
    assert "shape (2,)" in bench.compiled_output_problem(ref[0], ref, bf16=False)


def test_inductor_caches_go_off_only_under_an_aten_cap(monkeypatch):
    import torch._functorch.config as aot
    import torch._inductor.config as inductor

    # inductor's own patches put the configuration back for the tests after this one
    with inductor.patch({"fx_graph_cache": True}), aot.patch({"enable_autograd_cache": True}):
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        assert bench.inductor_caches_off_under_aten_cap() is None
        assert inductor.fx_graph_cache and aot.enable_autograd_cache
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
        line = bench.inductor_caches_off_under_aten_cap()
        assert line.startswith("ATEN_CPU_CAPABILITY=avx2: inductor's graph caches are off")
        assert not inductor.fx_graph_cache and not aot.enable_autograd_cache
        assert bench.inductor_caches_off_under_aten_cap() is None  # said once


_CACHED_GRAPH = """
import sys, torch
from qsparseprop import bench
if sys.argv[1] == "guarded":
    print(bench.inductor_caches_off_under_aten_cap())
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
x = torch.randn(4, 3, 16, 16)
out = torch.compile(m)(x)
out.sum().backward()
with torch.no_grad():
    print("difference", float((out - m(x)).abs().max()))
"""


def test_a_graph_inductor_cached_without_the_aten_cap_is_not_reused_under_it(tmp_path):
    # torch 2.13 reused it, built for the capped ISA: on an AVX-512 CPU the
    # capped model's outputs were off by 0.27 here (the main job's CNN: 1e32)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    env.pop("ATEN_CPU_CAPABILITY", None)

    def run(*args, **more):
        out = subprocess.run([sys.executable, "-c", _CACHED_GRAPH, *args], env=dict(env, **more),
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return float(out.split("difference")[-1])

    assert run("plain") < 1e-5  # cached, for the host's vector ISA
    assert run("guarded", ATEN_CPU_CAPABILITY="avx2") < 1e-5


def test_the_command_line_bench_applies_its_isa_cap_and_names_itself():
    # `qsparseprop bench --isa` handed its arguments over, so the bench never
    # re-executed under oneDNN's cap (read once, at first use) and measured
    # uncapped (AMX included on an AMX Xeon), saying nothing
    run = [sys.executable, "-m", "qsparseprop"]
    out = subprocess.run([*run, "bench", "linear", "--isa", "avx512_vnni", "--shapes", "L4", "--sparsities", "0.9",
                          "--schemes", "f32", "--repeats", "1", "--warmup", "0"],
                         capture_output=True, text=True, check=True, timeout=300).stdout  # fmt: skip
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in out.splitlines()[0], out
    for command in ("bench", "memory", "demo"):  # each usage line names its subcommand
        usage = subprocess.run([*run, command, "--help"], capture_output=True, text=True, check=True).stdout
        assert usage.startswith(f"usage: qsparseprop {command} "), usage
