import contextlib
import copy
import os
import tempfile

# The persistent cache stays off in the tests (decisions stored by an earlier
# run would change what they measure); tests of it point it at a directory of
# their own. Set before qsparseprop is imported: it reads this at first use.
os.environ["QSP_CACHE_DIR"] = ""
# Inductor's on-disk graph cache is keyed without a custom op's fake outputs
# (pytorch/pytorch#160472): a graph compiled by an earlier build of this
# package, whose workspace had another size, would be reloaded. Each test
# session compiles into a directory of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="qsp-inductor-"))

import pytest
import torch
from hypothesis import HealthCheck, settings


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def prune_random_(module: torch.nn.Module, sparsity: float, generator_seed: int = 0) -> torch.nn.Module:
    """Zeroes a random `sparsity` fraction of the weight in place (exact zeros)."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        keep = torch.rand(module.weight.shape, generator=g) >= sparsity
        module.weight.mul_(keep)
    return module


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count (which the layers take) n inside, as before after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def a_relu_input_near_a_kink(model: torch.nn.Module, xs: list) -> bool:
    """Whether ``model`` (a copy of it: training mode for every input but the
    last, which it sees in eval) meets a ReLU (ReLU6) input within 1e-5 of 0
    (or 6): two float computations of such an element may take opposite
    sides, and everything after it is then apart by more than rounding."""
    model, smallest = copy.deepcopy(model), []

    def distance(m, args):
        x = args[0].detach()
        six = (x - 6).abs().min().item() if isinstance(m, torch.nn.ReLU6) else 1.0
        smallest.append(min(x.abs().min().item(), six))

    for m in model.modules():
        if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6)):
            m.register_forward_pre_hook(distance)
    with torch.no_grad():
        for i, x in enumerate(xs):
            model.train(i < len(xs) - 1)
            model(x)
    return min(smallest, default=1.0) < 1e-5


def at_pattern(dense_grad: torch.Tensor, layer) -> torch.Tensor:
    """A dense weight's gradient at a sparse layer's pattern, in the order of
    its values (rows, then their columns as the CSR lists them)."""
    rows = torch.repeat_interleave(torch.arange(dense_grad.shape[0]), layer.row_ptr.diff())
    return dense_grad.reshape(dense_grad.shape[0], -1)[rows, layer.col_idx.long()]


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str = "", at_least: float = 0.0):
    """Max abs error within rel * max(max |want|, at_least) (+ tiny floor).
    ``at_least``: the scale of the terms where ``want`` is their difference
    (a weight gradient through BatchNorm's backward can cancel to rounding
    noise, whose size follows the terms, not the result)."""
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, at_least)
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


def property_settings(examples: int) -> settings:
    """The property tests' hypothesis settings: ``examples`` derandomized
    cases (the same every run, so a failure reproduces); a longer hunt sets
    QSP_PROPERTY_EXAMPLES (the count) and QSP_PROPERTY_RANDOM=1 (new cases
    each run)."""
    return settings(
        max_examples=int(os.environ.get("QSP_PROPERTY_EXAMPLES", str(examples))),
        deadline=None,
        derandomize=os.environ.get("QSP_PROPERTY_RANDOM") != "1",
        suppress_health_check=list(HealthCheck),
    )
