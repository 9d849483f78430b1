"""Soak: swapped models train for a bounded time (QSP_SOAK_SECONDS, default
45) with batch sizes that change every step, layers created and dropped,
and two threads training their own models at once. Resident memory and
every cache stay bounded, and at the end each model computes exactly what a
fresh model built from its state computes."""

import copy
import gc
import os
import random
import threading
import time

import torch
from torch import nn

import qsparseprop
from conftest import prune_random_

SOAK_SECONDS = float(os.environ.get("QSP_SOAK_SECONDS", "45"))
RSS_GROWTH_BOUND = 96 << 20  # after warm-up; the scratch pool alone may keep 256 MiB idle, so this is tight


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    for layer in (m[2], m[5]):
        prune_random_(layer, 0.9, generator_seed=seed)
    shape = (8, 3, 8, 8)
    return qsparseprop.swap_modules_with_sparse(m, shape, verbose=False, min_sparsity=0.5, min_speedup=0.0,
                                                repeats=1, warmup=0, persistent=False)  # fmt: skip


def _train(model: nn.Module, seed: int, until: float, errors: list, steps: list) -> None:
    try:
        rng = random.Random(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        n = 0
        while time.monotonic() < until:
            batch = rng.choice([1, 2, 3, 5, 8, 13, 31, 64])
            x = torch.randn(batch, 3, 8, 8)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), torch.randint(0, 10, (batch,))).backward()
            opt.step()
            if n % 25 == 0:  # a layer created, used once and dropped
                extra = qsparseprop.QuantizedSparseLinear.from_dense(prune_random_(nn.Linear(48, 24), 0.8, n))
                extra(torch.randn(rng.randint(1, 9), 48)).sum().backward()
                del extra
            n += 1
        steps.append(n)
    except Exception as e:  # reported by the main thread
        errors.append(e)


def test_soak_memory_and_caches_stay_bounded_and_results_equal_a_fresh_model():
    models = [_model(1), _model(2)]
    # warm-up: every batch size once, so what follows allocates nothing new
    for m in models:
        for b in (1, 2, 3, 5, 8, 13, 31, 64):
            m(torch.randn(b, 3, 8, 8)).sum().backward()
    gc.collect()
    rss0 = _resident_bytes()
    errors, steps = [], []
    until = time.monotonic() + SOAK_SECONDS
    threads = [threading.Thread(target=_train, args=(m, i, until, errors, steps)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    peak, samples, t0 = rss0, [], time.monotonic()
    while any(t.is_alive() for t in threads):
        r = _resident_bytes()
        peak = max(peak, r)
        samples.append((time.monotonic() - t0, r - rss0))
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert not errors, errors
    assert min(steps) >= 20, f"too few steps to call this a soak: {steps}"
    gc.collect()
    growth = _resident_bytes() - rss0
    print(f"soak: {SOAK_SECONDS:.0f} s, steps per thread {steps}, resident growth {growth / 2**20:.1f} MiB "
          f"(peak {(peak - rss0) / 2**20:.1f} MiB over the warm-up's {rss0 / 2**20:.0f} MiB)")  # fmt: skip
    # no leak: the second half of the run adds (next to) nothing to what the first half reached
    half = [r for t, r in samples if t <= SOAK_SECONDS / 2]
    late = max((r for _, r in samples), default=0) - max(half, default=0)
    print(f"soak: growth in the second half {late / 2**20:.1f} MiB")
    assert late <= 16 << 20, f"resident memory still grows in the second half: +{late >> 20} MiB (a leak?)"
    assert growth <= RSS_GROWTH_BOUND, f"resident memory grew {growth >> 20} MiB (peak {(peak - rss0) >> 20} MiB)"
    for c in qsparseprop.cache_info():
        assert c["size"] <= c["capacity"], c
    s = qsparseprop.scratch_info()
    assert s["idle_bytes"] <= s["capacity_bytes"], s
    # the long-trained model and a fresh one from its state compute the same
    x = torch.randn(7, 3, 8, 8)
    for m in models:
        fresh = copy.deepcopy(m)  # new kernel slots: kernels rebuilt from the state
        m.eval()
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(m(x), fresh(x))
