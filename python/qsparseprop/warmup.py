"""The warm-up tool: generate, tune and record every kernel of a model's
sparse layers ahead of a run, so a restarted job or a new worker starts hot.

    qsparseprop export-patterns model.pt --input-shape 32,3,224,224 -o patterns.json
    qsparseprop warmup patterns.json --batch 32,64 --threads 1,2 [--jobs 2]
    qsparseprop warmup --check          # verify the persistent cache, drop bad entries
    qsparseprop warmup --clear          # empty it

A patterns file lists each sparse layer: its class, configuration, input
shape and CSR pattern (no weights). ``export-patterns`` writes one from a
model saved whole with ``torch.save(model)`` (swapped already, or swapped
there with ``--scheme``), or call :func:`export_patterns` on a model in
your own code. ``warmup`` rebuilds each layer from it and runs it once
forward and backward per batch size and thread count: the tuner measures
the implementations that compete and its decisions go to the persistent
cache (``QSP_CACHE_DIR``, see ``qsparseprop.persistent_cache_info``); the
kernels themselves are regenerated from those decisions at run time (the
cache stores data, never machine code). The run prints a summary table.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import json
import multiprocessing
import os
import stat
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn

from . import _C
from ._paths import output_file_problem
from .modules import (
    QuantizedSparseConv2d,
    QuantizedSparseLinear,
    SparseConv2d,
    SparseLinear,
    _resolve_padding,
    _SparseModule,
)

FORMAT = 1
# What a patterns file may name (it is data from outside: nothing else is built).
LAYER_CLASSES = {c.__name__: c for c in (SparseLinear, QuantizedSparseLinear, SparseConv2d, QuantizedSparseConv2d)}


# ---- patterns files -----------------------------------------------------------------


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _layer_config(m: _SparseModule) -> dict:
    if isinstance(m, SparseLinear):
        return dict(
            in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None, fused_relu=m.fused_relu
        )
    return dict(
        fused_relu=m.fused_relu,
        in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
        stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
        dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None,
        vectorizing_over_on=m.vectorizing_over_on,
    )  # fmt: skip


def export_patterns(
    model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...] | None = None, example_inputs=None
) -> int:
    """Writes the sparse layers of ``model`` (class, configuration, input
    shape, CSR pattern) to ``path`` for ``qsparseprop warmup``. The input
    shapes come from the model's swap report, else from one side-effect-free
    probe forward with a float input of ``input_shape`` or with
    ``example_inputs`` (as :func:`swap_modules_with_sparse` takes them).
    Returns the number of layers."""
    from .swap import _example_call, _probe_shapes

    sparse = [(n, m) for n, m in model.named_modules() if isinstance(m, _SparseModule)]
    unknown = [type(m).__name__ for _, m in sparse if type(m).__name__ not in LAYER_CLASSES]
    if unknown:
        raise ValueError(f"export_patterns: layers of class {sorted(set(unknown))} cannot be exported "
                         f"(accepted: {sorted(LAYER_CLASSES)})")  # fmt: skip
    shapes = {r.name: tuple(r.input_shape) for r in getattr(model, "qsparseprop_swap_report", []) if r.input_shape}
    if any(n not in shapes for n, _ in sparse):
        if input_shape is None and example_inputs is None:
            raise ValueError("export_patterns: the model has no swap report with input shapes; pass input_shape "
                             "or example_inputs")  # fmt: skip
        example = _example_call(input_shape, example_inputs, "export_patterns")
        probed, _ = _probe_shapes(model, example, kinds=(_SparseModule,))
        shapes.update({n: s for n, s in probed.items() if n not in shapes})
    layers = []
    for name, m in sparse:
        if name not in shapes:
            raise ValueError(f"export_patterns: {name} was not called in the probe forward")
        layers.append(dict(
            name=name, cls=type(m).__name__, config=_layer_config(m), input_shape=list(shapes[name]),
            rows=int(m.row_ptr.numel() - 1), nnz=int(m.col_idx.numel()),
            row_ptr=_b64(m.row_ptr.numpy().astype("<i8")), col_idx=_b64(m.col_idx.numpy().astype("<i4")),
        ))  # fmt: skip
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "library": _C.version(), "layers": layers}, f)
    return len(layers)


def _decode_array(text: str, dtype: str, count: int, what: str) -> torch.Tensor:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise ValueError(f"{what}: {len(raw)} bytes, expected {count} entries of {np.dtype(dtype).itemsize} bytes")
    return torch.from_numpy(np.frombuffer(raw, dtype=dtype).astype(dtype[1:]).copy())


# The largest patterns file read (a model of ~500 M nonzeros in base64); a
# bound checked before reading, like the C++ reader's.
MAX_PATTERNS_FILE_BYTES = 4 << 30


def load_patterns(path: str | os.PathLike) -> list[dict]:
    """The layers of a patterns file, each checked (class, configuration,
    pattern: validate_csr) before anything is built from it."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a patterns file")
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # /dev/zero, a FIFO: reading would never end
            raise ValueError(f"{path}: not a regular file")
        if st.st_size > MAX_PATTERNS_FILE_BYTES:
            raise ValueError(
                f"{path}: {st.st_size} bytes, more than a patterns file may hold ({MAX_PATTERNS_FILE_BYTES})"
            )
        try:
            data = json.loads(f.read(MAX_PATTERNS_FILE_BYTES + 1))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a patterns file ({e})") from None
        except RecursionError:
            raise ValueError(f"{path}: not a patterns file (JSON nested too deeply)") from None
    if (
        not isinstance(data, dict)
        or type(data.get("format")) is not int
        or data["format"] != FORMAT
        or not isinstance(data.get("layers"), list)
    ):
        raise ValueError(f"{path}: not a patterns file of format {FORMAT} (written by qsparseprop export-patterns)")
    layers = []
    for i, d in enumerate(data["layers"]):
        what = f"{path}: layer {i} ({d.get('name', '?') if isinstance(d, dict) else '?'})"
        try:
            if not isinstance(d, dict):
                raise ValueError("not an object")
            layer, shape = _checked_layer(d)
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise ValueError(f"{what}: {e}") from None
        layers.append(dict(name=d["name"], cls=d["cls"], input_shape=shape, layer=layer))
    return layers


