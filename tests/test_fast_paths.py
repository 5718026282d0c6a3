"""Exactness of the fast paths against their plain definitions (outputs and gradients), not their speed.

References are independent of the code under test: PyTorch's own pooling (functional and modules), autograd through
the literal Eq. 1 sum (`MetaPooling.forward_plain`), a conv-based Coordinate-Attention forward written out here, and
the un-rewritten model for the deploy rewrite.
"""
import itertools
import math
from functools import partial
from typing import Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm
from timm.utils.model import reparameterize_model

import timm_metapool  # noqa: F401  (registers the models)
from timm_metapool.deploy import ProjectionAvgPool
from timm_metapool.kernels import (
    _BOX_FILTER_MIN_NUMEL, BoxMixtureConv, WeightedMaxChain, apply_gates, chunked_dot, directional_means,
    sum_over_height, sum_over_width)
from timm_metapool.mixed_op import MetaPooling, linear_pool_basis
from timm_metapool.ops import OP_NAMES, GlobalContextEnhancer, create_op, pool_kernel_size

SMALL_SHAPES = [(2, 8, 9, 7), (3, 5, 1, 1), (2, 6, 2, 3), (1, 4, 5, 1)]


def distinct_input(shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Values all distinct within each (n, c) plane, so every pooling window has a unique maximum."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    ranks = torch.rand(n, c, h * w, generator=gen).argsort(dim=-1).to(dtype)
    return (ranks / (h * w) - 0.5).view(n, c, h, w) + torch.randn(n, c, 1, 1, generator=gen, dtype=dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def outputs_and_grads(mp: MetaPooling, forward, x: torch.Tensor, seed: int = 1,
                      cotangent: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Output, d/dx and d/dalpha of <forward(x), g> for a fixed random cotangent g (or `cotangent`)."""
    x = x.detach().requires_grad_(True)
    mp.arch_alpha.grad = None
    out = forward(x)
    g = cotangent if cotangent is not None else torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), x.grad, mp.arch_alpha.grad.clone()


def make_mixed(channels: int, op_names: Sequence[str] = OP_NAMES, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    mp = MetaPooling(channels, op_names=op_names).to(dtype)
    with torch.no_grad():
        mp.arch_alpha.normal_()  # far from uniform, so a wrong weight-to-op pairing shows
    return mp


@pytest.mark.parametrize('shape', SMALL_SHAPES)
def test_linear_basis_matches_avg_pool(shape):
    x = torch.randn(shape, dtype=torch.float64)
    names = ('skip', 'avg3', 'avg5', 'avg7')
    masks, areas = linear_pool_basis(names)
    for i, name in enumerate(names):
        kernel = masks[i].to(x.dtype) / areas[i].to(x.dtype)
        size = kernel.shape[-1]
        got = F.conv2d(x, kernel.expand(shape[1], 1, size, size), padding=size // 2, groups=shape[1])
        if name == 'skip':
            expected = x
        else:
            k = pool_kernel_size(name)
            expected = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=True)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape', [(1, 2, 4, 3), (2, 3, 1, 1), (1, 2, 5, 1), (2, 3, 7, 6)])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_box_mixture_conv_gradcheck(layout, shape):
    # The coefficients' gradients are window sums of x dotted with the output gradient, not a contracted kernel
    # gradient; gradcheck compares both gradients with finite differences. Masks cropped as MetaPooling crops them.
    names = ('skip', 'avg3', 'avg7')
    masks, _ = linear_pool_basis(names)
    size = masks.shape[-1]
    kh, kw = min(size, 2 * shape[2] - 1), min(size, 2 * shape[3] - 1)
    masks = masks[:, (size - kh) // 2:(size + kh) // 2, (size - kw) // 2:(size + kw) // 2].double()
    sizes = tuple(1 if n == 'skip' else pool_kernel_size(n) for n in names)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    coeffs = torch.randn(len(names), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: BoxMixtureConv.apply(x, c, masks, sizes), (x, coeffs))
    # and the coefficients' gradient is skipped, not wrong, when they need none
    out = BoxMixtureConv.apply(x, coeffs.detach(), masks, sizes)
    out.sum().backward()
    assert x.grad is not None and coeffs.grad is None


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_chunked_dot_is_accurate(layout):
    """The max chain's weight gradients: a float32 dot over the (16, 96, 112, 112) map of the speed target, with
    the all-ones cotangent of `out.sum()`, against float64 (a single BLAS dot is off by ~3e-5 here)."""
    shape = (16, 96, 112, 112)
    a = torch.ones(shape).contiguous(memory_format=layout)
    b = F.max_pool2d(distinct_input(shape), 3, stride=1, padding=1).contiguous(memory_format=layout)
    expected = (a.double() * b.double()).sum()
    assert abs(float(chunked_dot(a, b)) - float(expected)) <= 1e-6 * abs(float(expected))
    small = distinct_input((3, 5, 7, 2), dtype=torch.float64)  # fewer elements than one chunk
    torch.testing.assert_close(chunked_dot(small, small), (small * small).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize('shape', SMALL_SHAPES)
def test_max_chain_matches_max_pool(shape):
    x = distinct_input(shape, dtype=torch.float64)
    mp = make_mixed(shape[1], op_names=('max3', 'max5', 'max7'), dtype=torch.float64)
    weights = mp.probabilities().detach()
    expected = sum(w * F.max_pool2d(x, k, stride=1, padding=k // 2) for w, k in zip(weights, (3, 5, 7)))
    torch.testing.assert_close(mp(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape', SMALL_SHAPES)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('chain', [(0, 1, 2), (None, 0), (0, None, 1), (None, None, 0)])  # as MetaPooling builds
def test_max_chain_function_in_either_layout(chain, layout, shape):
    """The chained max pools against autograd through PyTorch's pooling, with x in either layout: on CPU the mixed
    op hands them a channels-last map, elsewhere (CUDA) the map as it comes, which this covers on CPU."""
    x = distinct_input(shape, dtype=torch.float64).contiguous(memory_format=layout)
    weights = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)[:sum(i is not None for i in chain)]
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for fused in (True, False):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
        wi = weights.clone().requires_grad_(True)
        if fused:
            out = WeightedMaxChain.apply(torch.zeros_like(xi), xi, wi, chain)
        else:
            out, level = torch.zeros_like(xi), xi
            for i in chain:
                level = F.max_pool2d(level, 3, stride=1, padding=1)
                out = out + wi[i] * level if i is not None else out
        (out * g).sum().backward()
        results.append((out.detach(), xi.grad, wi.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# Maps of at least `_BOX_FILTER_MIN_NUMEL` elements, where `avgK` runs as a box-kernel conv on CPU: odd sizes, and
# maps narrower than the window (the kernel cropped to `reachable_window`, 1x1 included).
BOX_FILTER_SHAPES = [(2, 64, 10, 7), (4, 1024, 2, 1), (1, 8192, 1, 1)]


def test_box_filter_shapes_reach_the_conv():
    assert min(math.prod(shape) for shape in BOX_FILTER_SHAPES) >= _BOX_FILTER_MIN_NUMEL
    assert max(math.prod(shape) for shape in SMALL_SHAPES) < _BOX_FILTER_MIN_NUMEL


@pytest.mark.parametrize('shape', SMALL_SHAPES + [(2, 3, 16, 16), (1, 2, 3, 8)] + BOX_FILTER_SHAPES)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('name', ['max3', 'max5', 'max7', 'avg3', 'avg5', 'avg7'])
@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_fixed_local_enhancers_match_torch_pooling(name, layout, shape):
    """A fixed `maxK` / `avgK` slot (channels-last max pooling, box-kernel depthwise conv on CPU) against PyTorch's
    own pooling: output, input gradient and output layout, also TorchScript-compiled."""
    k = pool_kernel_size(name)
    reference = (nn.MaxPool2d(k, stride=1, padding=k // 2) if name.startswith('max')
                 else nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=True))
    op = create_op(name, shape[1])
    x = distinct_input(shape, dtype=torch.float64).contiguous(memory_format=layout)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for module in (op, torch.jit.script(op), reference):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
        out = module(xi)
        (out * g).sum().backward()
        assert out.is_contiguous(memory_format=layout)
        results.append((out.detach(), xi.grad))
    for result in results[:2]:
        for got, expected in zip(result, results[2]):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def bfloat16_exact_input(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Float32 values that bfloat16 holds exactly and that are distinct within each (n, c) plane (planes of at most
    256 pixels: small integers over 16), so rounding to bfloat16 makes no ties in the max pools."""
    n, c, h, w = shape
    ranks = torch.rand(n, c, h * w, generator=torch.Generator().manual_seed(seed)).argsort(dim=-1).float()
    return ((ranks - h * w // 2) / 16).view(n, c, h, w)


@pytest.mark.parametrize('input_dtype', [torch.float32, torch.bfloat16])
def test_fused_matches_plain_under_autocast(input_dtype):
    """Under autocast (the search's --amp) the fused mixed op and the fixed local enhancers keep the dtype their
    plain definitions give (pooling keeps x's dtype; the rewrites' convs must not be cast to bfloat16), and their
    values and gradients are as close to a float64 reference as the plain definitions' under autocast."""
    shape = (2, 8, 9, 7)
    x = bfloat16_exact_input(shape).to(input_dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exact = make_mixed(shape[1], dtype=torch.float64)
    reference = outputs_and_grads(exact, exact.forward_plain, x.double(), cotangent=g.double())
    mp = make_mixed(shape[1])
    results = []
    for forward in (mp.forward, mp.forward_plain):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            results.append(outputs_and_grads(mp, forward, x, cotangent=g))
    fast, plain = results
    assert [t.dtype for t in fast] == [t.dtype for t in plain] == [input_dtype, input_dtype, torch.float32]
    for got, baseline, expected in zip(fast, plain, reference):  # both within four units of bfloat16 rounding
        assert rel_err(got.double(), expected) <= 2 ** -6
        assert rel_err(baseline.double(), expected) <= 2 ** -6

    for name in ('max3', 'max7', 'avg3', 'avg7'):
        op = create_op(name, shape[1])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out, expected = op(x), op.forward_plain(x)
        assert out.dtype == expected.dtype == input_dtype
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('shape', SMALL_SHAPES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_fused_matches_plain_all_ops(shape, dtype):
    mp = make_mixed(shape[1], dtype=dtype)
    x = distinct_input(shape, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for fast, plain in zip(outputs_and_grads(mp, mp.forward, x), outputs_and_grads(mp, mp.forward_plain, x)):
        assert rel_err(fast, plain) <= tol


def test_fused_matches_plain_subsets():
    """Candidate subsets a MetaPooling may be built with: every pair, and random larger subsets in random order
    (the order decides which logit goes with which op). float64 on an odd-sized map."""
    shape = (2, 3, 7, 5)
    x = distinct_input(shape, dtype=torch.float64)
    rng = torch.Generator().manual_seed(0)
    subsets = [list(pair) for pair in itertools.combinations(OP_NAMES, 2)]
    for _ in range(24):
        order = torch.randperm(len(OP_NAMES), generator=rng).tolist()
        size = int(torch.randint(3, len(OP_NAMES) + 1, (1,), generator=rng))
        subsets.append([OP_NAMES[i] for i in order[:size]])
    for names in subsets:
        mp = make_mixed(shape[1], op_names=names, dtype=torch.float64, seed=len(names))
        fast = outputs_and_grads(mp, mp.forward, x)
        plain = outputs_and_grads(mp, mp.forward_plain, x)
        for a, b in zip(fast, plain):
            assert rel_err(a, b) <= 1e-12, names


@pytest.mark.parametrize('shape', [(2, 6, 9, 7), (2, 6, 3, 3)])
@pytest.mark.parametrize('needs', ['x_only', 'alpha_only'])
def test_fused_matches_plain_partial_grads(shape, needs):
    """PMPL's weight pass (alpha frozen: only x needs a gradient) and an alpha-only pass take their own branches
    in the fused backward; both against autograd through the plain sum."""
    torch.manual_seed(0)
    mp = make_mixed(shape[1], dtype=torch.float64)
    mp.arch_alpha.requires_grad_(needs == 'alpha_only')
    x = distinct_input(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    results = []
    for forward in (mp.forward, mp.forward_plain):
        xi = x.clone().requires_grad_(needs == 'x_only')
        mp.arch_alpha.grad = None
        out = forward(xi)
        (out * g).sum().backward()
        results.append((out.detach(), xi.grad if needs == 'x_only' else mp.arch_alpha.grad))
    for got, expected in zip(*results):
        assert rel_err(got, expected) <= 1e-12


def test_fused_channels_last_input_matches_plain():
    """A channels-last input (timm's --channels-last) gives the plain sum's outputs and gradients."""
    mp = make_mixed(6, dtype=torch.float64)
    x = distinct_input((2, 6, 8, 7), dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for fast, plain in zip(outputs_and_grads(mp, mp.forward, x), outputs_and_grads(mp, mp.forward_plain, x)):
        assert rel_err(fast, plain) <= 1e-12


@pytest.mark.parametrize('shape', [(128, 96, 16, 16), (16, 96, 112, 112)])
def test_fused_matches_plain_issue_shapes(shape):
    """The shapes of the speed target, float32, within 1e-5 relative."""
    mp = make_mixed(shape[1])
    x = distinct_input(shape)
    for fast, plain in zip(outputs_and_grads(mp, mp.forward, x), outputs_and_grads(mp, mp.forward_plain, x)):
        assert rel_err(fast, plain) <= 1e-5


def test_fixed_mixed_op_is_the_chosen_op():
    shape = (2, 4, 6, 5)
    x = torch.randn(shape)
    for index, name in enumerate(OP_NAMES):
        mp = make_mixed(shape[1])
        op = mp.fix(index)
        op.eval()
        torch.testing.assert_close(mp(x), op(x), rtol=0, atol=0)
        assert list(mp.ops) == [name]


def test_mixed_op_state_dict_unchanged():
    """The fused path's helper buffers are not persistent: saved supernets keep their keys."""
    mp = MetaPooling(16)
    assert all(not key.startswith('linear_') for key in mp.state_dict())


def _coord_attention_reference(gce: GlobalContextEnhancer, x: torch.Tensor) -> torch.Tensor:
    """The Coordinate-Attention forward with the enhancer's own 1x1 convs on (N, C, L, 1) columns."""
    height = x.shape[2]
    y = torch.cat([x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True).transpose(2, 3)], dim=2)
    y = gce.act(gce.bn(F.conv2d(y, gce.conv_reduce.weight, gce.conv_reduce.bias)))
    a_h = F.conv2d(y[:, :, :height], gce.conv_h.weight, gce.conv_h.bias).sigmoid()
    a_w = F.conv2d(y[:, :, height:], gce.conv_w.weight, gce.conv_w.bias).sigmoid().transpose(2, 3)
    return x * a_h * a_w


@pytest.mark.parametrize('shape', SMALL_SHAPES + [(4, 64, 3, 8)])
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_global_enhancer_matches_conv_reference(shape, train, layout):
    """Outputs, input and parameter gradients and BN statistics of the lean enhancer and of `forward_plain` against
    a conv-based Coordinate-Attention forward; for NCHW and channels-last maps, whose layout the output keeps."""
    torch.manual_seed(0)
    gce = GlobalContextEnhancer(shape[1]).double().train(train)
    with torch.no_grad():  # non-trivial BN statistics for eval mode
        gce.bn.running_mean.normal_()
        gce.bn.running_var.uniform_(0.5, 2.)
    ref = GlobalContextEnhancer(shape[1]).double().train(train)
    ref.load_state_dict(gce.state_dict())
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    unfused = GlobalContextEnhancer(shape[1]).double().train(train)
    unfused.load_state_dict(gce.state_dict())
    results = []
    for module, forward in ((gce, gce), (unfused, unfused.forward_plain),
                            (ref, lambda t: _coord_attention_reference(ref, t))):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
        out = forward(xi)
        out.pow(2).sum().backward()
        assert out.is_contiguous(memory_format=layout)
        results.append([out.detach(), xi.grad] + [p.grad for p in module.parameters()]
                       + [module.bn.running_mean.clone(), module.bn.running_var.clone()])
    for fast, plain, reference in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(plain, reference, rtol=1e-10, atol=1e-12)


def _trained_looking_enhancer(channels: int, seed: int = 0) -> GlobalContextEnhancer:
    """A float64 enhancer in eval mode with non-trivial BN affine and running statistics, so that a wrong fold or a
    BN in the wrong place changes the outputs."""
    torch.manual_seed(seed)
    gce = GlobalContextEnhancer(channels).double().eval()
    with torch.no_grad():
        gce.bn.weight.uniform_(0.5, 1.5)
        gce.bn.bias.normal_()
        gce.bn.running_mean.normal_()
        gce.bn.running_var.uniform_(0.5, 2.)
    return gce


INFERENCE_SHAPES = SMALL_SHAPES + [(1, 64, 3, 8), (1, 16, 20, 18), (3, 16, 17, 16)]


@pytest.mark.parametrize('shape', INFERENCE_SHAPES)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_inference_and_fused_enhancer_match_conv_reference(shape, layout):
    """Without autograd NCHW gates come from column GEMMs (W @ z); `fuse()` folds BN into `conv_reduce`. Both give
    the conv-based Coordinate-Attention forward's outputs in eval mode, in the map's layout, and `fuse()` leaves the
    enhancer it was called on untouched."""
    gce = _trained_looking_enhancer(shape[1])
    state = {k: v.clone() for k, v in gce.state_dict().items()}
    fused = gce.fuse()
    assert isinstance(fused.bn, torch.nn.Identity) and not fused.training
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        expected = _coord_attention_reference(gce, x)
        for module in (gce, fused):
            got = module(x)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
            assert got.is_contiguous(memory_format=layout)
            gates = module.gates(x)
            assert all(gate.is_contiguous(memory_format=layout) for gate in gates)
    assert all(torch.equal(v, state[k]) for k, v in gce.state_dict().items())
    assert isinstance(gce.bn, torch.nn.BatchNorm2d)
    out = fused(x.clone().requires_grad_(True))  # the fused copy still runs with autograd (the rows path)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-10, atol=1e-12)


def test_train_mode_without_autograd_updates_bn_as_with_it():
    """A train-mode forward without autograd (column GEMMs) takes BN statistics over the same batch and positions
    as one with autograd (rows): the same outputs and running statistics."""
    shape = (3, 16, 9, 7)
    x = torch.randn(shape, dtype=torch.float64)
    results = []
    for grad in (True, False):
        gce = _trained_looking_enhancer(shape[1]).train()
        with torch.set_grad_enabled(grad):
            out = gce(x)
        results.append((out.detach(), gce.bn.running_mean, gce.bn.running_var))
    for with_grad, without in zip(*results):
        torch.testing.assert_close(without, with_grad, rtol=1e-10, atol=1e-12)
    assert not torch.equal(results[0][1], _trained_looking_enhancer(shape[1]).bn.running_mean)  # they moved


def test_fuse_without_running_statistics_keeps_the_norm():
    """BN without running statistics normalises by the batch at inference too: nothing to fold, copied as is."""
    gce = GlobalContextEnhancer(8, norm_layer=partial(torch.nn.BatchNorm2d, track_running_stats=False)).eval()
    fused = gce.fuse()
    assert isinstance(fused.bn, torch.nn.BatchNorm2d) and fused is not gce
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gce(x), rtol=0, atol=0)


@pytest.mark.parametrize('shape', SMALL_SHAPES + [(2, 3, 8, 8), (2, 3, 9, 8), (2, 3, 16, 16), (2, 3, 17, 16),
                                   (1, 2, 40, 7)])
@pytest.mark.parametrize('needs_grad', [(True, True, True), (True, False, False), (False, True, True)])
def test_apply_gates_matches_broadcast_product(shape, needs_grad):
    """The lean gate product (flat GEMM path up to 64 pixels, broadcast path up to 256, batched mat-vec gradients
    above) against autograd through x * a_h * a_w, for each subset of inputs needing grads."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=gen, dtype=torch.float64),
              torch.rand(n, c, h, 1, generator=gen, dtype=torch.float64),
              torch.rand(n, c, 1, w, generator=gen, dtype=torch.float64)]
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for forward in (apply_gates, lambda x, a_h, a_w: x * a_h * a_w):
        leaves = [t.clone().requires_grad_(r) for t, r in zip(inputs, needs_grad)]
        out = forward(*leaves)
        (out * g).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, expected in zip(*results):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(apply_gates, [t.clone().requires_grad_(r) for t, r in zip(inputs, needs_grad)])


def test_apply_gates_layouts_and_dtypes_match_plain_product():
    """Channels-last maps with gates in either layout (lean path for channels-last gates) and mixed dtypes (plain
    path) give what the plain product gives: the same values, dtype and layout, and the same gradients."""
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    a_h, a_w = torch.rand(2, 8, 5, 1, dtype=torch.float64), torch.rand(2, 8, 1, 6, dtype=torch.float64)
    a_h_cl, a_w_cl = (t.contiguous(memory_format=torch.channels_last) for t in (a_h, a_w))
    assert a_h_cl.stride() != a_h.stride() and a_w_cl.stride() != a_w.stride()
    cases = ((x, a_h_cl, a_w_cl), (x, a_h, a_w), (x.float(), a_h.float(), a_w), (x.contiguous(), a_h, a_w.float()))
    for args in cases:
        leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_(True) for t in args]
        got, expected = apply_gates(*leaves), args[0] * args[1] * args[2]
        assert got.dtype == expected.dtype and got.stride() == expected.stride()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        if all(t.dtype == torch.float64 for t in args):
            assert torch.autograd.gradcheck(apply_gates, leaves)


@pytest.mark.parametrize('shape', SMALL_SHAPES + [(2, 3, 16, 17)])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_sums_over_width_and_height(shape, layout):
    """Against torch.sum with keepdim; the result is stored in the map's layout."""
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    for fast, dim in ((sum_over_width, 3), (sum_over_height, 2)):
        got = fast(x)
        torch.testing.assert_close(got, x.sum(dim=dim, keepdim=True), rtol=1e-12, atol=1e-12)
        assert got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize('shape', SMALL_SHAPES + [(2, 3, 16, 17)])
@pytest.mark.parametrize('grad', [True, False])
def test_gates_are_laid_out_like_the_map(shape, grad):
    """The enhancer's gates come in the layout of the map they multiply (x's, or `like`'s), with autograd (rows
    path) and without (column path for NCHW)."""
    gce = GlobalContextEnhancer(shape[1])
    x = torch.randn(shape)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(grad):
        for source, like, layout in ((x, None, torch.contiguous_format), (x_cl, None, torch.channels_last),
                                     (x, x_cl, torch.channels_last), (x_cl, x, torch.contiguous_format)):
            gates = gce.gates(source, like=like)
            assert all(gate.is_contiguous(memory_format=layout) for gate in gates)
            for got, expected in zip(gates, gce.gates(x)):
                torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('shape', SMALL_SHAPES + [(1, 2, 16, 16), (2, 3, 17, 16), (1, 2, 40, 3)])
def test_directional_means_match_mean(shape):
    """Both the GEMM path (maps up to 256 pixels) and the reduction path against torch's own mean."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    z = directional_means(x)
    torch.testing.assert_close(z, torch.cat([x.mean(dim=3), x.mean(dim=2)], dim=2), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(directional_means, (x,))
    channels_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.testing.assert_close(directional_means(channels_last), z.detach(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(directional_means, (channels_last,))


def test_global_enhancer_trains_after_inference_mode():
    """Constant matrices cached during an inference_mode call must still serve a later training step."""
    gce = GlobalContextEnhancer(8)
    x = torch.randn(2, 8, 5, 11)  # a map size no other test uses: the cache must be filled here
    with torch.inference_mode():
        expected = gce(x)
    x.requires_grad_(True)
    out = gce(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None


def test_global_enhancer_param_counts():
    all_global = timm.create_model('mobilenetv2_metapool_100', genotype='global')
    assert sum(p.numel() for p in all_global.parameters()) == 3_950_648


MIXED_GENOTYPE = ('avg3', 'avg5', 'avg7', 'global', 'max3', 'skip', 'max7', 'avg3',
                  'avg7', 'max5', 'global', 'avg5', 'skip', 'avg3', 'global', 'avg7')


@pytest.mark.parametrize('genotype', ['avg3', 'avg7', ','.join(MIXED_GENOTYPE)])
def test_reparameterize_model_is_exact(genotype):
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', genotype=genotype).eval()
    with torch.no_grad():  # non-trivial BN affine and statistics, so bias effects would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_(std=0.1)
                m.running_var.uniform_(0.5, 2.)
    deployed = reparameterize_model(model)
    num_avg = sum(name.startswith('avg') for name in model.genotype)
    num_fused = sum(isinstance(m, ProjectionAvgPool) for m in deployed.modules())
    assert num_avg > 0 and num_fused == num_avg
    assert deployed.genotype == model.genotype  # a moved pool still names its candidate
    # The state is unchanged but for the folded BN of each Global Context Enhancer.
    assert list(deployed.state_dict()) == [k for k in model.state_dict() if '.meta_pool.bn.' not in k]
    num_global = sum(name == 'global' for name in model.genotype)
    assert sum(isinstance(m, GlobalContextEnhancer) and isinstance(m.bn, torch.nn.Identity)
               for m in deployed.modules()) == num_global
    x = torch.randn(2, 3, 57, 43)  # odd sizes: the pools see borders at every stage
    with torch.no_grad():
        expected, got = model(x), deployed(x)
    assert rel_err(got, expected) <= 1e-5


def test_reparameterize_leaves_open_and_non_avg_slots():
    model = timm.create_model('mobilenetv2_metapool_035').eval()  # supernet: every slot open
    model.fix_slot(0, 'avg5')
    model.fix_slot(1, 'max3')
    deployed = reparameterize_model(model)
    assert isinstance(deployed.enhancer_blocks()[0].conv_pwl, ProjectionAvgPool)
    assert not isinstance(deployed.enhancer_blocks()[1].conv_pwl, ProjectionAvgPool)
    assert all(isinstance(s, MetaPooling) for s in deployed.enhancer_slots()[2:])
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert rel_err(deployed(x), model(x)) <= 1e-5


@pytest.mark.parametrize('shape', [(2, 8, 5, 6), (2, 8, 20, 18)])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_global_enhancer_under_torch_compile_matches_eager(shape, layout):
    """Under torch.compile the enhancer hands the compiler its plain definitions (mean, broadcast product: no GEMM
    with a 0/1 matrix, no custom autograd Function, no graph break) and gives the eager fast paths' values and
    gradients. The recording backend runs the captured graph eagerly, so no C++ toolchain is needed."""
    torch.manual_seed(0)
    gce = GlobalContextEnhancer(shape[1]).double()
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    captured = []

    def recording_backend(graph_module, example_inputs):
        captured.extend(node.target for node in graph_module.graph.nodes if node.op in ('call_function', 'call_method'))
        return graph_module.forward

    compiled = torch.compile(gce, backend=recording_backend, fullgraph=True)
    results = []
    for forward in (gce, compiled):
        gce.zero_grad(set_to_none=True)
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
        out = forward(xi)
        out.pow(2).sum().backward()
        assert out.is_contiguous(memory_format=layout)
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in gce.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # inference: the rows too, not eager inference's column GEMMs
        torch.testing.assert_close(compiled(x), gce(x), rtol=1e-10, atol=1e-12)
    names = [getattr(target, '__name__', str(target)) for target in captured]
    assert 'mean' in names and 'mm' not in names and not any('apply' in name for name in names), names
    assert 'baddbmm' not in names, names
