"""qsparseprop: fast sparse (and int8) training of pruned networks on x86 CPUs.

>>> import torch, qsparseprop
>>> layer = qsparseprop.SparseLinear.from_dense(torch.nn.Linear(16, 8))
>>> layer(torch.randn(4, 16)).shape
torch.Size([4, 8])
"""

# torch first: its libgomp is then the one OpenMP runtime of the process
# (ours and oneDNN's resolve to the already-loaded libgomp.so.1).
import torch  # noqa: F401

from . import _C
from .modules import QuantizedSparseConv2d, QuantizedSparseLinear, SparseConv2d, SparseLinear
from .prototype import PrototypeQuantizedSparseConv2d, PrototypeQuantizedSparseLinear
from .swap import SwapDecision, format_swap_report, swap_modules_with_sparse

__version__ = _C.version()


def cpu_isa() -> str:
    """The ISA the kernels use: detected, capped by QSP_MAX_CPU_ISA / set_max_cpu_isa."""
    return _C.effective_cpu_isa()


def set_max_cpu_isa(isa: str) -> None:
    """Caps the ISA: 'ref', 'avx2', 'avx512_core', 'avx512_vnni' or 'all'."""
    _C.set_max_cpu_isa(isa)


def set_verbose(level: int) -> None:
    """0 quiet, 1 one line per primitive creation/execution, 2 also dispatch reasons."""
    _C.set_verbose(level)


__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "QuantizedSparseLinear",
    "QuantizedSparseConv2d",
    "PrototypeQuantizedSparseLinear",
    "PrototypeQuantizedSparseConv2d",
    "swap_modules_with_sparse",
    "format_swap_report",
    "SwapDecision",
    "cpu_isa",
    "set_max_cpu_isa",
    "set_verbose",
]