# The rules both readers of a patterns file apply (this one and qsp-warmup's,
# tools/patterns_file.cpp), so each refuses what the other does: JSON integers
# (not floats, not booleans) in [lo, 2^31 - 1], booleans where the file says
# true/false, and every tensor the shapes imply within 2^31 elements.
_MAX_DIM = 2**31 - 1
_MAX_TENSOR_ELEMENTS = 2**31


def _json_int(v, what: str, lo: int = 1) -> int:
    if type(v) is not int:
        raise ValueError(f"{what} must be an integer, got {v!r}")
    if not lo <= v <= _MAX_DIM:
        raise ValueError(f"{what} must be in [{lo}, {_MAX_DIM}], got {v}")
    return v


def _json_bool(v, what: str) -> bool:
    if type(v) is not bool:
        raise ValueError(f"{what} must be true or false, got {v!r}")
    return v


def _json_pair(v, what: str, lo: int = 1) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError(f"{what} must be a pair")
    return _json_int(v[0], what, lo), _json_int(v[1], what, lo)


def _checked_layer(d: dict):
    """(layer, input shape) of one layer entry, every field checked first."""
    if not isinstance(d["name"], str):
        raise ValueError("name must be a string")
    if d["cls"] not in LAYER_CLASSES:
        raise ValueError(f"class {d['cls']!r} is not one of {sorted(LAYER_CLASSES)}")
    cfg = d["config"]
    if not isinstance(cfg, dict):
        raise ValueError("config must be an object")
    _json_bool(cfg["bias"], "bias")
    if "fused_relu" in cfg:
        _json_bool(cfg["fused_relu"], "fused_relu")
    if not isinstance(d["input_shape"], list):
        raise ValueError("input_shape must be a list")
    shape = [_json_int(s, "input_shape") for s in d["input_shape"]]
    elements = 1
    for s in shape:
        elements *= s
    if elements > _MAX_TENSOR_ELEMENTS:
        raise ValueError("input_shape implies more than 2^31 elements")
    conv = issubclass(LAYER_CLASSES[d["cls"]], SparseConv2d)
    if not conv:
        k, n = _json_int(cfg["in_features"], "in_features"), _json_int(cfg["out_features"], "out_features")
        if len(shape) < 2 or shape[-1] != k:
            raise ValueError("input_shape must end in in_features")
        cols, out_elements = k, elements // k * n
    else:
        c, n = _json_int(cfg["in_channels"], "in_channels"), _json_int(cfg["out_channels"], "out_channels")
        kh, kw = _json_pair(cfg["kernel_size"], "kernel_size")
        sh, sw = _json_pair(cfg["stride"], "stride")
        dh, dw = _json_pair(cfg["dilation"], "dilation")
        groups = _json_int(cfg["groups"], "groups")
        pad = cfg["padding"]
        if not isinstance(pad, str):
            _json_pair(pad, "padding", lo=0)
        top, left, bottom, right = _resolve_padding(pad, (kh, kw), (dh, dw))  # the layers' own rule
        th, tw = top + bottom, left + right
        if cfg["vectorizing_over_on"] is not None:
            _json_bool(cfg["vectorizing_over_on"], "vectorizing_over_on")
        if c % groups or n % groups:
            raise ValueError(f"in_channels ({c}) and out_channels ({n}) must be divisible by groups ({groups})")
        if len(shape) != 4 or shape[1] != c:
            raise ValueError("input_shape must be N x in_channels x H x W")
        oh, ow = (shape[2] + th - dh * (kh - 1) - 1) // sh + 1, (shape[3] + tw - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"input {shape[2]}x{shape[3]} is smaller than the dilated kernel")
        cols, out_elements = c // groups * kh * kw, shape[0] * n * oh * ow
        if cols > _MAX_DIM:
            raise ValueError("in_channels / groups x kernel is too large")
    if out_elements > _MAX_TENSOR_ELEMENTS:
        raise ValueError("the output implies more than 2^31 elements")
    rows, nnz = _json_int(d["rows"], "rows"), _json_int(d["nnz"], "nnz", lo=0)
    if rows != n:
        raise ValueError("rows must equal the output size")
    if nnz > rows * cols:
        raise ValueError("nnz out of range")
    rp = _decode_array(d["row_ptr"], "<i8", rows + 1, "row_ptr")
    ci = _decode_array(d["col_idx"], "<i4", nnz, "col_idx")
    return _build(d["cls"], dict(cfg), rp, ci), shape


