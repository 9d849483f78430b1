"""torch's nn.TransformerEncoderLayer with its MLP fused (qsparseprop.fuse
binds the fused block to each layer's _ff_block) against the same swapped
layers unfused (fuse_relu=False): the main job's --model transformer
(patches of Fashion-MNIST-sized images, 2 encoder layers, width 48, 90 %
per layer), batch 128, a whole SGD step. Interleaved rounds in one process,
medians; and the bytes autograd saves (qsparseprop.memory).

    .venv/bin/python benchmarks/encoder_mlp_fusion.py [--rounds 11] [--steps 5]
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import qsparseprop as q
from qsparseprop.bench import machine
from qsparseprop.finetune import make_model, prune_model
from qsparseprop.memory import saved_activation_bytes


def _step_medians(models: dict, x, loss, rounds: int, steps: int) -> dict:
    """Median ms of an SGD step (``loss(model(x))`` backward, then the
    update) of each model, rounds interleaved; benchmarks/attention_projections.py
    times its variants with it too."""
    opts = {k: torch.optim.SGD(v.parameters(), lr=0.01, momentum=0.9) for k, v in models.items()}

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        loss(models[k](x)).backward()
        opts[k].step()

    for k in models:
        step(k)
        step(k)
    times = {k: [] for k in models}
    for r in range(rounds):
        for k in models if r % 2 else reversed(list(models)):
            t = time.perf_counter()
            for _ in range(steps):
                step(k)
            times[k].append((time.perf_counter() - t) / steps)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    m = machine()
    print(f"encoder_mlp_fusion: cpu={m['cpu']!r} isa={q.cpu_isa()} threads={torch.get_num_threads()}")
    torch.manual_seed(0)
    dense = make_model("transformer", 28, 24)
    prune_model(dense, 0.9, "layer")
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    for scheme in ("s8", "f32"):
        models = {
            fused: q.swap_modules_with_sparse(copy.deepcopy(dense), tuple(x.shape), verbose=False, scheme=scheme,
                                              min_sparsity=0.0, mask_kept=False, fuse_relu=fused)
            for fused in (True, False)
        }  # fmt: skip
        saved = {k: saved_activation_bytes(v, x) / 2**20 for k, v in models.items()}
        ms = _step_medians(models, x, lambda out: nn.functional.cross_entropy(out, y), args.rounds, args.steps)
        print(f"{scheme:>4}: a step fused {ms[True]:.2f} ms, unfused {ms[False]:.2f} ms ({ms[False] / ms[True]:.2f}x); "
              f"saved activations fused {saved[True]:.2f} MiB, unfused {saved[False]:.2f}, "
              f"dense fp32 {saved_activation_bytes(dense, x) / 2**20:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
