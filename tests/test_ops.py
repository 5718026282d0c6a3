"""Candidate ops and the mixed op against PyTorch's own pooling and hand-written formulas (paper Sec. 2.1, Eq. 1)."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_metapool import OP_NAMES, GlobalContextEnhancer, MetaPooling, create_op, op_name_of
from timm_metapool.ops import AvgPoolEnhancer, MaxPoolEnhancer

SHAPES = [(2, 5, 9, 7), (3, 4, 1, 1), (1, 6, 2, 5), (2, 3, 16, 16)]


def reference_op(name: str, x: torch.Tensor) -> torch.Tensor:
    """Each local op by explicit padding + PyTorch functional pooling without padding."""
    if name == 'skip':
        return x
    k = int(name[3:])
    p = k // 2
    if name.startswith('max'):
        return F.max_pool2d(F.pad(x, (p, p, p, p), value=-math.inf), k, stride=1)
    return F.avg_pool2d(F.pad(x, (p, p, p, p), value=0.0), k, stride=1)  # padded zeros are counted


def reference_global(module: GlobalContextEnhancer, x: torch.Tensor) -> torch.Tensor:
    """The Global Context Enhancer written out with plain tensor algebra (BN in eval mode)."""
    w1 = module.conv_reduce.weight[:, :, 0, 0]
    b1 = module.conv_reduce.bias
    bn = module.bn

    def squeeze(z):  # z: (N, C, L) -> (N, mid, L)
        y = torch.einsum('mc,ncl->nml', w1, z) + b1[None, :, None]
        y = (y - bn.running_mean[None, :, None]) / torch.sqrt(bn.running_var[None, :, None] + bn.eps)
        y = y * bn.weight[None, :, None] + bn.bias[None, :, None]
        return y * torch.clamp(y + 3, 0, 6) / 6  # hard-swish

    def gate(conv, y):
        return torch.sigmoid(torch.einsum('cm,nml->ncl', conv.weight[:, :, 0, 0], y) + conv.bias[None, :, None])

    a_h = gate(module.conv_h, squeeze(x.mean(dim=3)))  # (N, C, H)
    a_w = gate(module.conv_w, squeeze(x.mean(dim=2)))  # (N, C, W)
    return x * a_h[:, :, :, None] * a_w[:, :, None, :]


def _randomize_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('name', [n for n in OP_NAMES if n != 'global'])
def test_local_ops_match_functional_pooling(name, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    op = create_op(name, shape[1])
    out = op(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference_op(name, x))


@pytest.mark.parametrize('shape', SHAPES)
def test_global_matches_direct_formula(shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    op = create_op('global', shape[1]).eval()
    _randomize_bn(op)
    torch.testing.assert_close(op(x), reference_global(op, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('channels, mid', [(16, 8), (96, 8), (384, 12), (960, 30)])
def test_global_reduction_is_max8_c_over_32(channels, mid):
    op = GlobalContextEnhancer(channels)
    assert op.conv_reduce.out_channels == mid
    assert op.conv_h.out_channels == op.conv_w.out_channels == channels
    expected_params = (channels * mid + mid) + 2 * mid + 2 * (mid * channels + channels)
    assert sum(p.numel() for p in op.parameters()) == expected_params


def test_only_global_has_parameters_and_names_round_trip():
    for name in OP_NAMES:
        op = create_op(name, 32)
        assert op_name_of(op) == name
        assert (sum(p.numel() for p in op.parameters()) > 0) == (name == 'global')


@pytest.mark.parametrize('cls', [AvgPoolEnhancer, MaxPoolEnhancer])
@pytest.mark.parametrize('kernel_size', [4, 0, -3, (3, 3)])
def test_pool_enhancers_reject_even_or_invalid_kernels(cls, kernel_size):
    with pytest.raises(ValueError, match='odd kernel size'):
        cls(kernel_size)


def test_unknown_op_lists_valid_names():
    with pytest.raises(ValueError, match='avg3.*avg7|valid ops'):
        create_op('avg9', 8)


@pytest.mark.parametrize('shape', SHAPES)
def test_mixture_equals_explicit_weighted_sum(shape):
    torch.manual_seed(2)
    x = torch.randn(shape, requires_grad=True)
    mp = MetaPooling(shape[1]).eval()
    _randomize_bn(mp)
    with torch.no_grad():
        mp.arch_alpha.copy_(torch.randn(len(OP_NAMES)))
    alpha = mp.arch_alpha.detach()
    pi = torch.exp(alpha) / torch.exp(alpha).sum()  # softmax by hand
    expected = sum(
        pi[i] * (reference_global(mp.ops['global'], x) if n == 'global' else reference_op(n, x))
        for i, n in enumerate(OP_NAMES))
    out = mp(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mp.probabilities(), pi)

    # d out / d alpha_j = pi_j * (op_j - out): check against autograd on the hand formula
    grad_out = torch.randn_like(out)
    (g_alpha,) = torch.autograd.grad(out, mp.arch_alpha, grad_out)
    ops_out = torch.stack([
        reference_global(mp.ops['global'], x) if n == 'global' else reference_op(n, x) for n in OP_NAMES])
    hand = pi * ((ops_out - expected.unsqueeze(0)) * grad_out.unsqueeze(0)).flatten(1).sum(1)
    torch.testing.assert_close(g_alpha, hand.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('k', range(len(OP_NAMES)))
def test_fix_keeps_only_the_chosen_op(k):
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6, 6)
    mp = MetaPooling(8).eval()
    chosen = mp.fix(k)
    name = OP_NAMES[k]
    assert mp.chosen == name and list(mp.ops.keys()) == [name]
    assert not mp.arch_alpha.requires_grad
    op_params = {id(p) for p in chosen.parameters()}
    weight_params = {id(p) for n, p in mp.named_parameters() if n != 'arch_alpha'}
    assert weight_params == op_params
    expected = reference_global(chosen, x) if name == 'global' else reference_op(name, x)
    torch.testing.assert_close(mp(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match='already fixed'):
        mp.fix(0)


def test_fix_rejects_out_of_range_index():
    with pytest.raises(IndexError, match='out of range'):
        MetaPooling(4).fix(len(OP_NAMES))