def _build(cls_name: str, cfg: dict, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> _SparseModule:
    cls = LAYER_CLASSES[cls_name]
    bias = cfg.pop("bias")
    fused_relu = bool(cfg.pop("fused_relu", False))
    layer = _construct(cls, cfg, bias, row_ptr, col_idx)
    layer.fused_relu = fused_relu
    return layer


def _construct(cls, cfg: dict, bias: bool, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> _SparseModule:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(col_idx.numel(), generator=g)
    if issubclass(cls, SparseLinear):
        out = cfg["out_features"]
        return cls(cfg["in_features"], out, row_ptr, col_idx, values, torch.zeros(out) if bias else None)
    out = cfg["out_channels"]
    return cls(
        cfg["in_channels"], out, tuple(cfg["kernel_size"]), row_ptr, col_idx, values,
        torch.zeros(out) if bias else None, stride=tuple(cfg["stride"]),
        padding=cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"]),
        dilation=tuple(cfg["dilation"]), groups=cfg["groups"], vectorizing_over_on=cfg["vectorizing_over_on"],
    )  # fmt: skip


# ---- warming up -----------------------------------------------------------------------


def implementations(layer: _SparseModule, shape, threads: int) -> str:
    """ "fwd/bwd-data/bwd-weights": the implementations ``layer`` runs for an
    input of ``shape`` on ``threads`` threads (building them if needed)."""
    k = layer._kernel()
    if isinstance(layer, SparseLinear):  # the kernel sees the flattened rows
        return k.implementations(int(np.prod(shape[:-1])), threads)
    return k.implementations(list(shape), threads)


def _warm_one(layer: _SparseModule, shape: list[int], threads: int) -> dict:
    """Forward + backward once at this shape and thread count: generation,
    tuning (decisions to the persistent cache) and the first execution."""
    torch.set_num_threads(threads)
    x = torch.randn(shape, requires_grad=True)
    t0 = time.perf_counter()
    layer(x).sum().backward()
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, implementations=implementations(layer, shape, threads))


def _warm_entry(entry: dict, batches, threads_list) -> list[dict]:
    """One layer of a patterns file, every batch size and thread count."""
    out = []
    # A copy of the layer per thread count: on fewer threads one layer runs
    # a shape with the implementations its larger team ran it with, so it
    # would not tune the smaller thread counts.
    teams = {t: copy.deepcopy(entry["layer"]) for t in threads_list}
    for b in batches:
        shape = [b if b else entry["input_shape"][0], *entry["input_shape"][1:]]
        for t in threads_list:
            r = _warm_one(teams[t], shape, t)
            out.append(dict(name=entry["name"], cls=entry["cls"], batch=shape[0], threads=t, **r))
    return out


_WORKER_LAYERS: dict[str, list[dict]] = {}  # a --jobs worker's patterns file, loaded once


def _warm_job(args) -> list[dict]:
    """A --jobs worker's unit: one layer (the worker reads the file once,
    not once per layer it is given)."""
    path, index, batches, threads_list = args
    if path not in _WORKER_LAYERS:
        _WORKER_LAYERS[path] = load_patterns(path)
    return _warm_entry(_WORKER_LAYERS[path][index], batches, threads_list)


def warmup(path: str | os.PathLike, batches=(0,), threads=(None,), jobs: int = 1, progress: bool = True) -> list[dict]:
    """Warms every layer of the patterns file at each batch size (0: the
    file's) and thread count (None: torch's current). Returns one row per
    layer, batch and thread count: implementations chosen and seconds."""
    layers = load_patterns(path)  # validates everything before any work
    threads = [t or torch.get_num_threads() for t in threads]
    units = [(os.fspath(path), i, list(batches), threads) for i in range(len(layers))]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(units), desc="warming up", unit="layer", file=sys.stderr, leave=False)
        except ImportError:  # pragma: no cover - tqdm is installed by setup.sh
            bar = None
    rows: list[dict] = []
    before = torch.get_num_threads()
    try:
        if jobs > 1:
            # spawn, not fork: a forked child of a process whose OpenMP pool
            # is running can hang in its first parallel region
            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for r in pool.map(_warm_job, units):
                    rows += r
                    if bar:
                        bar.update(1)
        else:
            for entry in layers:  # already loaded and checked above
                rows += _warm_entry(entry, list(batches), threads)
                if bar:
                    bar.update(1)
    finally:
        torch.set_num_threads(before)
        if bar:
            bar.close()
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'layer':<28} {'class':<22} {'batch':>5} {'thr':>3} {'first call':>10}  "
        "implementations (fwd/bwd-data/bwd-weights)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name'][:28]:<28} {r['cls']:<22} {r['batch']:>5} {r['threads']:>3} {1e3 * r['seconds']:>8.1f} ms  "
            f"{r['implementations']}"
        )
    return "\n".join(lines)


