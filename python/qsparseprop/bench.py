"""Layer benchmark: ours vs dense PyTorch, interleaved in one process.

    python -m qsparseprop.bench linear                       # L1-L4 x {0.8,0.9,0.95,0.98} x {f32,s8}
    python -m qsparseprop.bench linear --shapes L1 --sparsities 0.9 --repeats 20
    python -m qsparseprop.bench conv                         # C1-C4, S2, P1, DW, STEM x sparsities x schemes
    python -m qsparseprop.bench block                        # fused blocks: B1, B3 (ResNet BasicBlock), MLP, GMLP
    python -m qsparseprop.bench conv --isa avx512_vnni       # both ISAs capped: a CPU without AMX
                                                             # (oneDNN at AVX512_CORE_BF16: VNNI and BF16,
                                                             # as on a Zen 4; AVX512_CORE_VNNI would also
                                                             # drop BF16 and make dense bf16 crawl)

For each case it times forward and backward (input + parameter gradients) of
our layer, the dense torch layer (``nn.Linear`` / ``nn.Conv2d``) in fp32 and
under ``torch.autocast("cpu", dtype=torch.bfloat16)``, and for Linear
``torch.sparse.mm`` with a CSR weight (forward only), interleaving them round
by round, and reports medians and the ratios measured in this run, with the
useful GFLOP/s (multiply-adds at the nonzeros, three directions) as a share
of the peak measured at start (dense fp32 / int8 matrix products in torch).
``block`` times whole blocks instead: a ResNet BasicBlock (conv-BN-ReLU-
conv-BN, identity shortcut, add, ReLU) at C1 / C3 sizes and a transformer
MLP (Linear-ReLU-Linear; GMLP: with a GELU), fused (``qsparseprop.fuse``: the BatchNorms and
ReLUs applied by the sparse layers) against the same swapped layers
unfused (torch's BatchNorm, ``MaskedReLU``) and the dense block.
Machines are noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import warnings

import torch

from . import _C, QuantizedSparseConv2d, QuantizedSparseLinear, SparseConv2d, SparseLinear

LINEAR_SHAPES = {  # name: (batch, in_features, out_features)
    "L1": (256, 768, 3072),
    "L2": (256, 3072, 768),
    "L3": (128, 4096, 4096),
    "L4": (64, 512, 1000),
}

# name: (batch, in_channels, out_channels, image, kernel, stride, padding, groups)
CONV_SHAPES = {
    "C1": (32, 64, 64, 56, 3, 1, 1, 1),
    "C2": (32, 128, 128, 28, 3, 1, 1, 1),
    "C3": (32, 256, 256, 14, 3, 1, 1, 1),
    "C4": (32, 512, 512, 7, 3, 1, 1, 1),
    "S2": (32, 128, 256, 28, 3, 2, 1, 1),  # a ResNet downsampling 3x3, stride 2
    "P1": (32, 256, 256, 14, 1, 1, 0, 1),  # pointwise
    "DW": (32, 256, 256, 28, 3, 1, 1, 256),  # depthwise
    "STEM": (8, 3, 64, 224, 7, 2, 3, 1),  # the ResNet stem
}


def _product_rates() -> tuple[float, float]:
    """GFLOP/s of torch's fp32 product and of its int8 product (0 where
    torch has none) on 1024 x 1024 operands, now."""
    n, reps = 1024, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    f32 = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    try:
        ai, bi = torch.randint(-127, 127, (n, n), dtype=torch.int8), torch.randint(-127, 127, (n, n), dtype=torch.int8)
        torch._int_mm(ai, bi)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch._int_mm(ai, bi)
        return f32, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    except (RuntimeError, AttributeError):
        return f32, 0.0  # no int8 product in this torch


def measured_peak_gflops(threads: int) -> dict:
    """What this machine does on dense matrix products right now: the
    denominators of %peak. fp32: torch's product. int8: the larger of
    torch's int8 product and fp32 times the lane ratio of the instruction our
    int8 kernels use on this CPU (VNNI's dot product: 4 products per 32-bit
    lane; without VNNI, 16-bit pairs: 2) — on CPUs where torch has no fast
    int8 product (AVX2) its rate is far below what the vector units do, and
    a %peak over it would exceed 100. ``s8_from`` says which one it is."""
    out = {}
    out["f32"], torch_s8 = _product_rates()
    isa = _C.effective_cpu_isa()
    vnni = isa == "avx512_core_vnni" or (isa == "avx2" and _C.avx_vnni_usable())
    ratio = 4 if vnni else 2
    if torch_s8 >= ratio * out["f32"]:
        out["s8"], out["s8_from"] = torch_s8, "torch's int8 product"
    else:
        out["s8"] = ratio * out["f32"]
        lanes = "VNNI" if vnni else "16-bit pair"
        out["s8_from"] = f"{ratio} x fp32, the {lanes} lane ratio; torch's int8 product {torch_s8:.0f}"
    return out


def _random_pruned_linear(k: int, n: int, sparsity: float, seed: int) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) >= sparsity)
    return lin


class _Timer:
    """Forward and backward times of one variant, one sample per round."""

    def __init__(self, name, forward, backward_needed=True):
        self.name, self.forward, self.backward_needed = name, forward, backward_needed
        self.fwd, self.bwd = [], []

    def run_once(self, x, g):
        xg = x.detach().requires_grad_(self.backward_needed)
        t0 = time.perf_counter()
        y = self.forward(xg)
        t1 = time.perf_counter()
        if self.backward_needed:
            y.backward(g)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def sample(self, x, g, record: bool, reset=None):
        """One timed run, right after an untimed run of the same variant.
        Without it a sample followed another variant's run, and what runs
        right after dense bf16 (AMX) code is slower (an MLP block, 90 %
        f32: 12.0 ms right after it, 10.8 ms right after a sparse run)."""
        for _ in range(2):
            if reset:
                reset()
            f, b = self.run_once(x, g)
        if record:
            self.fwd.append(f)
            self.bwd.append(b)

    def medians(self):
        f, b = statistics.median(self.fwd), statistics.median(self.bwd)
        tot = statistics.median([a + c for a, c in zip(self.fwd, self.bwd, strict=True)])
        return f, b, tot


def bench_linear_case(name, batch, k, n, sparsity, scheme, repeats, warmup, peak, seed=0) -> dict:
    dense = _random_pruned_linear(k, n, sparsity, seed)
    cls = QuantizedSparseLinear if scheme == "s8" else SparseLinear
    ours = cls.from_dense(dense, seed=seed)
    with warnings.catch_warnings():  # "sparse CSR support is in beta" is torch's, not ours
        warnings.simplefilter("ignore", UserWarning)
        w_csr = dense.weight.detach().to_sparse_csr()

    def dense_bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return dense(x)

    timers = [
        _Timer("ours", ours),
        _Timer("dense_fp32", dense),
        *([_Timer("dense_bf16", dense_bf16)] if bf16_native() else []),
        _Timer("torch_csr_fwd", lambda x: torch.sparse.mm(w_csr, x.t()).t(), backward_needed=False),
    ]
    x = torch.randn(batch, k)
    g = torch.randn(batch, n)
    split = _run_rounds(timers, ours, dense, x, g, warmup, repeats)
    res = {t.name: t.medians() for t in timers}
    res.setdefault("dense_bf16", (math.nan,) * 3)  # not timed: torch emulates bf16 on this CPU
    of, ob, ot = res["ours"]

    impls = ours._kernel().implementations(batch, torch.get_num_threads())
    useful_flop = 3 * 2 * batch * ours.nnz  # fwd + bwd-data + bwd-weights at the nonzeros
    gflops = useful_flop / (ot * 1e-3) / 1e9
    return dict(
        shape=name, batch=batch, in_features=k, out_features=n, sparsity=sparsity, scheme=scheme,
        threads=torch.get_num_threads(), isa=_C.effective_cpu_isa(), impl=impls,
        ours_fwd_ms=of, ours_bwd_ms=ob, ours_total_ms=ot,
        fp32_fwd_ms=res["dense_fp32"][0], fp32_total_ms=res["dense_fp32"][2],
        bf16_fwd_ms=res["dense_bf16"][0], bf16_total_ms=res["dense_bf16"][2],
        csr_fwd_ms=res["torch_csr_fwd"][0],
        speedup_vs_fp32=res["dense_fp32"][2] / ot, speedup_vs_bf16=res["dense_bf16"][2] / ot,
        fwd_speedup_vs_csr=res["torch_csr_fwd"][0] / of,
        useful_gflops=gflops, peak_gflops=peak[scheme], pct_peak=100.0 * gflops / peak[scheme],
        **_split_fields(split, useful_flop / 3, peak[scheme]),
        repeats=repeats, **machine(),
    )  # fmt: skip


_DIRECTIONS = ("forward", "backward_data", "backward_weights")


def _round_order(timers: list, r: int) -> list:
    """Round r's order of the variants: a permutation seeded by r. A
    rotation put the same variant after dense bf16 in most rounds, and on an
    AMX CPU what runs after bf16 code is a few percent slower even after a
    warm-up run of its own (an MLP block: 3 %)."""
    order = list(timers)
    random.Random(r).shuffle(order)
    return order


def _zero_grads(*modules) -> None:
    for m in modules:
        m.zero_grad(set_to_none=True)


def _run_rounds(timers, ours, dense, x, g, warmup, repeats) -> dict:
    """Interleaved rounds (a seeded permutation per round); our
    executions are profiled in the recorded rounds. Returns, per direction,
    our mean kernel and pass time per call."""
    was = _C.profiling()
    _C.set_profiling(True)
    try:
        for r in range(warmup + repeats):
            if r == warmup:
                _C.clear_profile()
            order = _round_order(timers, r)
            for t in order:
                t.sample(x, g, record=r >= warmup, reset=lambda: _zero_grads(ours, dense))
        split = {}
        for e in _C.profile_info():
            calls = max(e["calls"], 1)
            split[e["direction"]] = (e["kernel_ms"] / calls, (e["total_ms"] - e["kernel_ms"]) / calls)
        return split
    finally:
        _C.set_profiling(was)


def _split_fields(split: dict, useful_flop_per_direction: float, peak: float) -> dict:
    out = {}
    for d in _DIRECTIONS:
        k, p = split.get(d, (0.0, 0.0))
        out[f"{d}_kernel_ms"] = k
        out[f"{d}_pass_ms"] = p
        out[f"{d}_kernel_pct_peak"] = 100.0 * useful_flop_per_direction / (k * 1e-3) / 1e9 / peak if k > 0 else 0.0
    return out


def format_split(rows: list[dict]) -> str:
    """Per direction: kernel ms | passes ms | kernel % of peak."""
    head = f"{'shape':<5} {'sp':>5} {'sch':<4}" + "".join(f"  {d[:13]:>13}: kern  pass  %pk" for d in _DIRECTIONS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(
            f"  {'':>13}  {r[f'{d}_kernel_ms']:>5.2f} {r[f'{d}_pass_ms']:>5.2f} {r[f'{d}_kernel_pct_peak']:>4.0f}"
            for d in _DIRECTIONS
        )
        lines.append(f"{r['shape']:<5} {r['sparsity']:>5.2f} {r['scheme']:<4}{cells}")
    return "\n".join(lines)


def _random_pruned_conv(c_in, c_out, k, stride, pad, groups, sparsity, seed) -> torch.nn.Conv2d:
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, groups=groups)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=g) >= sparsity)
    return conv


def bench_conv_case(name, shape, sparsity, scheme, repeats, warmup, peak, vectorization=None, seed=0) -> dict:
    batch, c_in, c_out, hw, k, stride, pad, groups = shape
    dense = _random_pruned_conv(c_in, c_out, k, stride, pad, groups, sparsity, seed)
    cls = QuantizedSparseConv2d if scheme == "s8" else SparseConv2d
    ours = cls.from_dense(dense, vectorizing_over_on=vectorization, seed=seed)

    def dense_bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return dense(x)

    timers = [_Timer("ours", ours), _Timer("dense_fp32", dense)]
    if bf16_native():
        timers.append(_Timer("dense_bf16", dense_bf16))
    x = torch.randn(batch, c_in, hw, hw)
    out_hw = (hw + 2 * pad - k) // stride + 1
    g = torch.randn(batch, c_out, out_hw, out_hw)
    split = _run_rounds(timers, ours, dense, x, g, warmup, repeats)
    res = {t.name: t.medians() for t in timers}
    res.setdefault("dense_bf16", (math.nan,) * 3)  # not timed: torch emulates bf16 on this CPU
    of, ob, ot = res["ours"]

    impls = ours._kernel().implementations(list(x.shape), torch.get_num_threads())
    useful_flop = 3 * 2 * batch * out_hw * out_hw * ours.nnz
    gflops = useful_flop / (ot * 1e-3) / 1e9
    return dict(
        shape=name, batch=batch, in_channels=c_in, out_channels=c_out, image=hw, kernel=k, stride=stride,
        padding=pad, groups=groups, sparsity=sparsity, scheme=scheme, vectorizing_over_on=vectorization,
        threads=torch.get_num_threads(), isa=_C.effective_cpu_isa(), impl=impls,
        ours_fwd_ms=of, ours_bwd_ms=ob, ours_total_ms=ot,
        fp32_fwd_ms=res["dense_fp32"][0], fp32_total_ms=res["dense_fp32"][2],
        bf16_fwd_ms=res["dense_bf16"][0], bf16_total_ms=res["dense_bf16"][2],
        speedup_vs_fp32=res["dense_fp32"][2] / ot, speedup_vs_bf16=res["dense_bf16"][2] / ot,
        useful_gflops=gflops, peak_gflops=peak[scheme], pct_peak=100.0 * gflops / peak[scheme],
        **_split_fields(split, useful_flop / 3, peak[scheme]),
        repeats=repeats, **machine(),
    )  # fmt: skip


# name: (batch, channels, image) of a BasicBlock; (tokens, width, hidden) of the MLPs
BLOCK_SHAPES = {"B1": (32, 64, 56), "B3": (32, 256, 14), "MLP": (256, 768, 3072), "GMLP": (256, 768, 3072)}
_MLPS = {"MLP": torch.nn.ReLU, "GMLP": torch.nn.GELU}  # the activation between the two Linears


def _block_models(name: str, sparsity: float, scheme: str, seed: int):
    """(dense, unfused, fused) versions of block `name`, the same weights."""
    import copy

    from .finetune import _Residual
    from .swap import _sparse_class, fuse, use_masked_relus

    torch.manual_seed(seed)
    _, width, hidden = BLOCK_SHAPES[name]
    if name in _MLPS:
        dense = torch.nn.Sequential(torch.nn.Linear(width, hidden), _MLPS[name](), torch.nn.Linear(hidden, width))
    else:
        dense = _Residual(width, width, 1)
    gen = torch.Generator().manual_seed(seed)
    for m in dense.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            with torch.no_grad():
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) >= sparsity)
    unfused = copy.deepcopy(dense)
    for parent in unfused.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                setattr(parent, child_name, _sparse_class(child, scheme).from_dense(child, seed=seed))
    use_masked_relus(unfused)  # unfused at its best: the ReLUs keep bits, as the main job's do
    fused = fuse(copy.deepcopy(unfused))
    return dense, unfused, fused


def _autocast_bf16(module):
    def run(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(t)

    return run


def _compiled_timer(name: str, forward, eager, x, g, bf16: bool):
    """A timer of a torch.compile'd dense forward, compiled here (its first
    forward and backward, untimed), or None where torch.compile fails on this
    machine or its output is not the eager forward's (it says why)."""
    try:
        out = forward(x.detach().requires_grad_())
        out.backward(g)
    except Exception as e:  # inductor's errors have no common base
        print(f"{name}: not timed, torch.compile failed here ({type(e).__name__})", flush=True)
        return None
    with torch.no_grad():
        why = compiled_output_problem(out, eager(x), bf16)
    if why:
        print(f"{name}: not timed, {why}", flush=True)
        return None
    return _Timer(name, forward)


