"""SparseLinear (f32) against dense torch.nn.Linear."""

import pytest
import torch

from conftest import assert_close_rel, prune_random_
from qsparseprop import SparseLinear


def _compare(dense: torch.nn.Linear, x: torch.Tensor, rel=1e-4):
    sparse = SparseLinear.from_dense(dense)
    dense.zero_grad(set_to_none=True)
    xd = x.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    yd, ys = dense(xd), sparse(xs)
    assert ys.shape == yd.shape
    assert_close_rel(ys, yd, rel, "forward")
    g = torch.randn_like(yd)
    yd.backward(g)
    ys.backward(g)
    assert_close_rel(xs.grad, xd.grad, rel, "input grad")
    mask = dense.weight != 0
    assert_close_rel(sparse.weight.detach()[mask], dense.weight[mask], 0, "weights")
    dense_grad_at_nz = dense.weight.grad[mask]
    sparse_grad = torch.zeros_like(dense.weight)
    rows = torch.repeat_interleave(torch.arange(dense.out_features), sparse.row_ptr.diff())
    sparse_grad[rows, sparse.col_idx.long()] = sparse.values.grad
    assert_close_rel(sparse_grad[mask], dense_grad_at_nz, rel, "weight grad at nonzeros")
    if dense.bias is not None:
        assert_close_rel(sparse.bias.grad, dense.bias.grad, rel, "bias grad")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("batch,k,n", [(1, 17, 65), (3, 63, 1), (17, 1, 3), (65, 255, 63), (255, 3, 17)])
def test_matches_dense(batch, k, n, sparsity):
    dense = prune_random_(torch.nn.Linear(k, n), sparsity)
    _compare(dense, torch.randn(batch, k))


def test_no_bias_extra_leading_dims_and_1d_input():
    dense = prune_random_(torch.nn.Linear(20, 7, bias=False), 0.8)
    _compare(dense, torch.randn(2, 3, 5, 20))
    _compare(dense, torch.randn(20))


def test_non_contiguous_input_is_not_modified():
    dense = prune_random_(torch.nn.Linear(16, 9), 0.9)
    base = torch.randn(16, 12)
    x = base.t()  # 12 x 16, non-contiguous
    before = x.clone()
    _compare(dense, x)
    assert torch.equal(x, before)


def test_empty_batch():
    sparse = SparseLinear.from_dense(prune_random_(torch.nn.Linear(8, 4), 0.5))
    assert sparse(torch.randn(0, 8)).shape == (0, 4)


def test_changing_batch_size_reuses_layer():
    dense = prune_random_(torch.nn.Linear(30, 10), 0.9)
    sparse = SparseLinear.from_dense(dense)
    for b in (5, 1, 64, 5):
        x = torch.randn(b, 30)
        assert_close_rel(sparse(x), dense(x), 1e-4)


def test_thread_counts_agree():
    dense = prune_random_(torch.nn.Linear(40, 30), 0.8)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(9, 40)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(sparse(x))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


def test_nan_and_inf_propagate_like_dense():
    dense = prune_random_(torch.nn.Linear(10, 6), 0.9)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(4, 10)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    yd, ys = dense(x), sparse(x)
    assert torch.equal(torch.isnan(yd), torch.isnan(ys))
    assert torch.equal(torch.isinf(yd), torch.isinf(ys))
    fin = torch.isfinite(yd)
    assert_close_rel(ys[fin], yd[fin], 1e-4)


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_f32():
    """torch.autograd.gradcheck through the custom op: analytic gradients
    (backward-data, backward-weights, bias) against finite differences of
    our own forward. float32 only, hence the loose eps/tolerances."""
    from qsparseprop import _ops

    sparse = SparseLinear.from_dense(prune_random_(torch.nn.Linear(6, 5), 0.5))
    inputs = (
        torch.randn(3, 6, requires_grad=True),
        sparse.values.detach().clone().requires_grad_(),
        sparse.bias.detach().clone().requires_grad_(),
    )
    seed = torch.zeros((), dtype=torch.int64)

    def op(x, v, b):
        return _ops.linear_forward(x, v, b, sparse.row_ptr, sparse.col_idx, sparse._handle, seed, [6, 5], "f32")[0]

    assert torch.autograd.gradcheck(op, inputs, eps=1e-2, atol=1e-2, rtol=1e-2)


# The JIT tiers of each scheme, best first (the implementation list's order).
JIT_TIERS = {"f32": ("avx512_core", "avx2"), "s8": ("avx512_core_vnni", "avx512_core", "avx2")}
ISA_ORDER = ("ref", "avx2", "avx512_core", "avx512_core_vnni")


def expected_implementations(scheme: str, isa: str) -> tuple[set[str], set[str]]:
    """What may run a Linear layer's (SpMM directions, backward-weights) on
    a CPU whose effective ISA is `isa`: the best JIT tier of the scheme that
    the CPU has, as the layer's specialised code or the generic kernels
    (backward-weights has only the generic form), and on VNNI CPUs oneDNN's
    int8 matmul for s8; the reference only where no tier fits."""
    tiers = [t for t in JIT_TIERS[scheme] if ISA_ORDER.index(t) <= ISA_ORDER.index(isa)]
    if not tiers:
        return {"ref:any"}, {"ref:any"}
    best = tiers[0]
    spmm, weights = {f"jit:{best}:pattern", f"jit:{best}"}, {f"jit:{best}"}
    if scheme == "s8" and best == "avx512_core_vnni":
        spmm.add("dense:onednn_s8")
        weights.add("dense:onednn_s8")
    return spmm, weights


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_expected_implementations_per_isa(isa):
    """The expectation itself, per ISA: never the reference on a CPU with a
    tier, never a tier above the CPU."""
    for scheme in ("f32", "s8"):
        spmm, weights = expected_implementations(scheme, isa)
        assert (spmm == {"ref:any"}) == (isa == "ref")
        for name in spmm | weights:
            tier = name.split(":")[1]
            assert tier in ("any", "onednn_s8") or ISA_ORDER.index(tier) <= ISA_ORDER.index(isa), name
    assert expected_implementations("s8", "avx2")[0] == {"jit:avx2:pattern", "jit:avx2"}
    assert "dense:onednn_s8" not in expected_implementations("s8", "avx512_core")[0]


def test_uses_the_fastest_implementation_automatically():
    """The layers run the best JIT tier the CPU has (the measured-faster of
    the layer's specialised code and the generic kernels; for s8 on VNNI
    CPUs also oneDNN's int8 matmul), never the reference where a tier fits
    and never a tier the CPU lacks; backward-weights has one form."""
    import qsparseprop
    from qsparseprop import _C, QuantizedSparseLinear

    isa = qsparseprop.cpu_isa()
    assert isa in ISA_ORDER, isa
    for cls in (SparseLinear, QuantizedSparseLinear):
        layer = cls.from_dense(prune_random_(torch.nn.Linear(64, 48), 0.9))
        kern = _C.LinearKernel(64, 48, layer.row_ptr.numpy(), layer.col_idx.numpy(), layer.scheme, True)
        impls = kern.implementations(32, torch.get_num_threads()).split("/")
        assert len(impls) == 3
        spmm, weights = expected_implementations(layer.scheme, isa)
        assert all(i in spmm for i in impls[:2]), (isa, impls)
        assert impls[2] in weights, (isa, impls)
