"""Where one block's training step goes, eager against torch.compile: the
block mode of the bench found one ResNet block (B1, fp32) slower compiled
than eager on a 2-core Zen 5, while the whole main-job model is faster
compiled. torch.profiler self CPU times of one forward + backward each,
split into the convolutions (oneDNN) and the rest (BatchNorm, ReLU and the
residual add: torch's ops eager, inductor's generated kernels compiled).

    .venv/bin/python benchmarks/compiled_block_parts.py [--shape B1] [--rounds 3]
"""

import argparse

import torch
from torch.profiler import profile

from qsparseprop import bench

CONVOLUTIONS = ("aten::convolution_backward", "aten::mkldnn_convolution")


def parts(step) -> tuple[float, float]:
    """(convolutions, the rest) in ms of one call of step, by self CPU time."""
    with profile() as p:
        step()
    conv = rest = 0.0
    for e in p.key_averages():
        if e.key in CONVOLUTIONS:
            conv += e.self_cpu_time_total
        elif e.key.startswith(("aten::", "## Call CompiledFxGraph")):
            rest += e.self_cpu_time_total
    return conv / 1e3, rest / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="B1", choices=["B1", "B3"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if line := bench.inductor_caches_off_under_aten_cap():
        print(line)
    m = bench.machine()
    print(f"compiled_block_parts: {args.shape} fp32, cpu={m['cpu']!r} threads={torch.get_num_threads()}")
    dense, _, _ = bench._block_models(args.shape, 0.9, "f32", 0)
    batch, width, size = bench.BLOCK_SHAPES[args.shape]
    x = torch.randn(batch, width, size, size)
    g = torch.randn_like(dense(x))
    compiled = torch.compile(dense)

    def step(f):
        return lambda: f(x.detach().requires_grad_()).backward(g)

    for f in (dense, compiled):  # compiles, and warms both
        step(f)()
        step(f)()
    for _ in range(args.rounds):
        for name, f in (("eager", dense), ("compiled", compiled)):
            conv, rest = parts(step(f))
            print(f"{name:<9} convolutions {conv:6.1f} ms, the rest (BatchNorm, ReLU, add) {rest:6.1f} ms")


if __name__ == "__main__":
    main()
