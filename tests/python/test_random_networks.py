"""Random networks through the user's entry point: a stem, one to three
stages (the main job's residual block, torchvision's BasicBlock and
Bottleneck with their in-place adds, MobileNetV2's inverted residual with its
depthwise convolution and ReLU6, or a plain convolution with or without
BatchNorm and ReLU), pooling and a Linear or MLP head (ReLU or GELU), each
layer pruned to its own sparsity, handed to ``swap_modules_with_sparse`` as
a user would. Layers below ``min_sparsity`` stay dense (masked or not), so
sparse and dense layers meet in every combination the swap's fusions see:
BatchNorm after a dense convolution, residual ends, shared inputs, the int8
activation handed from one convolution to the next, the fused MLP. The swap
is told one batch size and trains on others, channels_last or not, the
input's gradient asked for or not. Random transformer encoders (torch's own
TransformerEncoderLayer: the Linear layers' 3-D inputs, LayerNorm,
attention, torch's fused inference path in eval) too.

f32 is as accurate as torch's fp32 against float64 (outputs, the input's
gradient, every parameter's gradient, a sparse layer's at its pattern;
running statistics against torch's; then eval: ``_judge_f32``); s8 equals
the same network swapped as the int8 prototype (the fused int8 blocks'
reference in ``test_fuse.py``), or, where a rounding flipped, is no further
from fp32 than the prototype (``_judge_int8`` says why). Drawn like
``test_properties.py`` (derandomized; QSP_PROPERTY_EXAMPLES /
QSP_PROPERTY_RANDOM for longer hunts)."""

import copy

import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st
from test_fuse import _InPlaceBasicBlock  # torchvision's BasicBlock, line for line
from torch import nn

from conftest import a_relu_input_near_a_kink, assert_close_rel, at_pattern, property_settings, torch_threads
from qsparseprop import ProjectedMultiheadAttention, swap_modules_with_sparse
from qsparseprop.finetune import _Residual

MIN_SPARSITY = 0.6  # layers drawn below it stay dense


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck forward (1x1, 3x3 with the stride, 1x1 to
    4x the width; `out += identity`; one ReLU module called three times)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        width = max(cout // 4, 1)
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, a depthwise 3x3 (groups = its
    channels) with the stride, ReLU6 (not fused), a 1x1 projection, the
    input added where the shape allows."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        hidden = 2 * cin
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


def _plain(cin, cout, stride, batch_norm, relu):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=not batch_norm)]
    layers += [nn.BatchNorm2d(cout)] if batch_norm else []
    layers += [nn.ReLU()] if relu else []
    return nn.Sequential(*layers)


# past a batch tile of 64 (and a vector of 16) now and then
batch_sizes = st.one_of(st.integers(1, 5), st.sampled_from([17, 65]))
layer_sparsities = st.lists(st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.95]), min_size=1, max_size=4)
# what both random tests draw alike
each_run = {
    "input_grad": st.booleans(),
    "threads": st.integers(1, 3),
    "scheme": st.sampled_from(["f32", "s8"]),
    "seed": st.integers(0, 2**16),
}

stages = st.lists(
    st.tuples(
        st.sampled_from(
            ["residual", "torchvision", "bottleneck", "inverted residual", "plain", "plain without BatchNorm"]
        ),
        st.integers(2, 16),  # output channels
        st.integers(1, 2),  # stride
        st.booleans(),  # the plain stage's ReLU
    ),
    min_size=1,
    max_size=3,
)


