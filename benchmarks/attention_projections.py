"""A pruned transformer encoder layer's training step with its attention's
projections sparse (ProjectedMultiheadAttention, what the swap now makes of
a pruned nn.MultiheadAttention) against the same swap with the attention
left torch's (its projections masked, dense: what the swap did before) and
against the dense layer. BERT-base widths (768, 12 heads, MLP 3072),
batch 2 x 128 tokens, every projection and the MLP pruned to --sparsity
(magnitude, per layer); an SGD step (forward, backward, update), the
variants interleaved round by round in one process, medians.

    .venv/bin/python benchmarks/attention_projections.py [--sparsity 0.9] [--rounds 11] [--steps 3]
"""

import argparse
import copy
import dataclasses

import torch
from encoder_mlp_fusion import _step_medians  # (run from benchmarks/: the script's folder is on the path)
from torch import nn
from torch.nn.utils import prune

import qsparseprop as q
from qsparseprop.bench import machine


def _pruned_layer(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    attn = layer.self_attn
    targets = [
        (attn, "in_proj_weight"),
        (attn.out_proj, "weight"),
        (layer.linear1, "weight"),
        (layer.linear2, "weight"),
    ]
    for module, name in targets:
        prune.l1_unstructured(module, name, amount=sparsity)
        prune.remove(module, name)
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    m = machine()
    print(f"attention_projections: cpu={m['cpu']!r} isa={q.cpu_isa()} threads={torch.get_num_threads()} "
          f"sparsity={args.sparsity} batch 2 x 128 tokens, width 768, 12 heads, MLP 3072")  # fmt: skip
    dense = _pruned_layer(args.sparsity)
    x = torch.randn(2, 128, 768)
    for scheme in ("f32", "s8"):
        # every layer swapped (min_speedup 0): the comparison is of what runs, not of the swap's choice
        ours = q.swap_modules_with_sparse(copy.deepcopy(dense), tuple(x.shape), verbose=False, scheme=scheme,
                                          min_speedup=0.0, persistent=False, repeats=1, warmup=0)  # fmt: skip
        rows = ours.qsparseprop_swap_report
        before = [dataclasses.replace(r, swapped=r.swapped and not r.name.startswith("self_attn.")) for r in rows]
        mlp_only = q.apply_swap_plan(copy.deepcopy(dense), before)
        assert isinstance(ours.self_attn, q.ProjectedMultiheadAttention)
        assert type(mlp_only.self_attn) is nn.MultiheadAttention
        variants = {"sparse attention": ours, "torch attention": mlp_only, "dense fp32": copy.deepcopy(dense)}
        ms = _step_medians(variants, x, lambda out: out.square().mean(), args.rounds, args.steps)
        print(f"\n{scheme}: ms per step (median of {args.rounds} rounds x {args.steps} steps)")
        for k, v in ms.items():
            print(f"  {k:<20} {v:8.2f}")
        sparse, torch_attention, dense_ms = ms["sparse attention"], ms["torch attention"], ms["dense fp32"]
        print(
            f"  sparse attention: {torch_attention / sparse:.2f}x the step with torch's attention (its projections "
            f"masked, dense), {dense_ms / sparse:.2f}x dense fp32 "
            f"(torch's attention: {dense_ms / torch_attention:.2f}x)"
        )


if __name__ == "__main__":
    main()
