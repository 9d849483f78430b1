"""The main job: prune a model, swap its layers, fine-tune it on real data,
and show what was gained.

    qsparseprop finetune                     # ResNet-style CNN on Fashion-MNIST, 90 % sparse
    qsparseprop finetune --quick             # a small run (1-2 minutes)
    qsparseprop finetune --model transformer --sparsity 0.95 --json report.json --png curves.png
    qsparseprop finetune --nproc 2           # the same with DistributedDataParallel (gloo)
    torchrun --nnodes 2 --node-rank R --nproc-per-node 2 --master-addr HOST -m qsparseprop finetune
                                             # the same over machines: one command each (env://)

A dense model is trained by the tool itself (cached in --out), pruned by
magnitude (per layer or global), then fine-tuned the same way (same data
order, optimizer and epochs; the variants' epochs run in turn, the order
rotating, so the machine's drift moves them alike) as: dense PyTorch fp32
and, where the CPU computes bf16 natively (AVX512_BF16 or AMX), under bf16
autocast (elsewhere one line says it is skipped and why), each also under
torch.compile (--no-dense-compile leaves those out; the fastest dense is
"best dense"), and with qsparseprop f32 and int8 layers (``swap_modules_with_sparse``: each
layer, pruned or not, swapped only where it measured faster). One line per
phase and per epoch (with its time and what is left) even with
--no-progress; the table reports time per epoch, speedups, training memory,
test accuracy and the share of step time spent in the sparse layers.
Each variant's fine-tuned model is saved in --out as
finetuned_<variant>.pt (e.g. finetuned_qsparseprop_int8.pt);
``qsparseprop.finetune.load_finetuned(path)`` makes it again, swapped layers
and all, with the report's test accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import prune

from . import _C, cpu_isa
from ._paths import output_file_problem
from .attention import _PROJECTIONS
from .bench import compiled_output_problem, inductor_caches_off_under_aten_cap, machine
from .memory import saved_activation_bytes
from .swap import apply_swap_plan, model_state_kept, save_swap_plan, swap_modules_with_sparse, use_masked_relus

_VARIANT_NAMES = {
    "f32": "qsparseprop f32",
    "s8": "qsparseprop int8",
    "s8_outliers": "qsparseprop int8 (outliers)",
    "auto": "qsparseprop auto",  # int8 or f32 per layer, the faster (swap_modules_with_sparse(scheme="auto"))
}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


# ---- data ------------------------------------------------------------------------


def _fashion_mnist_files(root: str, kind: str) -> list[str]:
    """The images and labels files of one split ("train" or "t10k")."""
    return [os.path.join(root, f"{kind}-{part}-idx{n}-ubyte.gz") for part, n in (("images", 3), ("labels", 1))]


def _fashion_mnist_missing(root: str) -> str | None:
    """Why Fashion-MNIST cannot be read from root, or None."""
    for kind in ("train", "t10k"):
        for path in _fashion_mnist_files(root, kind):
            if not os.path.isfile(path):
                return (
                    f"Fashion-MNIST not found ({path}): install Debian's dataset-fashion-mnist "
                    "(bash scripts/setup.sh does) or pass --data-dir"
                )
    return None


def load_dataset(name: str, data_dir: str | None = None):
    """(x_train, y_train, x_test, y_test) as float32 NCHW in [0, 1] and int64 labels."""
    if name == "fashion-mnist":
        import idx2numpy  # the IDX format reader (validates magic numbers and shapes)

        root = data_dir or FASHION_MNIST_DIR
        missing = _fashion_mnist_missing(root)
        if missing:
            raise FileNotFoundError(missing)
        out = []
        for kind in ("train", "t10k"):
            paths = _fashion_mnist_files(root, kind)
            with gzip.open(paths[0]) as f:
                images = torch.from_numpy(idx2numpy.convert_from_file(f).copy())
            with gzip.open(paths[1]) as f:
                labels = torch.from_numpy(idx2numpy.convert_from_file(f).copy())
            out += [images.unsqueeze(1).float() / 255.0, labels.long()]
        return tuple(out)
    if name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(y))
        return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    raise ValueError(f"unknown dataset {name!r}: fashion-mnist or digits")


# ---- models ----------------------------------------------------------------------


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class _PatchTransformer(nn.Module):
    """Images as a sequence of patches, a small transformer encoder, mean pool."""

    def __init__(self, image: int, width: int, patch: int):
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.pos = nn.Parameter(torch.zeros(1, tokens, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        p = self.patch
        b = x.shape[0]
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(b, -1, p * p)
        return self.head(self.encoder(self.embed(patches) + self.pos).mean(1))


def make_model(name: str, image: int, width: int) -> nn.Module:
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            _Residual(width, width, 1), _Residual(width, 2 * width, 2), _Residual(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
        )  # fmt: skip
    if name == "mlp":
        hidden = 16 * width
        return nn.Sequential(
            nn.Flatten(), nn.Linear(image * image, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )  # fmt: skip
    if name == "transformer":
        return _PatchTransformer(image, 2 * width, 7 if image % 7 == 0 else 4)
    raise ValueError(f"unknown model {name!r}: cnn, mlp or transformer")


_QKV = _PROJECTIONS[:3]  # an attention's input projections, as ProjectedMultiheadAttention names them


def prunable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The layers that get pruned (and may be swapped), each as (name,
    weight): every Linear / Conv2d except the first convolution and the
    classifier (the usual practice), and every attention's query, key and
    value projections, named ``<attention>.q_proj`` etc. (the layers the swap
    makes of them; their weights here are the rows of torch's packed
    ``in_proj_weight``, or its separate ``q_proj_weight`` ...)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    first_conv = next((n for n, m in layers if isinstance(m, nn.Conv2d)), None)
    last = layers[-1][0] if layers else None
    out = []
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out += [(f"{n}.{p}", _weight_of(model, f"{n}.{p}")) for p in _QKV]
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and n not in (first_conv, last):
            out.append((n, m.weight))
    return [(n, w) for n, w in out if w.numel() >= 256]


def _torch_attention_rows(model: nn.Module, name: str) -> tuple[nn.MultiheadAttention, str] | None:
    """(torch's attention, projection) where the pruned layer ``name`` is a
    q/k/v projection of an ``nn.MultiheadAttention`` (one the swap left as
    it was: it holds the projection's weight itself), else None."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in _QKV:
        return None
    owner = model.get_submodule(parent)
    return (owner, leaf) if isinstance(owner, nn.MultiheadAttention) else None


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of the pruned layer ``name`` (a name of ``prunable``): the
    layer's own, or for a projection of torch's attention its rows of
    ``in_proj_weight`` (a view: masking it masks them), or its own
    ``q_proj_weight`` ..."""
    rows = _torch_attention_rows(model, name)
    if rows is None:
        return model.get_submodule(name).weight
    owner, leaf = rows
    if not owner._qkv_same_embed_dim:
        return getattr(owner, f"{leaf}_weight")
    e, i = owner.embed_dim, _QKV.index(leaf)
    return owner.in_proj_weight[i * e : (i + 1) * e]


def _kept_dense(model: nn.Module, name: str) -> bool:
    """Whether the pruned layer ``name`` trains as a dense weight (the swap
    kept it as torch's): its pruned weights are the tool's to keep zero."""
    return _torch_attention_rows(model, name) is not None or isinstance(
        model.get_submodule(name), (nn.Linear, nn.Conv2d)
    )


def prune_model(model: nn.Module, sparsity: float, method: str) -> None:
    """Prunes ``prunable(model)`` by magnitude to ``sparsity``: each layer on
    its own (``layer``) or all together (``global``), as
    ``torch.nn.utils.prune``'s l1_unstructured / global_unstructured would,
    the zeros left in the weights (as after ``prune.remove``)."""
    if method not in ("layer", "global"):
        raise ValueError(f"unknown pruning method {method!r}: layer or global")
    weights = [w for _, w in prunable(model)]
    l1 = prune.L1Unstructured(amount=sparsity)
    with torch.no_grad():
        if method == "layer":
            masks = [l1.compute_mask(w, torch.ones_like(w)) for w in weights]
        else:
            flat = torch.cat([w.detach().reshape(-1) for w in weights]) if weights else torch.empty(0)
            masks = list(l1.compute_mask(flat, torch.ones_like(flat)).split([w.numel() for w in weights]))
        for w, mask in zip(weights, masks, strict=True):
            w.mul_(mask.view_as(w))  # the zeros stay in the weights; masks below keep them there


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (w != 0) for n, w in prunable(model)}


# ---- training --------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    epoch_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    first_loss: float | None = None  # the loss of the first step (before any update)
    accuracy: list[float] = field(default_factory=list)  # test accuracy after each epoch
    wall: list[float] = field(default_factory=list)  # cumulative training seconds after each epoch
    memory_bytes: int = 0
    step_ms: dict[str, float] = field(default_factory=dict)  # where a training step's time goes, per part
    sparse_s: list[float] = field(default_factory=list)  # seconds inside qsparseprop's primitives per epoch
    sparse_share: float | None = None
    swapped: list[str] = field(default_factory=list)
    pruned_weights_zero: bool = True
    ranks_identical: bool | None = None  # DDP: every rank ended with the same parameters and buffers


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Test accuracy, ``batch`` images per forward. The tool evaluates in its
    training batch size, whose kernels the swapped layers have tuned: a new
    batch size tunes their forward again (batches of 1000 cost --quick on a
    2-core Zen 3 ~24 s per sparse variant while every direction was tuned,
    ~5 s with the forward alone, for a 0.4 s evaluation). Under DDP, each
    process's share of the batch: the shape its layers ran."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(y)


def _training_memory(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, autocast) -> int:
    """Saved activations of one training step + parameters, gradients and
    the optimizer's state: what a step holds at its peak. A probe: its
    training-mode forward would update the BatchNorm statistics and the
    int8 layers' rounding steps; they, and the mode, are put back. (Under
    DDP it was the one place where a rank's own arithmetic — the kernels its
    own tuner picked, f32 ones rounding differently — reached the state the
    report compares across ranks: training broadcasts rank 0's buffers and
    all-reduces the gradients. The torchrun test's ranks once ended unequal
    in a full test run; not reproduced in eight reruns, five under load.)"""
    with model_state_kept(model), autocast:
        model.train()
        act = saved_activation_bytes(model, x)
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    return act + 2 * params + state  # parameters and their gradients


def _autocast(dtype: torch.dtype | None):
    """The variant's autocast (None: none, fp32)."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train(model, variant: Variant, data, epochs, batch, lr, seed, **kwargs) -> None:
    """Trains ``model`` for ``epochs`` epochs (``training``, run to its end)."""
    for _ in training(model, variant, data, epochs, batch, lr, seed, **kwargs):
        pass


def training(
    model, variant: Variant, data, epochs, batch, lr, seed, masks=None, autocast=None, rank=0, world=1,
    progress=True, on_step=None, cosine=False, measure=True, log=None,
) -> Iterator[int]:  # fmt: skip
    """The training of ``train``, one epoch per ``next``: the main job runs
    its variants' epochs in turn. Exhausted, it measures the variant's memory
    and step parts (unless ``measure`` is off)."""
    xtr, ytr, xte, yte = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_total = epochs * (len(ytr) // batch)
    # Fine-tuning anneals the rate to zero (cosine, per step), so the final
    # accuracy is the model's, not the noise of the last steps at a high rate.
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps_total)))
        if cosine
        else None
    )
    ctx = _autocast(autocast)
    masked = [(_weight_of(model_mod(model), name), mask) for name, mask in (masks or {}).items()]
    gen = torch.Generator().manual_seed(seed)
    wall = 0.0
    steps = len(ytr) // batch
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        bar = _bar(steps, f"{variant.name} epoch {epoch + 1}/{epochs}", progress and rank == 0)
        total, count = 0.0, 0
        in_sparse0 = _primitive_seconds()
        t0 = time.perf_counter()
        for i in range(0, len(ytr) - batch + 1, batch):  # whole batches only: one shape, tuned once
            idx = perm[i : i + batch]
            if world > 1:  # each rank its slice of the global batch
                idx = idx[rank::world]
            opt.zero_grad(set_to_none=True)
            with ctx:
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            if sched:
                sched.step()
            if masked:  # layers that stayed dense: pruned weights stay zero
                with torch.no_grad():
                    for weight, mask in masked:
                        weight.mul_(mask)
            total += loss.item() * len(idx)
            count += len(idx)
            if variant.first_loss is None:
                variant.first_loss = loss.item()
            bar.update(1)
            if on_step:
                on_step()
        wall += time.perf_counter() - t0
        bar.close()
        variant.epoch_s.append(time.perf_counter() - t0)
        variant.sparse_s.append(_primitive_seconds() - in_sparse0)
        variant.losses.append(total / max(count, 1))
        variant.wall.append(wall)
        with ctx:  # (a compiled model's own module: eager, no compile for eval's shapes)
            variant.accuracy.append(evaluate(getattr(model, "_orig_mod", model), xte, yte, max(batch // world, 1)))
        if log and rank == 0:  # one line per epoch, progress bars or not
            left = (epochs - epoch - 1) * variant.epoch_s[-1]
            log(f"{variant.name}: epoch {epoch + 1}/{epochs} in {variant.epoch_s[-1]:.1f} s, loss "
                f"{variant.losses[-1]:.4f}, test accuracy {variant.accuracy[-1]:.4f}"
                + (f"; about {left:.0f} s left for it" if left else ""))  # fmt: skip
        yield epoch
    if not measure:  # (pre-training: no report row)
        return
    variant.memory_bytes = _training_memory(model, opt, xtr[:batch].clone(), ctx)
    if rank == 0 and world == 1:  # (under DDP the gradient all-reduce would be part of it)
        variant.step_ms = step_breakdown(model, opt, xtr[:batch], ytr[:batch], ctx)


# The parts of a step, matched on the names torch.profiler records (an op
# counts for the nearest enclosing part: a copy inside a convolution is the
# convolution's). First match wins.
STEP_PARTS = (
    ("optimizer", ("optimizer.",)),
    (
        "sparse layers",
        (
            "_sparsefunction",
            "_linearrelulinearfunction",
            "_lineargelulinearfunction",
            "_sharedinputconvsfunction",
            # the convolution applying the BatchNorm before it as it rounds its
            # input (the BatchNorm's backward, a pass of its own, is recorded
            # as batch_norm_relu_backward inside it)
            "_batchnormreluconvfunction",
            "_subsamplefunction",
            "_prototypelinearfn",
            "_prototypeconv2dfn",
            "qsparseprop::",
        ),
    ),
    ("dense conv/linear", ("convolution", "addmm", "aten::mm", "linear", "aten::bmm")),
    ("batchnorm", ("batch_norm", "batchnorm")),
    ("relu", ("relu", "threshold", "clamp_min")),
    ("pool+loss", ("pool", "aten::mean", "meanbackward", "cross_entropy", "nll_loss", "log_softmax")),
)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler of some torch builds logs each start and stop on the
    process's stderr (fd 2, below Python): keep the report readable. Python
    exceptions still propagate and print after."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_breakdown(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, ctx, steps: int = 3) -> dict[str, float]:
    """Milliseconds per training step in each part (STEP_PARTS, the rest in
    "other"), from torch.profiler's self CPU times over ``steps`` steps. The
    parameters are restored afterwards: the measurement trains nothing."""
    from torch.profiler import ProfilerActivity, profile

    saved_params = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    model.train()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with ctx:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    model.load_state_dict(saved_params)
    opt.load_state_dict(saved_opt)
    opt.zero_grad(set_to_none=True)
    parts = {name: 0.0 for name, _ in STEP_PARTS} | {"other": 0.0}
    for ev in prof.events():
        part, node = "other", ev
        while node is not None:
            name = node.name.lower()
            hit = next((p for p, keys in STEP_PARTS if any(k in name for k in keys)), None)
            if hit:
                part = hit
                break
            node = node.cpu_parent
        parts[part] += ev.self_cpu_time_total / 1e3 / steps
    return parts


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is installed by setup.sh
        return _NoBar()


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


# ---- the job -----------------------------------------------------------------------


DEFAULT_TRAIN_IMAGES = 16000


@dataclass
class Config:
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    sparsity: float = 0.9
    pruning: str = "layer"
    epochs: int = 2
    pretrain_epochs: int = 2
    batch_size: int = 128
    width: int = 24
    lr: float = 0.02
    threads: int | None = None
    schemes: tuple[str, ...] = ("f32", "s8")
    # The dense variants also under torch.compile (a user's best dense may be
    # compiled: inductor made this CNN's dense bf16 step 1.2x and fp32 1.5x
    # faster on a Zen 5); single-process runs.
    dense_compile: bool = True
    # Training images per epoch (None: all): the default run fits 10 minutes
    # on 2 cores of every CPU kind; --train-images 0 takes all 60000.
    train_subset: int | None = DEFAULT_TRAIN_IMAGES
    test_subset: int | None = None
    seed: int = 0
    out: str = "qsparseprop-finetune"
    data_dir: str | None = None
    progress: bool = True


DENSE_COMPILE_DDP = "torch.compile of the dense variants is measured in single-process runs only"

BF16_EMULATED = (
    "this CPU has no native bf16 arithmetic (AVX512_BF16 or AMX, or ONEDNN_MAX_CPU_ISA caps them off): "
    "torch would emulate it, about 60x slower than fp32, and nobody trains that way; the best dense option "
    "here is fp32"
)


def _pretrain_autocast() -> torch.dtype | None:
    """The dense pre-training runs in the fastest dense precision: bf16
    autocast where AMX makes it so, fp32 elsewhere (it only makes the model
    that gets pruned; every variant fine-tunes it the same way)."""
    return torch.bfloat16 if machine()["amx"] else None


def _cache_key(cfg: Config) -> str:
    keep = (cfg.model, cfg.dataset, cfg.pretrain_epochs, cfg.batch_size, cfg.width, cfg.lr, cfg.seed, cfg.train_subset,
            str(_pretrain_autocast()))  # fmt: skip
    return hashlib.sha256(repr(keep).encode()).hexdigest()[:16]


def _subset(data, cfg: Config):
    xtr, ytr, xte, yte = data
    if cfg.train_subset:
        xtr, ytr = xtr[: cfg.train_subset], ytr[: cfg.train_subset]
    if cfg.test_subset:
        xte, yte = xte[: cfg.test_subset], yte[: cfg.test_subset]
    return xtr, ytr, xte, yte


def pretrained(cfg: Config, data, log) -> nn.Module:
    """The dense model trained by the tool, cached in cfg.out/cache."""
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, data[0].shape[-1], cfg.width)
    path = os.path.join(cfg.out, "cache", f"dense_{cfg.model}_{cfg.dataset}_{_cache_key(cfg)}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        log(f"dense model: {path} (cached)")
        return model
    v = Variant("dense pre-training")
    autocast = _pretrain_autocast()
    log(f"dense pre-training: {cfg.pretrain_epochs} epochs ({'bf16 autocast' if autocast else 'fp32'}), "
        "cached for the next run")  # fmt: skip
    train(model, v, data, cfg.pretrain_epochs, cfg.batch_size, cfg.lr, cfg.seed, progress=cfg.progress,
          autocast=autocast, measure=False, log=log)  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)
    log(f"dense model: trained {cfg.pretrain_epochs} epochs ({'bf16 autocast' if autocast else 'fp32'}) in "
        f"{sum(v.epoch_s):.0f} s; saved to {path}")  # fmt: skip
    return model


def _primitive_seconds() -> float:
    """Seconds spent in qsparseprop's primitives so far (profiling on)."""
    return sum(e["total_ms"] for e in _C.profile_info()) / 1e3 if _C.profiling() else 0.0


class _FineTuning(NamedTuple):
    """One variant's fine-tuning as the main job runs it, an epoch at a time."""

    variant: Variant
    model: nn.Module
    epochs: Iterator[int]  # its training(): one epoch per next()
    kept: dict  # the masks it keeps its pruned weights to
    ours: bool  # a qsparseprop variant (its share inside the primitives is measured)


def run(cfg: Config, log=print, rank: int = 0, world: int = 1) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = _subset(load_dataset(cfg.dataset, cfg.data_dir), cfg)
    base = pretrained(cfg, data, log) if rank == 0 or world == 1 else None
    if world > 1:
        base = _broadcast_model(base, cfg, data)
    acc_dense = evaluate(base, data[2], data[3], cfg.batch_size)
    pruned = copy.deepcopy(base)
    prune_model(pruned, cfg.sparsity, cfg.pruning)
    masks = _masks(pruned)
    acc_pruned = evaluate(pruned, data[2], data[3], cfg.batch_size)
    log(f"pruned {len(masks)} layers to {cfg.sparsity:.0%} ({cfg.pruning}): test accuracy {acc_dense:.4f} -> "
        f"{acc_pruned:.4f}")  # fmt: skip
    shape = (max(cfg.batch_size // world, 1), *data[0].shape[1:])
    variants: list[Variant] = []
    fine = dict(epochs=cfg.epochs, batch=cfg.batch_size, lr=cfg.lr / 2, seed=cfg.seed + 1, rank=rank, world=world,
                progress=cfg.progress, cosine=True)  # fmt: skip

    def finish(v: Variant, model: nn.Module, dense_masks: dict) -> None:
        inner = model_mod(model)
        v.pruned_weights_zero = _pruned_weights_zero(inner, masks)
        if world > 1:
            v.ranks_identical = _same_on_every_rank(inner)
        variants.append(v)

    dense_variants = [("dense fp32", None)]
    skipped: dict[str, str] = {}
    if machine()["bf16_native"]:
        dense_variants.append(("dense bf16 autocast", torch.bfloat16))
    else:
        skipped["dense bf16 autocast"] = BF16_EMULATED
        log(f"dense bf16 autocast: skipped: {BF16_EMULATED}")
    if cfg.dense_compile and world > 1:
        for name, _ in dense_variants:
            skipped[f"{name} compiled"] = DENSE_COMPILE_DDP
        log(f"dense compiled variants: skipped: {DENSE_COMPILE_DDP}")
    elif cfg.dense_compile:
        dense_variants += [(f"{name} compiled", autocast) for name, autocast in dense_variants]
    runs: list[_FineTuning] = []
    for name, autocast in dense_variants:
        v = Variant(name)
        model = _ddp(copy.deepcopy(pruned), world)
        if name.endswith(" compiled"):
            model = _compiled(model, data[0][: cfg.batch_size], autocast, name, log, skipped)
            if model is None:
                continue
        epochs = training(model, v, data, masks=masks, autocast=autocast, log=log, **fine)
        runs.append(_FineTuning(v, model, epochs, masks, ours=False))
    # Every layer is a swap candidate, pruned or not: the swap keeps each where
    # it measured faster (the CNN's first convolution, one input channel, runs
    # 2-3x faster on the sparse kernels than in torch). An unpruned layer's
    # pattern is its nonzeros: all of its weights, unless one is exactly zero,
    # which would then stay zero; such a model's unpruned layers stay torch's
    # (min_sparsity 0.5).
    min_sparsity = 0.0 if _no_exact_zeros(pruned, masks) else 0.5
    for scheme in cfg.schemes:
        # Rank 0 times the layers and decides; the other ranks make the same
        # swaps from its plan (timings differ between processes).
        plan_file = os.path.join(cfg.out, f"swap_plan_{scheme}.json")
        model = copy.deepcopy(pruned)
        if rank == 0:
            # The tool keeps the kept-dense layers' zeros itself (train(masks=...)),
            # as before: no pruning hooks in the timed steps.
            model = swap_modules_with_sparse(
                model, shape, verbose=False, scheme=scheme, min_sparsity=min_sparsity, mask_kept=False
            )
            os.makedirs(cfg.out, exist_ok=True)
            save_swap_plan(model, plan_file)
        if world > 1:
            # The plan's text, not its file: ranks on other machines do not
            # share cfg.out. Each rank keeps a copy in its own cfg.out.
            text = [None]
            if rank == 0:
                with open(plan_file) as f:
                    text[0] = f.read()
            torch.distributed.broadcast_object_list(text, 0)
            if rank != 0:
                os.makedirs(cfg.out, exist_ok=True)
                with open(plan_file, "w") as f:
                    f.write(text[0])
                model = apply_swap_plan(model, plan_file, mask_kept=False)
        v = Variant(_VARIANT_NAMES[scheme])
        v.swapped = [r.name for r in model.qsparseprop_swap_report if r.swapped]
        unpruned = [n for n in v.swapped if n not in masks]
        also = f" and {len(unpruned)} unpruned ({', '.join(unpruned)}: faster on its kernels)" if unpruned else ""
        log(f"{v.name}: {len(v.swapped) - len(unpruned)} of {len(masks)} pruned layers swapped{also}")
        # The ReLUs between BatchNorm and a sparse layer keep bits, not their
        # fp32 output: the int8 layer's copy is then the activation's only one.
        use_masked_relus(model)
        kept_dense = {n: m for n, m in masks.items() if _kept_dense(model, n)}
        model = _ddp(model, world)
        epochs = training(model, v, data, masks=kept_dense, log=log, **fine)
        runs.append(_FineTuning(v, model, epochs, kept_dense, ours=True))
    # The variants' epochs in turn, the order rotated by one each epoch: the
    # machine's drift over minutes then moves every variant alike (one
    # variant after the other, three runs of the default job put int8 at
    # 1.24x-1.37x dense bf16 on a 2-core Xeon), and no variant always runs
    # right after the same one (code run right after AMX code is slower).
    log(f"fine-tuning {cfg.epochs} epochs of each variant, in turn: " + ", ".join(r.variant.name for r in runs))
    was = _C.profiling()
    _C.set_profiling(True)  # the share of each epoch inside the sparse layers' primitives
    try:
        for epoch in range(cfg.epochs):
            for i in range(len(runs)):
                next(runs[(i + epoch) % len(runs)].epochs)
        for r in runs:  # their ends: memory and the step's parts, measured
            for _ in r.epochs:
                pass
    finally:
        _C.set_profiling(was)
    for v, model, _, kept, ours in runs:
        if ours:
            later = slice(1, None) if len(v.epoch_s) > 1 else slice(None)
            v.sparse_share = sum(v.sparse_s[later]) / sum(v.epoch_s[later])
        finish(v, model, kept)
    saved = {}
    if rank == 0:
        for r in runs:
            saved[r.variant.name] = save_finetuned(r, cfg, data[0].shape[-1])
        log(f"fine-tuned models: {', '.join(saved.values())} (qsparseprop.finetune.load_finetuned(path) loads one)")
    return _report(cfg, variants, acc_dense, acc_pruned, rank, world, skipped, saved)


_FINETUNED_FORMAT = 1


def _finetuned_path(out: str, variant: str) -> str:
    return os.path.join(out, "finetuned_" + variant.replace(" ", "_") + ".pt")


def save_finetuned(r: _FineTuning, cfg: Config, image: int) -> str:
    """One variant's fine-tuned model, as cfg.out/finetuned_<variant>.pt: its
    state_dict with what rebuilds the model around it (the architecture's
    arguments, and for ours the swap plan), plain data that ``torch.load``
    reads with weights_only. Returns the path."""
    inner = model_mod(r.model)
    plan = [asdict(d) for d in inner.qsparseprop_swap_report] if r.ours else None
    path = _finetuned_path(cfg.out, r.variant.name)
    torch.save(
        dict(
            format=_FINETUNED_FORMAT, variant=r.variant.name, model=cfg.model, image=image, width=cfg.width,
            sparsity=cfg.sparsity, plan=plan, autocast="bfloat16" if "bf16" in r.variant.name else None,
            accuracy=r.variant.accuracy[-1], state_dict=inner.state_dict(),
        ),
        path,
    )  # fmt: skip
    return path


def load_finetuned(path: str | os.PathLike) -> nn.Module:
    """The model ``qsparseprop finetune`` saved as ``path``
    (``<out>/finetuned_<variant>.pt``), in eval mode: the architecture made
    again, the swapped variants' layers swapped again from their plan
    (``apply_swap_plan``, no timing), then the fine-tuned state loaded; its
    test accuracy is the report's. The bf16 variant was evaluated under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the file's ``autocast``)."""
    saved = torch.load(path, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != _FINETUNED_FORMAT:
        raise ValueError(f"{path}: not a model saved by qsparseprop finetune (format {_FINETUNED_FORMAT})")
    for key, kind, what in (
        ("model", str, "a string"), ("image", int, "an integer"), ("width", int, "an integer"),
        ("plan", (list, type(None)), "a list or None"), ("state_dict", dict, "a dict"),
    ):  # fmt: skip
        if not isinstance(saved.get(key), kind):
            raise ValueError(f"{path}: its {key!r} is missing or not {what}")
    model = make_model(saved["model"], saved["image"], saved["width"])
    if saved["plan"] is None:
        model.load_state_dict(saved["state_dict"])
    else:
        model = apply_swap_plan(model, saved["plan"], state_dict=saved["state_dict"], mask_kept=False)
        use_masked_relus(model)  # as it trained (the ReLUs keep bits for the backward)
    return model.eval()


def _compiled(model: nn.Module, x: torch.Tensor, autocast, name: str, log, skipped: dict) -> nn.Module | None:
    """torch.compile(model), compiled before its first timed epoch (as our
    layers are planned and tuned by the swap, before theirs): one training
    step's forward and backward on x, the model's state put back. None,
    with a line saying why, where torch.compile fails here (no C++ compiler
    for inductor, say) or its output is not the eager model's: the job goes
    on without the variant."""
    if line := inductor_caches_off_under_aten_cap():
        log(line)
    compiled = torch.compile(model)
    t = time.perf_counter()
    why = None
    try:
        with model_state_kept(model):
            model.train()
            with _autocast(autocast):
                out = compiled(x)
                with torch.no_grad():
                    reference = model(x)
            out.float().sum().backward()
        why = compiled_output_problem(out, reference, autocast is not None)
    except Exception as e:  # inductor's errors have no common base; any of them means no such variant here
        first = (str(e).strip().splitlines() or [""])[0][:200]
        why = f"torch.compile failed here ({type(e).__name__}: {first})"
    finally:
        for p in model.parameters():
            p.grad = None
    if why:
        skipped[name] = why
        log(f"{name}: skipped: {why}")
        return None
    log(f"{name}: compiled (inductor) in {time.perf_counter() - t:.1f} s, before its first epoch")
    return compiled


def model_mod(model: nn.Module) -> nn.Module:
    """The model itself: out of DDP's and torch.compile's wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _no_exact_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """Whether every Linear / Conv2d that was not pruned has no weight exactly
    zero (its nonzeros, the pattern a swap gives it, are then all of it)."""
    return all(
        bool(m.weight.detach().ne(0).all())
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in masks
    )


def _pruned_weights_zero(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """Every pruned weight is still exactly zero: layers that stayed dense are
    checked against the masks; sparse layers have no parameter for them (their
    dense view is zero outside the pattern, which must be the mask)."""
    for name, mask in masks.items():
        w = _weight_of(model, name).detach().reshape(mask.shape)
        if (w[~mask] != 0).any():
            return False
    return True


def _same_on_every_rank(model: nn.Module) -> bool:
    """Whether every rank holds the same parameters and buffers, bit for bit."""
    h = hashlib.sha256()
    for t in list(model.parameters()) + list(model.buffers()):
        h.update(t.detach().contiguous().numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


def _ddp(model: nn.Module, world: int) -> nn.Module:
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)  # buffers (BatchNorm statistics) from rank 0


def _broadcast_model(model, cfg, data):
    """Rank 0's pre-trained model to every rank."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = make_model(cfg.model, data[0].shape[-1], cfg.width)
    for t in list(model.parameters()) + list(model.buffers()):
        torch.distributed.broadcast(t.data, 0)
    return model


def _best(variants: list[Variant], name: str) -> Variant | None:
    return next((v for v in variants if v.name == name), None)


def _diverged(v: Variant) -> int | None:
    """The first epoch (from 1) whose mean training loss is NaN or infinite,
    or blew up: above 10 and ten times its first step's (a learning rate far
    too high: the model ends at chance with a finite loss); None where none
    did."""
    start = v.first_loss if v.first_loss is not None and math.isfinite(v.first_loss) else math.inf

    def blown(loss: float) -> bool:
        return not math.isfinite(loss) or (loss > 10.0 and loss > 10.0 * start)

    return next((i + 1 for i, loss in enumerate(v.losses) if blown(loss)), None)


def _report(
    cfg: Config, variants: list[Variant], acc_dense: float, acc_pruned: float, rank: int, world: int,
    skipped: dict[str, str] | None = None, saved: dict[str, str] | None = None,
) -> dict:  # fmt: skip
    def med(xs):  # epochs after the first (it pays plan building and tuning), median
        xs = sorted(xs[1:] if len(xs) > 1 else xs)
        return xs[len(xs) // 2]

    fp32 = _best(variants, "dense fp32")
    dense = [v for v in variants if v.name.startswith("dense ")]  # bf16 where native, compiled ones where run
    # A variant whose loss diverged (NaN, infinite, blown up) trained nothing:
    # its speed is no rival's (unless every dense one did so)
    rivals = [v for v in dense if not _diverged(v)] or dense
    best = min(rivals, key=lambda v: med(v.epoch_s))

    def eager(vs):
        return [v for v in vs if not v.name.endswith(" compiled")]

    best_eager = min(eager(rivals) or eager(dense), key=lambda v: med(v.epoch_s))
    rows = []
    for v in variants:
        e = med(v.epoch_s)
        rows.append(
            dict(
                variant=v.name, epoch_s=e, speedup_vs_fp32=med(fp32.epoch_s) / e,
                speedup_vs_best_dense=med(best.epoch_s) / e, speedup_vs_best_eager_dense=med(best_eager.epoch_s) / e,
                memory_mib=v.memory_bytes / 2**20, memory_vs_dense=v.memory_bytes / fp32.memory_bytes,
                accuracy=v.accuracy[-1],
                accuracy_vs_dense=v.accuracy[-1] / best.accuracy[-1] if best.accuracy[-1] else None,
                first_loss=v.first_loss, losses=v.losses, accuracy_curve=v.accuracy, wall_curve=v.wall,
                sparse_share=v.sparse_share, step_ms=v.step_ms,
                swapped_layers=v.swapped, pruned_weights_zero=v.pruned_weights_zero,
                saved=(saved or {}).get(v.name), diverged_epoch=_diverged(v),
            )
        )  # fmt: skip
    report = dict(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        machine=machine(), threads=torch.get_num_threads(), isa=cpu_isa(), world_size=world,
        accuracy_dense_unpruned=acc_dense, accuracy_pruned=acc_pruned, best_dense=best.name,
        best_eager_dense=best_eager.name, variants=rows,
        skipped=dict(skipped or {}),
    )  # fmt: skip
    if world > 1:
        report["ranks_identical"] = all(v.ranks_identical for v in variants)
        for row, v in zip(rows, variants, strict=True):
            row["ranks_identical"] = v.ranks_identical
    return report


def format_report(report: dict) -> str:
    head = (
        f"{'variant':<28} {'s/epoch':>8} {'x fp32':>7} {'x best':>7} {'memory':>10} {'x dense':>8} "
        f"{'accuracy':>9} {'% dense':>8} {'sparse %':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in report["variants"]:
        share = "-" if r["sparse_share"] is None else f"{100 * r['sparse_share']:.0f} %"
        acc = "-" if r["accuracy_vs_dense"] is None else f"{100 * r['accuracy_vs_dense']:.1f}"
        lines.append(
            f"{r['variant']:<28} {r['epoch_s']:>8.2f} {r['speedup_vs_fp32']:>7.2f} {r['speedup_vs_best_dense']:>7.2f} "
            f"{r['memory_mib']:>6.1f} MiB {r['memory_vs_dense']:>8.2f} {r['accuracy']:>9.4f} {acc:>8} {share:>9}"
        )
    rows = [r for r in report["variants"] if r.get("step_ms")]
    if rows:
        parts = list(rows[0]["step_ms"])
        head = f"{'where a step goes (ms)':<28}" + "".join(f" {p[:17]:>17}" for p in parts) + f" {'total':>8}"
        lines += ["", head, "-" * len(head)]
        for r in rows:
            ms = r["step_ms"]
            total = sum(ms.values())
            cells = "".join(f" {ms[p]:>8.1f} ({100 * ms[p] / total:>3.0f} %)" for p in parts)
            lines.append(f"{r['variant']:<28}{cells} {total:>8.1f}")
    for r in report["variants"]:
        if r["variant"].startswith("qsparseprop") and not r["swapped_layers"]:
            lines.append(f"note: {r['variant']}: no layer measured faster as a sparse layer, so the swap kept every "
                         "layer dense (its row is dense training); see swap_plan_*.json for the timings")  # fmt: skip
    for name, why in report.get("skipped", {}).items():
        lines.append(f"not run: {name}: {why}")
    for r in report["variants"]:
        if r.get("diverged_epoch"):
            rival = ""
            if r["variant"] == report["best_dense"]:
                rival = " (every dense variant did: the ratios are against a model that trained nothing)"
            elif r["variant"].startswith("dense "):
                rival = " (so not the best dense)"
            first = "-" if r["first_loss"] is None else f"{r['first_loss']:.4g}"
            loss = r["losses"][r["diverged_epoch"] - 1]
            lines.append(f"diverged: {r['variant']}: mean training loss {loss:.4g} in epoch {r['diverged_epoch']} "
                         f"(its first step's {first}): it trained nothing usable{rival}")  # fmt: skip
    if any(r["variant"].endswith(" compiled") and r.get("step_ms") for r in report["variants"]):
        lines.append("compiled rows: inductor's fused kernels (BatchNorm, ReLU, adds) count as other")
    if report.get("best_eager_dense", report["best_dense"]) != report["best_dense"]:
        ours = [r for r in report["variants"] if r["variant"].startswith("qsparseprop")]
        lines.append(
            f"best eager dense (not compiled): {report['best_eager_dense']}; against it "
            + ", ".join(f"{r['variant']} {r['speedup_vs_best_eager_dense']:.2f}x" for r in ours)
        )
    lines.append(
        f"best dense: {report['best_dense']}; accuracy dense {report['accuracy_dense_unpruned']:.4f}, "
        f"pruned {report['accuracy_pruned']:.4f}; memory = saved activations of a step + parameters, "
        "gradients and optimizer state; sparse % = share of training time inside qsparseprop's primitives; "
        "where a step goes: torch.profiler self CPU times over 3 steps, each op counted for its enclosing part"
    )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    start = report["accuracy_pruned"]  # every variant starts from the pruned model, at time 0
    for r in report["variants"]:
        ax.plot([0.0, *r["wall_curve"]], [start, *r["accuracy_curve"]], "-o", label=r["variant"])
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy")
    cfg = report["config"]
    ax.set_title(f"{cfg['model']} on {cfg['dataset']}, {cfg['sparsity']:.0%} sparse")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _config_from(a) -> Config:
    # --quick sets the sizes the command line leaves unsaid (an option given
    # wins: `--quick --epochs 2` runs two epochs)
    def given(value, default, quick):
        return value if value is not None else (quick if a.quick else default)

    train_images = given(a.train_images, DEFAULT_TRAIN_IMAGES, 6000)
    return Config(
        model=a.model, dataset=a.dataset, sparsity=a.sparsity, pruning=a.pruning, epochs=given(a.epochs, 2, 1),
        pretrain_epochs=given(a.pretrain_epochs, 2, 1), batch_size=a.batch_size, width=given(a.width, 24, 16),
        lr=a.lr, threads=a.threads, schemes=tuple(s.strip() for s in a.schemes.split(",")), seed=a.seed,
        out=a.out, data_dir=a.data_dir, progress=not a.no_progress, train_subset=train_images or None,
        test_subset=2000 if a.quick else None, dense_compile=a.dense_compile,
    )  # fmt: skip


def _say(line: str) -> None:
    print(line, flush=True)  # a line per phase reaches a pipe or a log at once


def _quiet(line: str) -> None:
    pass


def _worker(rank: int, world: int, cfg: Config, port: int, result_path: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = run(cfg, log=_say if rank == 0 else _quiet, rank=rank, world=world)
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(report, f)
    finally:
        torch.distributed.destroy_process_group()
    # Leave without finalizing the interpreter: gloo's worker threads may
    # still release the last reference of a collective's tensor (e.g. from
    # all_gather_object) after the main thread returned; during finalization
    # that thread cannot take the GIL, exits inside a noexcept destructor and
    # the process aborts ("terminate called without an active exception",
    # seen in about 1 of 10 test runs). Everything is written and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _publish(report: dict, a: argparse.Namespace) -> None:
    """The table on stdout, and the --json / --png files when asked for."""
    print(format_report(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.png:
        plot(report, a.png)


def _torchrun_ranks() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (env:// rendezvous: RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), else None."""
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    given = [n for n in names if os.environ.get(n)]
    if not given:
        return None
    if len(given) != len(names):
        missing = ", ".join(n for n in names if n not in given)
        raise SystemExit(f"qsparseprop finetune: {', '.join(given)} set but not {missing}: start it with torchrun")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise SystemExit("qsparseprop finetune: RANK and WORLD_SIZE must be integers") from None
    if not (world >= 1 and 0 <= rank < world):
        raise SystemExit(f"qsparseprop finetune: RANK {rank} is not in [0, WORLD_SIZE {world})")
    return rank, world


def _torchrun_main(a: argparse.Namespace, cfg: Config, rank: int, world: int) -> dict:
    """One process of a torchrun job (one or several machines): gloo over the
    env:// rendezvous; rank 0 prints the report and writes --json / --png."""
    torch.distributed.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        report = run(cfg, log=_say if rank == 0 else _quiet, rank=rank, world=world)
    finally:
        torch.distributed.destroy_process_group()
    if rank == 0:
        _publish(report, a)
    # As in _worker: leave without finalizing the interpreter (gloo's threads).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check_paths(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Every path the run will write or read, checked before any work (a bad
    --json used to fail after the whole run, losing its report): one argparse
    error naming the flag."""
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out!r} is a file; it names the cache and report directory")
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {a.out!r}: cannot create the directory ({e.strerror})")
    if not os.access(a.out, os.W_OK | os.X_OK):
        p.error(f"--out {a.out!r} is not writable")
    for flag in ("json", "png"):
        path = getattr(a, flag)
        problem = path and output_file_problem(path)
        if problem:
            p.error(f"--{flag} {path!r}: {problem}")
    if a.dataset == "fashion-mnist":
        if a.data_dir is not None and not os.path.isdir(a.data_dir):
            p.error(f"--data-dir {a.data_dir!r} is not a directory")
        missing = _fashion_mnist_missing(a.data_dir or FASHION_MNIST_DIR)
        if missing:
            p.error(missing)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="qsparseprop finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", choices=["cnn", "mlp", "transformer"], default="cnn")
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--data-dir", help=f"Fashion-MNIST's directory (default {FASHION_MNIST_DIR})")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pruning", choices=["layer", "global"], default="layer", help="magnitude, per layer or global")
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs per variant (default 2; --quick 1)")
    p.add_argument(
        "--pretrain-epochs", type=int, default=None, help="dense epochs before pruning, cached (default 2; --quick 1)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--width", type=int, default=None, help="first CNN stage's channels, MLP: hidden/16 (default 24; --quick 16)"
    )
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--schemes",
        default="f32,s8",
        help="qsparseprop variants: f32, s8, s8_outliers, auto (int8 or f32 per layer, whichever measures faster)",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=None,
        help=f"training images per epoch (default {DEFAULT_TRAIN_IMAGES}: the default run fits 10 minutes on 2 cores; "
        "--quick 6000; 0: the whole training set)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small run: 6000 training images, 1 epoch, narrow model (options given explicitly still apply)",
    )
    p.add_argument(
        "--dense-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fine-tune the dense variants under torch.compile (inductor; compiled before their first epoch); "
        "the best dense is the fastest of all (default: on; single-process runs)",
    )
    p.add_argument("--nproc", type=int, default=1, help="DistributedDataParallel processes (gloo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="qsparseprop-finetune", help="cache and report directory")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--png", help="draw accuracy vs training time here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not 0.0 < a.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    for flag in ("epochs", "pretrain_epochs", "batch_size", "nproc", "width"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.train_images is not None and a.train_images < 0:
        p.error(f"--train-images must be >= 0 (0: all), got {a.train_images}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    bad = [s for s in a.schemes.split(",") if s.strip() not in _VARIANT_NAMES]
    if bad:
        p.error(f"--schemes takes {', '.join(_VARIANT_NAMES)}; got {bad}")
    _check_paths(p, a)
    cfg = _config_from(a)
    launched = _torchrun_ranks()
    if launched and a.nproc > 1:
        p.error("--nproc starts processes itself; under torchrun leave it out (torchrun's --nproc-per-node)")
    if cfg.train_subset and cfg.train_subset < cfg.batch_size:  # (an epoch of whole batches only)
        p.error(f"--train-images {cfg.train_subset} is less than one batch (--batch-size {cfg.batch_size}): "
                "an epoch would have no step")  # fmt: skip
    processes = launched[1] if launched else a.nproc
    if cfg.batch_size < processes:  # each process takes its slice of every batch
        p.error(f"--batch-size {cfg.batch_size} gives some of the {processes} processes no images: "
                f"at least {processes}")  # fmt: skip
    m = machine()
    if not launched or launched[0] == 0:
        images = f"{cfg.train_subset} training images per epoch" if cfg.train_subset else "all training images"
        print(f"qsparseprop finetune: {cfg.model} on {cfg.dataset} ({images}), "
              f"{cfg.sparsity:.0%} sparse ({cfg.pruning}), "
              f"cpu={m['cpu']!r} amx={'yes' if m['amx'] else 'no'} threads={cfg.threads or torch.get_num_threads()} "
              f"isa={cpu_isa()} processes={processes}" + (" (torchrun)" if launched else ""), flush=True)  # fmt: skip
    if launched:
        return _torchrun_main(a, cfg, *launched)
    if a.nproc > 1:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if cfg.threads is None:
            cfg.threads = max(1, torch.get_num_threads() // a.nproc)
        os.makedirs(cfg.out, exist_ok=True)
        result = os.path.join(cfg.out, "ddp_report.json")
        mp.spawn(_worker, args=(a.nproc, cfg, port, result), nprocs=a.nproc, join=True)
        with open(result) as f:
            report = json.load(f)
    else:
        report = run(cfg, log=_say)
    _publish(report, a)
    return report


if __name__ == "__main__":
    main()