def bench_block_case(name, sparsity, scheme, repeats, warmup, dense_compile=False) -> dict:
    """Fused vs unfused vs dense fp32 / bf16 autocast (where native) and,
    with dense_compile, the dense ones under torch.compile: a user's best
    dense may be compiled."""
    dense, unfused, fused = _block_models(name, sparsity, scheme, 0)
    batch, width, size = BLOCK_SHAPES[name]
    x = torch.randn(batch, width) if name in _MLPS else torch.randn(batch, width, size, size)
    g = torch.randn_like(dense(x))
    timers = [_Timer("fused", fused), _Timer("unfused", unfused), _Timer("dense_fp32", dense)]
    if bf16_native():
        timers.append(_Timer("dense_bf16", _autocast_bf16(dense)))
    if dense_compile:
        compiled = torch.compile(dense)  # (dense's parameters)
        wanted = [("dense_fp32_compiled", compiled, dense, False)]
        if bf16_native():
            wanted.append(("dense_bf16_compiled", _autocast_bf16(compiled), _autocast_bf16(dense), True))
        timers += [t for t in (_compiled_timer(n, f, e, x, g, b) for n, f, e, b in wanted) if t is not None]
        _zero_grads(dense)
    for r in range(warmup + repeats):
        for t in _round_order(timers, r):
            t.sample(x, g, record=r >= warmup, reset=lambda: _zero_grads(fused, unfused, dense))
    res = {t.name: t.medians()[2] for t in timers}
    for k in ("dense_bf16", "dense_fp32_compiled", "dense_bf16_compiled"):
        res.setdefault(k, math.nan)  # not timed: emulated bf16 on this CPU, or not compiled
    eager = [res["dense_fp32"], res["dense_bf16"]]
    best_eager = min(v for v in eager if not math.isnan(v))
    best = min(v for v in (*eager, res["dense_fp32_compiled"], res["dense_bf16_compiled"]) if not math.isnan(v))
    return dict(
        shape=name, sparsity=sparsity, scheme=scheme, threads=torch.get_num_threads(),
        isa=_C.effective_cpu_isa(), fused_ms=res["fused"], unfused_ms=res["unfused"],
        fp32_ms=res["dense_fp32"], bf16_ms=res["dense_bf16"], fp32_compiled_ms=res["dense_fp32_compiled"],
        bf16_compiled_ms=res["dense_bf16_compiled"],
        fused_vs_unfused=res["unfused"] / res["fused"], fused_vs_fp32=res["dense_fp32"] / res["fused"],
        fused_vs_best_eager_dense=best_eager / res["fused"], fused_vs_best_dense=best / res["fused"],
        repeats=repeats, **machine(),
    )  # fmt: skip