def _network(cin, width, stage_list, head, hidden):
    layers = [nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for kind, cout, stride, relu in stage_list:
        if kind == "residual":
            layers.append(_Residual(c, cout, stride))
        elif kind == "torchvision":
            layers.append(_InPlaceBasicBlock(c, cout, stride))
        elif kind == "bottleneck":
            layers.append(_Bottleneck(c, cout, stride))
        elif kind == "inverted residual":
            layers.append(_InvertedResidual(c, cout, stride))
        else:
            layers.append(_plain(c, cout, stride, kind == "plain", relu))
        c = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if head == "linear":
        layers.append(nn.Linear(c, 5))
    else:
        layers += [nn.Linear(c, hidden), nn.ReLU() if head == "mlp, relu" else nn.GELU(), nn.Linear(hidden, 5)]
    return nn.Sequential(*layers)


def _prepare(model, sparsities, seed):
    """Each layer pruned to its drawn sparsity at random positions, every
    output channel of a convolution keeping one weight (an empty one makes
    its BatchNorm normalize a constant channel: rounding noise scaled to
    order 1, no test of ours); BatchNorm's affine parameters random (with
    bias 0 an element at its channel's mean sits on the ReLU's edge)."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for i, m in enumerate(layers):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            keep = torch.rand(m.weight.shape, generator=g) >= sparsities[i % len(sparsities)]
            if isinstance(m, nn.Conv2d):
                rows = keep.view(keep.shape[0], -1)
                empty = ~rows.any(1)
                rows[empty, torch.randint(rows.shape[1], (int(empty.sum()),), generator=g)] = True
            m.weight.mul_(keep)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def _smallest_plane(model, shape):
    planes = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: planes.append(args[0][0, 0].numel()))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(shape))
    model.train()
    for h in hooks:
        h.remove()
    return min(planes)


def _sparse_enough(m):
    """Whether the swap (min_sparsity MIN_SPARSITY) takes this layer."""
    return (m.weight == 0).float().mean().item() >= MIN_SPARSITY


def _kept_1x1_strided(m):
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and not _sparse_enough(m)


def _inputs(shape, batches, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, *shape[1:], generator=g) for b in batches]
    return [x.contiguous(memory_format=torch.channels_last) if channels_last else x for x in xs]


def _gradients(model, reference):
    """(what, got, want) for every parameter: a swapped layer's values
    against the reference's weight gradient at its pattern (the reference
    dense: at the pattern; swapped too: the values), a kept layer's masked
    weight against the reference's gradient masked the same way, any other
    parameter (BatchNorm's, LayerNorm's, attention's) by its name; an
    attention the swap gave projections of its own against torch's, its
    projections against the rows of the packed in_proj_weight."""
    for name, got in model.named_modules():
        ref = _submodule_or_none(reference, name)
        if ref is None:  # a projection of an attention whose reference is torch's: see below
            continue
        if isinstance(got, ProjectedMultiheadAttention) and isinstance(ref, nn.MultiheadAttention):
            yield from _projections_against_packed(name, got, ref)
            continue
        if hasattr(got, "values"):
            want = ref.values.grad if hasattr(ref, "values") else at_pattern(ref.weight.grad, got)
            yield f"{name} values", got.values.grad, want
            own = ["bias"] if got.bias is not None else []
        elif hasattr(got, "weight_mask"):
            want = ref.weight_orig.grad if hasattr(ref, "weight_orig") else ref.weight.grad * got.weight_mask
            yield f"{name} weight (masked)", got.weight_orig.grad, want
            own = ["bias"] if got.bias is not None else []
        else:
            own = [p for p, _ in got.named_parameters(recurse=False)]
        for p in own:
            yield f"{name} {p}", getattr(got, p).grad, getattr(ref, p).grad


def _submodule_or_none(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _projections_against_packed(name, got, ref):
    grads = ref.in_proj_weight.grad.chunk(3) if ref._qkv_same_embed_dim else (
        ref.q_proj_weight.grad, ref.k_proj_weight.grad, ref.v_proj_weight.grad)  # fmt: skip
    biases = ref.in_proj_bias.grad.chunk(3) if ref.in_proj_bias is not None else (None,) * 3
    for proj, want, bias in zip(("q_proj", "k_proj", "v_proj"), grads, biases, strict=True):
        layer = getattr(got, proj)
        if hasattr(layer, "values"):
            yield f"{name}.{proj} values", layer.values.grad, at_pattern(want, layer)
        elif hasattr(layer, "weight_mask"):
            yield f"{name}.{proj} weight (masked)", layer.weight_orig.grad, want * layer.weight_mask
        else:
            yield f"{name}.{proj} weight", layer.weight.grad, want
        if bias is not None:
            yield f"{name}.{proj} bias", layer.bias.grad, bias


def _train_and_compare(model, references, xs, input_grad, judge):
    """Steps at the same weights (lr 0: rounding carried into the weights
    would compound over a network's BatchNorms), then eval; ``judge`` gets
    each step's output and gradients with those of every reference network
    (a float64 one takes its inputs in float64), and the running statistics
    against the first's."""
    reference = references[0]
    for step, x in enumerate(xs[:-1]):
        outs, grads_in = [], []
        for m in (model, *references):
            m.zero_grad(set_to_none=True)
            xi = x if m is model else x.contiguous().to(next(m.parameters()).dtype)
            xi = xi.clone().requires_grad_(input_grad)
            out = m(xi)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
            outs.append(out.detach())
            grads_in.append(xi.grad)
        gradients = [list(_gradients(model, other)) for other in references]
        if input_grad:
            for g, grad_in in zip(gradients, grads_in[1:], strict=True):
                g.append(("the input", grads_in[0], grad_in))
        for name, ref in reference.named_modules():
            if isinstance(ref, nn.BatchNorm2d):
                got = model.get_submodule(name)
                assert torch.equal(got.num_batches_tracked, ref.num_batches_tracked), name
        for what, got, _ in gradients[0]:
            assert got is not None, f"step {step}: {what} has no gradient"
            assert torch.isfinite(got).all(), f"step {step}: the gradient of {what} is not finite"
        for g in gradients[1:]:
            assert [what for what, _, _ in g] == [what for what, _, _ in gradients[0]]
        judge(f"step {step}", outs[0], outs[1:], gradients, list(_running_statistics(model, reference)))
    with torch.no_grad():
        model.eval()
        outs = [m.eval()(xs[-1].contiguous().to(next(m.parameters()).dtype)) for m in references]
        judge("eval", model(xs[-1]), outs, [[] for _ in references], [])


def _running_statistics(model, reference):
    for name, ref in reference.named_modules():
        if isinstance(ref, nn.BatchNorm2d):
            for buffer in ("running_mean", "running_var"):
                yield f"{name}.{buffer}", getattr(model.get_submodule(name), buffer), getattr(ref, buffer)


def _judge_f32(when, out, wants, gradients, statistics):
    """As accurate as torch's fp32: each of ours within twice torch's own
    distance from float64, plus 1e-3 of the scale — the output's range, a
    gradient that of the network's largest parameter gradient, the input's
    too (through a BatchNorm's backward a gradient can cancel to rounding
    noise of terms that size: over two values per channel BatchNorm's output
    is +-1 whatever its input, and its input's gradient is 0 but for
    rounding). Torch's own can be percents off: behind a ReLU6 that clips a
    channel nearly constant its BatchNorm amplifies rounding (found: a
    projection's gradient 2.6 % of its largest element from float64, ours
    4.8 % or 1.6 % depending on the tier)."""
    (o32, o64), (g32, g64) = wants, gradients
    _within_torchs_error(f"{when}: output", out, o32, o64, o64.abs().max().item())
    scale = max((w.abs().max().item() for _, _, w in g64 if w.numel()), default=0.0)
    for (what, g, w32), (_, _, w64) in zip(g32, g64, strict=True):
        _within_torchs_error(f"{when}: gradient of {what}", g, w32, w64, scale)
    for what, g, w in statistics:
        assert_close_rel(g, w, 1e-3, f"{when}: {what}")


def _within_torchs_error(what, ours, torch32, exact, scale):
    if not exact.numel():
        return
    err = (ours - exact).abs().max().item()
    torchs = (torch32 - exact).abs().max().item()
    assert err <= 2 * torchs + 1e-3 * scale + 1e-6, (
        f"{what}: {err:.3g} from float64, torch's fp32 {torchs:.3g} (of {scale:.3g})"
    )


def _judge_int8(when, out, wants, gradients, statistics):
    """Against the prototype, element by element within the int8 tolerance
    of test_fuse.py (3 % of the network's largest gradient): the same
    integers, mostly (within 2e-6 of that scale in 9 steps of 10, 4e-5 in 99
    of 100, over 600 steps measured). But the
    two compute BatchNorm in fp32 each its own way, and a last-bit
    difference can flip one rounding to int8 (one forward activation, or
    one element of a gradient whose scale then moves): what follows are then
    different draws of the scheme's stochastic rounding, apart by its own
    error (found: 17 % of the largest gradient in one element, with each
    side 15-25 % from fp32; on a batch of 4, 20-70 % of several tensors'
    norms, each side as far from fp32). Such a step is judged as a draw: its
    gradients together no further from the fp32 network's than the
    prototype's are (1.5x, plus 5 % of their norm: in 1400 steps compared
    the ratio was 1.00-1.13 where they differed), its outputs within 3 % of
    their range (at most 0.75 % found). A wrong tensor is far from both."""
    (want, _), (gradients, fp32_gradients) = wants, gradients
    assert_close_rel(out, want, 3e-2, f"{when}: output")
    for what, g, w in statistics:
        assert_close_rel(g, w, 1e-2, f"{when}: {what}")
    if not gradients:
        return
    scale = max((w.abs().max().item() for _, _, w in gradients if w.numel()), default=0.0)
    if all((g - w).abs().max().item() <= 3e-2 * scale + 1e-6 for _, g, w in gradients if w.numel()):
        return
    event("int8: a rounding flipped, judged as a draw")
    flat = {name: torch.cat([t.flatten() for t in ts]) for name, ts in (
        ("ours", [g for _, g, _ in gradients]),
        ("prototype", [w for _, _, w in gradients]),
        ("fp32", [w for _, _, w in fp32_gradients]),
    )}  # fmt: skip
    ours, prototype = (flat[k] - flat["fp32"] for k in ("ours", "prototype"))
    bound = 1.5 * prototype.norm().item() + 0.05 * flat["fp32"].norm().item()
    assert ours.norm().item() <= bound, (
        f"{when}: the gradients {ours.norm().item():.3g} from fp32's in norm, the prototype's "
        f"{prototype.norm().item():.3g} (of {flat['fp32'].norm().item():.3g})"
    )


@property_settings(12)
@given(
    cin=st.integers(1, 3),
    width=st.integers(2, 16),
    stage_list=stages,
    head=st.sampled_from(["linear", "mlp, relu", "mlp, gelu"]),
    hidden=st.integers(1, 40),
    hw=st.tuples(st.integers(3, 17), st.integers(3, 17)),
    swap_batch=st.integers(1, 4),
    batches=st.lists(batch_sizes, min_size=2, max_size=2),
    sparsities=layer_sparsities,
    channels_last=st.booleans(),
    mask_kept=st.booleans(),
    **each_run,
)
def test_random_networks_swapped_train_as_their_references(
    cin, width, stage_list, head, hidden, hw, swap_batch, batches, sparsities, channels_last, input_grad,
    mask_kept, threads, scheme, seed,
):  # fmt: skip
    with torch_threads(threads):
        _check_random_network(
            cin, width, stage_list, head, hidden, hw, swap_batch, batches, sparsities, channels_last, input_grad,
            mask_kept, scheme, seed,
        )  # fmt: skip


def _check_random_network(
    cin, width, stage_list, head, hidden, hw, swap_batch, batches, sparsities, channels_last, input_grad,
    mask_kept, scheme, seed,
):  # fmt: skip
    torch.manual_seed(seed)
    dense = _network(cin, width, stage_list, head, hidden)
    _prepare(dense, sparsities, seed)
    shape = (swap_batch, cin, *hw)
    # BatchNorm's training needs two values per channel (f32 draws 4+: over
    # two its output is +-1 whatever its input, and every gradient before it
    # is rounding noise); s8 16+: over a handful one flip of dY's stochastic
    # rounding is a large part of the gradients (test_fuse.py's random
    # blocks). The swap's batch too: it runs the network, in training mode.
    assume(min(*batches, swap_batch) * _smallest_plane(dense, shape) >= (4 if scheme == "f32" else 16))
    xs = _inputs(shape, [*batches, 3], channels_last, seed)
    assume(not a_relu_input_near_a_kink(dense, [x.contiguous() for x in xs]))
    # torch 2.13's own 1x1 strided convolution crashes on some channels_last
    # inputs (test_properties.py); the reference runs on contiguous copies,
    # and a layer of that kind the swap keeps dense would meet the crash in
    # the swapped network
    assume(not (channels_last and any(_kept_1x1_strided(m) for m in dense.modules())))

    event(f"ran: {scheme}, {'channels_last' if channels_last else 'contiguous'}")

    def swapped(**options):
        return swap_modules_with_sparse(
            copy.deepcopy(dense), shape, verbose=False, min_sparsity=MIN_SPARSITY, min_speedup=0.0, repeats=1,
            warmup=0, persistent=False, mask_kept=mask_kept, **options,
        )  # fmt: skip

    _swap_train_and_compare(dense, swapped, scheme, xs, input_grad)


def _swap_train_and_compare(dense, swapped, scheme, xs, input_grad, swappable=lambda name: True):
    """``swapped(scheme=...)`` (min_speedup 0: every layer sparse enough, of
    those named ``swappable``, is swapped) trained and judged against its
    references: f32 against torch's fp32 and float64, s8 against the
    prototype swapped as the same layers (the swap seeds both alike) and
    fp32."""
    model = swapped(scheme=scheme)
    for name, m in dense.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and swappable(name):
            assert hasattr(model.get_submodule(name), "values") == _sparse_enough(m), name
    if scheme == "f32":
        _train_and_compare(model, [dense, copy.deepcopy(dense).double()], xs, input_grad, _judge_f32)
    else:
        _train_and_compare(model, [swapped(scheme="s8", prototype=True), dense], xs, input_grad, _judge_int8)


def _encoder(features, d, heads, ff, depth, activation, norm_first, batch_first):
    act = nn.ReLU() if activation == "relu" else nn.GELU()  # modules: the kink check finds a ReLU
    layer = nn.TransformerEncoderLayer(
        d, heads, ff, dropout=0.0, activation=act, batch_first=batch_first, norm_first=norm_first
    )
    encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    return nn.Sequential(nn.Linear(features, d), encoder, nn.Linear(d, 5))


# Random transformer encoders (the Linear layers' 3-D inputs, torch's own
# layer with its fused inference path, LayerNorm, attention), judged as the
# networks above.
@property_settings(8)
@given(
    features=st.integers(1, 8),
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 8),
    ff=st.integers(1, 64),
    depth=st.integers(1, 2),
    activation=st.sampled_from(["relu", "gelu"]),
    norm_first=st.booleans(),
    batch_first=st.booleans(),
    tokens=st.integers(1, 9),
    batches=st.lists(batch_sizes, min_size=3, max_size=3),
    sparsities=layer_sparsities,
    **each_run,
)
def test_random_transformer_encoders_swapped_train_as_their_references(
    features, heads, head_dim, ff, depth, activation, norm_first, batch_first, tokens, batches, sparsities,
    input_grad, threads, scheme, seed,
):  # fmt: skip
    torch.manual_seed(seed)
    dense = _encoder(features, heads * head_dim, heads, ff, depth, activation, norm_first, batch_first)
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, m in enumerate(layers):
            m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsities[i % len(sparsities)])

    def shaped(b):
        return (b, tokens, features) if batch_first else (tokens, b, features)

    xs = [torch.randn(shaped(b), generator=g) for b in batches]
    assume(not a_relu_input_near_a_kink(dense, [x.contiguous() for x in xs]))
    event(f"ran: {scheme}")

    def swapped(**options):
        return swap_modules_with_sparse(
            copy.deepcopy(dense), shaped(batches[0]), verbose=False, min_sparsity=MIN_SPARSITY, min_speedup=0.0,
            repeats=1, warmup=0, persistent=False, **options,
        )  # fmt: skip

    with torch_threads(threads):  # (a sparse out_proj: the attention gets projections of its own)
        _swap_train_and_compare(dense, swapped, scheme, xs, input_grad)
