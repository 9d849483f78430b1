"""The benchmark's own arithmetic (its timings are not asserted: speed is
shown by running it, docs/benchmarks.md)."""

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
        bench._C.effective_cpu_isa() == "avx2" and bench.machine()["avx_vnni"]
    )
    assert ratio == (4 if vnni else 2)


def test_int8_peak_is_torch_s_product_where_that_is_faster(monkeypatch):
    # an int8 product that returns at once: far over what the lanes give
    def fast_int8(a, b):
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32)

    monkeypatch.setattr(torch, "_int_mm", fast_int8)
    peak = bench.measured_peak_gflops(1)
    assert peak["s8_from"] == "torch's int8 product"
    assert peak["s8"] >= 4 * peak["f32"]


@pytest.mark.parametrize("field", ["cpu", "amx", "avx512_vnni", "avx_vnni", "bf16_native"])
def test_machine_reports_plain_values(field):
    # the rows of --json spread machine() into them: plain JSON values only
    assert isinstance(bench.machine()[field], (str, bool))