def format_block_rows(rows: list[dict]) -> str:
    head = (
        f"{'block':<5} {'sp':>5} {'sch':<4} {'fused':>8} {'unfused':>8} {'fp32':>8} {'bf16':>8} {'fp32 c':>8} "
        f"{'bf16 c':>8} {'x unfused':>9} {'x fp32':>7} {'x eager':>7} {'x best':>7}   (ms per forward+backward; "
        "c = torch.compile'd; x = speedup of fused; eager: the best dense not compiled)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        nan = math.nan
        lines.append(
            f"{r['shape']:<5} {r['sparsity']:>5.2f} {r['scheme']:<4} {r['fused_ms']:>8.2f} {r['unfused_ms']:>8.2f} "
            f"{r['fp32_ms']:>8.2f} {r['bf16_ms']:>8.2f} {r.get('fp32_compiled_ms', nan):>8.2f} "
            f"{r.get('bf16_compiled_ms', nan):>8.2f} {r['fused_vs_unfused']:>9.2f} {r['fused_vs_fp32']:>7.2f} "
            f"{r.get('fused_vs_best_eager_dense', r['fused_vs_best_dense']):>7.2f} {r['fused_vs_best_dense']:>7.2f}"
        )
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'shape':<5} {'sp':>5} {'sch':<4} {'fwd ms':>8} {'bwd ms':>8} {'total':>8} {'fp32':>8} {'bf16':>8} "
        f"{'x fp32':>7} {'x bf16':>7} {'x csr':>6} {'GF/s':>6} {'%pk':>5}  impl (fwd/bwd-data/bwd-weights)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['shape']:<5} {r['sparsity']:>5.2f} {r['scheme']:<4} {r['ours_fwd_ms']:>8.3f} {r['ours_bwd_ms']:>8.3f} "
            f"{r['ours_total_ms']:>8.3f} {r['fp32_total_ms']:>8.3f} {r['bf16_total_ms']:>8.3f} "
            f"{r['speedup_vs_fp32']:>7.2f} {r['speedup_vs_bf16']:>7.2f} "
            f"{r['fwd_speedup_vs_csr'] if 'fwd_speedup_vs_csr' in r else float('nan'):>6.2f} "
            f"{r['useful_gflops']:>6.1f} {r['pct_peak']:>5.1f}  {r['impl']}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for scheme in ("f32", "s8"):
            for base, style in (("fp32", "-o"), ("bf16", "--s")):
                pts = sorted((r["sparsity"], r[f"speedup_vs_{base}"]) for r in rows
                             if r["shape"] == shape and r["scheme"] == scheme)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{scheme} vs dense {base}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(shape)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup (fwd+bwd)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) that leave out its bf16 paths, and