def _ints(text: str, what: str, maximum: int | None = None) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{what}: integers >= 1, got {text!r}")
    if maximum is not None and max(vals) > maximum:
        raise argparse.ArgumentTypeError(f"{what}: integers <= {maximum}, got {text!r}")
    return vals


def _cache_line() -> str:
    s = _C.persistent_cache_status()
    if not s["enabled"]:
        return f"persistent cache: off ({s['reason'] or 'QSP_CACHE_DIR'})"
    return (f"persistent cache: {s['dir']}: {s['entries']} entries, {s['bytes'] / 2**20:.1f} MiB "
            f"(cap {s['max_bytes'] / 2**20:.0f} MiB)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="qsparseprop warmup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("patterns", nargs="?", help="a patterns file (qsparseprop export-patterns)")
    p.add_argument("--batch", type=lambda s: _ints(s, "--batch"), default=None,
                   help="batch sizes, e.g. 32,64 (default: the file's input shapes)")  # fmt: skip
    p.add_argument("--threads", type=lambda s: _ints(s, "--threads", _C.max_num_threads()), default=None,
                   help="thread counts, e.g. 1,2 (default: torch's)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="layers warmed in parallel processes")
    p.add_argument("--check", action="store_true", help="verify the persistent cache; remove bad entries")
    p.add_argument("--clear", action="store_true", help="remove every entry of the persistent cache")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if not (a.patterns or a.check or a.clear):
        p.error("give a patterns file, --check or --clear")
    status = _C.persistent_cache_status()
    if (a.check or a.clear) and not status["enabled"]:
        p.error(f"the persistent cache is off: {status['reason']}")
    if a.clear:
        print(f"removed {_C.clear_persistent_cache()} entries from {status['dir']}")
    if a.check:
        c = _C.check_persistent_cache()
        for line in c["problems"]:
            print(f"removed: {line}")
        print(f"checked {status['dir']}: {c['valid']} valid, {c['removed']} removed")
    if a.patterns:
        if not status["enabled"]:
            print(f"warning: {_cache_line()}: decisions last only for this process", file=sys.stderr)
        try:
            t0 = time.perf_counter()
            rows = warmup(a.patterns, a.batch or (0,), a.threads or (None,), a.jobs, progress=not a.no_progress)
        except (OSError, ValueError) as e:
            p.error(str(e))
        print(format_rows(rows))
        print(f"{len(rows)} layer shapes warmed in {time.perf_counter() - t0:.1f} s; {_cache_line()}")
    else:
        print(_cache_line())


def export_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="qsparseprop export-patterns",
        description="Writes a model's sparse layers (class, configuration, input shape, pattern) for "
        "qsparseprop warmup. The model file is one saved whole with torch.save(model) (loading it runs "
        "its pickled code, so load only files you trust), or a fine-tuned model qsparseprop finetune saved "
        "(finetuned_<variant>.pt: plain data, its layers swapped again from their plan).",
    )
    p.add_argument("model", help="a model saved with torch.save(model), or by qsparseprop finetune")
    p.add_argument("--input-shape", type=lambda s: _ints(s, "--input-shape"), required=True,
                   help="the model's input shape, e.g. 32,3,224,224")  # fmt: skip
    p.add_argument("--scheme", choices=["f32", "s8"], default=None,
                   help="swap the model's layers first (timed, as swap_modules_with_sparse)")  # fmt: skip
    p.add_argument("-o", "--out", required=True)
    a = p.parse_args(argv)
    # The output is checked before the model is loaded (and maybe swapped,
    # which times every layer): a bad -o used to fail after all that.
    problem = output_file_problem(a.out)
    if problem:
        p.error(f"-o {a.out!r}: {problem}")
    try:
        model = torch.load(a.model, weights_only=False)
    except OSError as e:
        p.error(f"cannot read {a.model}: {e.strerror or e}")
    except Exception as e:  # not a torch file, or its pickled classes cannot be imported here
        p.error(f"{a.model} is not a model saved with torch.save(model): {type(e).__name__}: {e}")
    if isinstance(model, dict) and "plan" in model and "state_dict" in model:  # qsparseprop finetune's own file
        from .finetune import load_finetuned

        try:
            model = load_finetuned(a.model)
        except ValueError as e:
            p.error(str(e))
    if not isinstance(model, nn.Module):
        p.error(f"{a.model} holds a {type(model).__name__}, not a torch.nn.Module saved whole "
                "(or a model qsparseprop finetune saved)")  # fmt: skip
    if a.scheme:
        from .swap import swap_modules_with_sparse

        model = swap_modules_with_sparse(model, tuple(a.input_shape), scheme=a.scheme)
    n = export_patterns(model, a.out, tuple(a.input_shape))
    print(f"{n} sparse layers written to {a.out}")


if __name__ == "__main__":
    main()
