"""qsparseprop: fast sparse (and int8) training of pruned networks on x86 CPUs.

>>> import torch, qsparseprop
>>> layer = qsparseprop.SparseLinear.from_dense(torch.nn.Linear(16, 8))
>>> layer(torch.randn(4, 16)).shape
torch.Size([4, 8])
"""

import os

# torch first: its libgomp is then the one OpenMP runtime of the process
# (ours and oneDNN's resolve to the already-loaded libgomp.so.1).
import torch  # noqa: F401

from . import _C
from .attention import ProjectedMultiheadAttention
from .modules import (
    BatchNormReLU2d,
    FusedBatchNorm2d,
    FusedReLU,
    MaskedReLU,
    QuantizedSparseConv2d,
    QuantizedSparseLinear,
    SparseConv2d,
    SparseLinear,
)
from .outliers import OutlierQuantizedSparseLinear, PrototypeOutlierQuantizedSparseLinear
from .prototype import PrototypeQuantizedSparseConv2d, PrototypeQuantizedSparseLinear
from .swap import (
    SwapDecision,
    apply_swap_plan,
    format_swap_report,
    fuse,
    load_swap_plan,
    save_swap_plan,
    swap_modules_with_sparse,
    to_dense,
    use_masked_relus,
)

__version__ = _C.version()


def cpu_isa() -> str:
    """The ISA the kernels use: detected, capped by QSP_MAX_CPU_ISA / set_max_cpu_isa."""
    return _C.effective_cpu_isa()


def set_max_cpu_isa(isa: str) -> None:
    """Caps the ISA: 'ref', 'avx2' (no AVX-VNNI, as oneDNN's AVX2), 'avx2_vnni'
    (AVX2 with AVX-VNNI where the CPU has it), 'avx512_core', 'avx512_vnni'
    or 'all'."""
    _C.set_max_cpu_isa(isa)


def set_verbose(level: int) -> None:
    """0 quiet, 1 one line per primitive creation/execution, 2 also dispatch and tuning."""
    _C.set_verbose(level)


def cache_info() -> list[dict]:
    """Every in-memory cache (generated code, plans, tuning decisions): name,
    size, capacity, bytes, memory_limit, hit/miss/eviction counts and
    in_use_elsewhere. Each is an LRU bounded by its capacity
    (``QSP_CACHE_CAPACITY`` entries, default 1024) and by bytes
    (``QSP_CACHE_MEMORY_MB``, default 64, or :func:`set_cache_memory_limit`).
    Beyond a bound a cache lets go of its least recently used values: one a
    layer still uses stays alive (counted in ``in_use_elsewhere``), one
    nobody uses is freed, so a deleted layer's plans and code go with it.

    >>> import qsparseprop
    >>> all(c["size"] <= c["capacity"] for c in qsparseprop.cache_info())
    True
    >>> all(c["bytes"] <= c["memory_limit"] for c in qsparseprop.cache_info())
    True
    """
    return _C.cache_info()


def set_cache_memory_limit(nbytes: int) -> None:
    """Bounds the bytes each code and plan cache keeps (also for caches
    created later); 0 keeps nothing a layer does not use. Plans and code in
    use by live layers are never freed by it. Tuning decisions (a few bytes
    each) are bounded by count only."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    _C.set_cache_memory_limit(nbytes)


def clear_caches() -> None:
    """Empties every cache; layers already created keep what they hold."""
    _C.clear_caches()


def persistent_cache_info() -> dict:
    """The on-disk cache of tuning decisions and swap timings: ``enabled``,
    ``dir`` (``QSP_CACHE_DIR``, default ``$XDG_CACHE_HOME/qsparseprop`` or
    ``~/.cache/qsparseprop``; ``""`` turns it off), ``reason`` (why it is off),
    ``entries``, ``bytes``, ``max_bytes`` (``QSP_CACHE_MAX_MB``, default 256).
    It holds data, never machine code; an entry is used only when its
    checksum, format, library version and build, CPU and full key match."""
    return _C.persistent_cache_status()


def set_persistent_cache_dir(path: str | os.PathLike) -> None:
    """Uses ``path`` for the persistent cache from now on (``""``: off);
    created user-only (0700) if missing."""
    _C.set_persistent_cache_dir(os.fspath(path))


def clear_persistent_cache() -> int:
    """Removes every entry of the persistent cache; returns how many."""
    return _C.clear_persistent_cache()


def check_persistent_cache() -> dict:
    """Reads every entry and removes those that would not be used (damaged,
    another library version or build, or CPU): ``valid``, ``removed``,
    ``problems``."""
    return _C.check_persistent_cache()


def scratch_info() -> dict:
    """The scratch memory pool that executions borrow from: ``idle_bytes``
    kept for reuse (at most ``capacity_bytes``, ``QSP_SCRATCH_CAPACITY_MB``,
    default 256 MiB), ``in_use_bytes``, ``peak_bytes``."""
    return _C.scratch_info()


def release_scratch() -> None:
    """Returns every idle scratch buffer to the system now."""
    _C.release_scratch()


def set_profiling(on: bool) -> None:
    """Records where executions spend their time (also ``QSP_PROFILE=1``):
    see :func:`profile_info`. Off, it costs one atomic load per execution."""
    _C.set_profiling(bool(on))


def profile_info() -> list[dict]:
    """Per direction (forward, backward_data, backward_weights), summed over
    the executions since :func:`clear_profile`: ``calls``, ``total_ms`` and
    ``kernel_ms`` (inside the kernels' parallel regions; the rest is the passes
    — packing, quantization, transposes — and the call).

    >>> import qsparseprop
    >>> [e["direction"] for e in qsparseprop.profile_info()]
    ['forward', 'backward_data', 'backward_weights']
    """
    return _C.profile_info()


def clear_profile() -> None:
    """Zeroes what :func:`profile_info` reports."""
    _C.clear_profile()


__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "QuantizedSparseLinear",
    "QuantizedSparseConv2d",
    "PrototypeQuantizedSparseLinear",
    "PrototypeQuantizedSparseConv2d",
    "swap_modules_with_sparse",
    "apply_swap_plan",
    "save_swap_plan",
    "load_swap_plan",
    "to_dense",
    "FusedReLU",
    "FusedBatchNorm2d",
    "BatchNormReLU2d",
    "fuse",
    "MaskedReLU",
    "use_masked_relus",
    "ProjectedMultiheadAttention",
    "OutlierQuantizedSparseLinear",
    "PrototypeOutlierQuantizedSparseLinear",
    "format_swap_report",
    "SwapDecision",
    "cpu_isa",
    "set_max_cpu_isa",
    "set_verbose",
    "cache_info",
    "clear_caches",
    "set_cache_memory_limit",
    "scratch_info",
    "persistent_cache_info",
    "set_persistent_cache_dir",
    "clear_persistent_cache",
    "check_persistent_cache",
    "release_scratch",
    "set_profiling",
    "profile_info",
    "clear_profile",
]