# those that leave out AMX: under them torch's bf16 autocast has no native
# product, whatever the CPU has (the three libraries capped to stand in for
# a CPU without it, docs/benchmarks.md).
_ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_ONEDNN_BELOW_AMX = _ONEDNN_BELOW_BF16 | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"}


def machine(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU model and whether it has AMX (dense int8/bf16 are much faster there).

    ``cpu`` ends with the family and model numbers: hypervisors often cut
    the model name to the vendor's brand ("AMD EPYC" for Zen 3, 4 and 5
    alike), and the numbers still tell them apart (AMD family 25: Zen 3 /
    Zen 4, family 26: Zen 5). ``amx`` and ``bf16_native`` are what torch can
    use: an ``ONEDNN_MAX_CPU_ISA`` below them takes them away."""
    model, flags, ids = "unknown", set(), {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key in ("cpu family", "model") and key not in ids:
                    ids[key] = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if ids:
        model += f" (family {ids.get('cpu family', '?')}, model {ids.get('model', '?')})"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return {
        "cpu": model,
        "amx": "amx_tile" in flags and cap not in _ONEDNN_BELOW_AMX,
        "avx512_vnni": "avx512_vnni" in flags,
        "bf16_native": bool({"avx512_bf16", "amx_bf16"} & flags) and cap not in _ONEDNN_BELOW_BF16,
        "avx_vnni": "avx_vnni" in flags,
    }


def bf16_native() -> bool:
    """Whether this CPU computes bf16 (AVX512_BF16 or AMX; oneDNN not capped
    below them). Elsewhere torch
    emulates bf16 autocast some 60x slower than fp32: no one trains that way,
    so the benchmarks do not time it there (its columns read nan)."""
    return machine()["bf16_native"]


def inductor_caches_off_under_aten_cap() -> str | None:
    """Turns off inductor's FX graph cache and AOTAutograd's cache in this
    process where ``ATEN_CPU_CAPABILITY`` is set, returning a line that says
    so (None where it is not set, or they are off already). The code inductor
    generates depends on the capability (the vector width it picks), its
    caches' keys do not: a graph cached by a run without the cap was loaded
    by a capped one and built for the narrower ISA, and computed garbage (the
    main job's CNN capped to AVX2 on an AVX-512 CPU: outputs 1e32 off, loss
    NaN from the first step, and the job called it the best dense). Capping
    the three libraries together is how we stand in for another CPU; each
    compile then starts from nothing (seconds)."""
    import torch._functorch.config as aot_config
    import torch._inductor.config as inductor_config

    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if not cap or not (inductor_config.fx_graph_cache or aot_config.enable_autograd_cache):
        return None
    inductor_config.fx_graph_cache = False
    aot_config.enable_autograd_cache = False
    return (
        f"ATEN_CPU_CAPABILITY={cap}: inductor's graph caches are off in this run (their key leaves the "
        "capability out, and a graph cached without it computes wrong under it)"
    )


def compiled_output_problem(out: torch.Tensor, reference: torch.Tensor, bf16: bool) -> str | None:
    """Why a torch.compile'd model's output is not the eager model's (None
    where it is, within the rounding of fp32, or of bf16 autocast with
    ``bf16``): a compiled model that computes something else is no rival, and
    timing it would be a fake result."""
    out, reference = out.detach().float(), reference.detach().float()
    if out.shape != reference.shape:
        return f"its output has shape {tuple(out.shape)}, the eager model's {tuple(reference.shape)}"
    tol = 5e-2 if bf16 else 1e-3
    scale = max(float(reference.abs().max()), 1.0) if reference.numel() else 1.0
    diff = float((out - reference).abs().max()) if out.numel() else 0.0
    if math.isfinite(diff) and diff <= tol * scale:
        return None
    return (
        f"its output is not the eager model's (max |difference| {diff:.3g} against at most {tol * scale:.3g}; "
        "a stale inductor cache, or an inductor bug)"
    )


def _reexec_capped(isa: str) -> None:
    """oneDNN reads its ISA cap once, at first use: set both caps, then re-exec."""
    env = dict(os.environ, QSP_MAX_CPU_ISA=isa, ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16", QSP_BENCH_CAPPED="1")
    os.execvpe(sys.executable, [sys.executable, "-m", "qsparseprop.bench", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["linear", "conv", "block"], help="which layer family, or fused blocks")
    p.add_argument(
        "--shapes",
        default=None,
        help=(
            f"comma-separated names (linear: {','.join(LINEAR_SHAPES)}; conv: {','.join(CONV_SHAPES)}; "
            f"block: {','.join(BLOCK_SHAPES)}); default all"
        ),
    )
    p.add_argument(
        "--vectorization",
        choices=["auto", "width", "batch"],
        default="auto",
        help="conv: vectorizing_over_on=None (the tuner picks), True (output width) or False (batch)",
    )
    p.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    p.add_argument("--schemes", default="f32,s8")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    p.add_argument(
        "--isa", choices=["avx512_vnni"], help="cap our ISA (avx512_vnni) and oneDNN's (AVX512_CORE_BF16): no AMX"
    )
    p.add_argument(
        "--dense-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="block: also time the dense block under torch.compile (fp32, and bf16 where native); the best dense "
        "is the fastest of all (default: on)",
    )
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--png", help="draw speedup vs sparsity per shape here")
    a = p.parse_args(argv)
    if a.isa and not os.environ.get("QSP_BENCH_CAPPED") and argv is None:
        _reexec_capped(a.isa)
    known = {"linear": LINEAR_SHAPES, "conv": CONV_SHAPES, "block": BLOCK_SHAPES}[a.what]
    shapes = [s.strip() for s in a.shapes.split(",")] if a.shapes else list(known)
    unknown = [s for s in shapes if s not in known]
    if unknown:
        p.error(f"unknown {a.what} shapes {unknown}; known: {', '.join(known)}")
    schemes = [s.strip() for s in a.schemes.split(",")]
    if any(s not in ("f32", "s8") for s in schemes):
        p.error("--schemes takes f32 and/or s8")
    sparsities = [float(s) for s in a.sparsities.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    m = machine()
    peak = measured_peak_gflops(torch.get_num_threads())
    print(f"qsparseprop {_C.version()} bench {a.what}: cpu={m['cpu']!r} amx={'yes' if m['amx'] else 'no'} "
          f"bf16={'native' if m['bf16_native'] else 'emulated, not timed'} "
          f"threads={torch.get_num_threads()} isa={_C.effective_cpu_isa()}"
          f"{'+avx_vnni' if _C.effective_cpu_isa() == 'avx2' and _C.avx_vnni_usable() else ''} "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')} repeats={a.repeats} "
          f"measured peak: fp32 {peak['f32']:.0f} GFLOP/s, int8 {peak['s8']:.0f} GOP/s ({peak['s8_from']})",
          flush=True)  # fmt: skip
    vec = {"auto": None, "width": True, "batch": False}[a.vectorization]
    if a.what == "block" and a.dense_compile and (line := inductor_caches_off_under_aten_cap()):
        print(line, flush=True)

    def case(shape: str, sp: float, scheme: str) -> dict:
        if a.what == "block":
            return bench_block_case(shape, sp, scheme, a.repeats, a.warmup, a.dense_compile)
        if a.what == "linear":
            b, k, n = LINEAR_SHAPES[shape]
            return bench_linear_case(shape, b, k, n, sp, scheme, a.repeats, a.warmup, peak)
        return bench_conv_case(shape, CONV_SHAPES[shape], sp, scheme, a.repeats, a.warmup, peak, vec)

    fmt = format_block_rows if a.what == "block" else format_rows
    rows = []
    for shape in shapes:
        for sp in sparsities:
            for scheme in schemes:
                rows.append(case(shape, sp, scheme))
                print(fmt(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(fmt(rows))
    if a.what != "block":  # blocks are timed whole: no per-direction split
        print()
        print("where our time goes, per call (ms; kernel % of the measured peak):")
        print(format_split(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.png and a.what != "block":
        plot(rows, a.png)


if __name__ == "__main__":
    main()
