"""A short forward + backward of every module type, for runs on emulated
CPUs (qemu-x86_64 -cpu Haswell: AVX2 without AVX-512; -cpu Nehalem: no
AVX at all), where an instruction above the CPU's tier would kill the
process with SIGILL. Checks the results too: f32 against dense torch,
int8 bit for bit against the pure-PyTorch prototype (the fp32 bias
gradient to rounding: the two sum in different orders), a fused
Conv2d-BatchNorm2d-ReLU block against the same layers unfused, and the fused
MLP block (the hidden activation in the kept tile layout on the JIT tiers)
bit for bit against its layers unfused.

    qemu-x86_64 -cpu Haswell .venv/bin/python tests/emulated/every_module_forward_backward.py avx2
"""

import sys

import torch

import qsparseprop
from qsparseprop import (
    PrototypeQuantizedSparseConv2d,
    PrototypeQuantizedSparseLinear,
    QuantizedSparseConv2d,
    QuantizedSparseLinear,
    SparseConv2d,
    SparseLinear,
)


def pruned(module: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.weight.mul_(torch.rand(module.weight.shape, generator=g) >= sparsity)
    return module


def run(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return [y.detach(), *grads]


def main(expected_isa: str) -> None:
    torch.manual_seed(0)
    isa = qsparseprop.cpu_isa()
    print(f"detected tier: {isa}, torch: {torch.backends.cpu.get_cpu_capability()}")
    assert isa == expected_isa, f"expected the {expected_isa} tier on this CPU, got {isa}"
    cases = [
        ("Linear", lambda: pruned(torch.nn.Linear(70, 33), 0.8), torch.randn(65, 70), (65, 33)),
        ("Conv2d", lambda: pruned(torch.nn.Conv2d(6, 8, 3, padding=1, stride=2), 0.7),
         torch.randn(3, 6, 9, 9), (3, 8, 5, 5)),
    ]  # fmt: skip
    for name, make, x, out_shape in cases:
        dense = make()
        g = torch.randn(out_shape)
        want = run(dense, x, g)
        f32 = (SparseLinear if name == "Linear" else SparseConv2d).from_dense(dense)
        got = run(f32, x, g)
        for a, b, what in zip(got[:2], want[:2], ("output", "input grad"), strict=True):
            err = (a - b).abs().max().item()
            assert err <= 1e-4 * (1 + b.abs().max().item()), f"{name} f32 {what}: error {err}"
        s8_cls = QuantizedSparseLinear if name == "Linear" else QuantizedSparseConv2d
        proto_cls = PrototypeQuantizedSparseLinear if name == "Linear" else PrototypeQuantizedSparseConv2d
        s8 = run(s8_cls.from_dense(dense, seed=3), x, g)
        proto = run(proto_cls.from_dense(dense, seed=3), x, g)
        *exact, db = s8
        *exact_proto, db_proto = proto
        for a, b, what in zip(exact, exact_proto, ("output", "input grad", "values grad"), strict=True):
            assert torch.equal(a, b), f"{name} int8 {what} differs from the prototype"
        assert (db - db_proto).abs().max() <= 1e-5 * (1 + db_proto.abs().max()), f"{name} int8 bias grad"
        print(f"{name}: f32 and int8 forward + backward ok")
    fused_block()
    fused_mlp()
    print("every module type ran on this CPU")


def fused_block() -> None:
    """A fused Conv2d-BatchNorm2d-ReLU (qsparseprop.fuse: the BatchNorm and
    ReLU passes) against the same layers unfused, training then eval."""
    import copy

    dense = torch.nn.Sequential(
        pruned(torch.nn.Conv2d(5, 7, 3, padding=1, bias=False), 0.8), torch.nn.BatchNorm2d(7), torch.nn.ReLU()
    )
    unfused = copy.deepcopy(dense)
    unfused[0] = SparseConv2d.from_dense(dense[0])
    fused = qsparseprop.fuse(copy.deepcopy(unfused))
    assert isinstance(fused[1], qsparseprop.FusedBatchNorm2d)
    x, g = torch.randn(3, 5, 9, 9), torch.randn(3, 7, 9, 9)
    for mode in ("train", "eval"):
        getattr(unfused, mode)(), getattr(fused, mode)()
        for a, b in zip(run(fused, x, g), run(unfused, x, g), strict=True):
            err = (a - b).abs().max().item()
            assert err <= 1e-4 * (1 + b.abs().max().item()), f"fused block ({mode}): error {err}"
    assert torch.allclose(fused[1].running_var, unfused[1].running_var, rtol=1e-5, atol=1e-6)
    print("fused Conv2d-BatchNorm2d-ReLU: forward + backward ok")


def fused_mlp() -> None:
    """Linear -> ReLU -> Linear, f32 and int8, fused (one block) against the
    same swapped layers unfused (MaskedReLU): the same bits."""
    import copy

    for cls in (SparseLinear, QuantizedSparseLinear):
        dense = torch.nn.Sequential(
            pruned(torch.nn.Linear(20, 48), 0.8), torch.nn.ReLU(), pruned(torch.nn.Linear(48, 12), 0.8)
        )
        unfused = copy.deepcopy(dense)
        unfused[0], unfused[2] = cls.from_dense(dense[0], seed=3), cls.from_dense(dense[2], seed=4)
        qsparseprop.use_masked_relus(unfused)
        fused = qsparseprop.fuse(copy.deepcopy(unfused))
        assert "forward" in fused.__dict__, "the MLP block was not fused"
        x, g = torch.randn(70, 20), torch.randn(70, 12)
        for a, b in zip(run(fused, x, g), run(unfused, x, g), strict=True):
            assert torch.equal(a, b), f"fused MLP ({cls.__name__}) differs from its layers unfused"
    print("fused Linear-ReLU-Linear: f32 and int8 forward + backward ok")


if __name__ == "__main__":
    main(sys.argv[1])
