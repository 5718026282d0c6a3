"""Deploy-time rewrite of fixed Meta-Pooling slots, through timm's `reparameterize_model` convention.

A fixed `avgK` enhancer (paper Sec. 2.1, Local Context Enhancer) sits in the InvertedResidual's expanded space,
between the depthwise conv and the 1x1 projection `conv_pwl`. Stride-1 average pooling with zero padding counted and
a bias-free 1x1 conv are both linear and act on different axes (space vs. channels), so they commute exactly:
conv_pwl(avg(x)) == avg(conv_pwl(x)). Pooling after the projection runs on its out_channels instead of the expanded
mid channels, 3x to 6x fewer in MobileNetV2. The pool must stay before `bn3`: BN adds a bias, and pooling
(bias + y) with zero padding differs from bias + pool(y) at the borders.

`timm.utils.model.reparameterize_model` only looks at a module's children for a `fuse()` / `reparameterize()`
method, and the enhancer alone cannot reach its block's projection, so the method lives on the block:
`enable_deploy_rewrite(model)` gives every InvertedResidual of a model the `reparameterize()` of
`MetaPoolInvertedResidual`.
"""
from typing import Optional

import torch
from torch import nn

from timm.models._efficientnet_blocks import InvertedResidual

from .mixed_op import MetaPooling
from .ops import op_name_of, pool_kernel_size, same_size_avg_pool

__all__ = ['ProjectionAvgPool', 'PoolMovedToProjection', 'MetaPoolInvertedResidual', 'fuse_pool_into_projection',
           'enable_deploy_rewrite']


class ProjectionAvgPool(nn.Conv2d):
    """A 1x1 projection followed by stride-1 average pooling (zero padding counted): avg_K(conv_1x1(x)).

    Subclasses `nn.Conv2d` so the deployed block keeps the `conv_pwl.weight` state_dict key.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            pool_size: int = 3,
            device=None,
            dtype=None,
    ):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=False, device=device, dtype=dtype)
        self.pool_size = pool_size

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, pool_size: int) -> 'ProjectionAvgPool':
        """Wrap a bias-free, ungrouped, stride-1 1x1 conv, sharing its weight."""
        fused = cls(conv.in_channels, conv.out_channels, pool_size=pool_size,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight = conv.weight
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_size_avg_pool(self._conv_forward(x, self.weight, self.bias), self.pool_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', pool_size={self.pool_size}'


class PoolMovedToProjection(nn.Identity):
    """What stays in an `avgK` slot whose pool moved into `ProjectionAvgPool`: nothing to compute, but the slot still
    names its candidate (`op_name`), so the rewritten model reports, exports and checks the genotype it was trained
    with (an `nn.Identity` would read as `skip`, and its exported weights would load as an all-`skip` model)."""

    def __init__(self, op_name: str):
        super().__init__()
        self.op_name = op_name

    def extra_repr(self) -> str:
        return f'op_name={self.op_name!r}'


def _fixed_op_name(slot: nn.Module) -> Optional[str]:
    """Op name of a fixed slot: a bare op, or a MetaPooling already fixed by `MetaPooling.fix`."""
    if isinstance(slot, MetaPooling):
        return slot.chosen
    return op_name_of(slot)


def _is_plain_projection(conv: nn.Module) -> bool:
    """True for the convs the pool commutes with exactly: 1x1, stride 1, no padding, groups 1, no bias."""
    return (
        type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
        and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
    )


def fuse_pool_into_projection(block: InvertedResidual) -> bool:
    """Move a fixed `avgK` enhancer of `block` behind its 1x1 projection, in place. Returns True if rewritten.

    Other slots (skip, global, max pools, open MetaPooling) and non-plain projections are left as they are.
    """
    op_name = _fixed_op_name(block.se)
    if op_name is None or not op_name.startswith('avg') or not _is_plain_projection(block.conv_pwl):
        return False
    block.conv_pwl = ProjectionAvgPool.from_conv(block.conv_pwl, pool_size=pool_kernel_size(op_name))
    block.se = PoolMovedToProjection(op_name)
    return True


class MetaPoolInvertedResidual(InvertedResidual):
    """timm's InvertedResidual with a `reparameterize()` hook for `reparameterize_model` (no other change)."""

    def reparameterize(self) -> None:
        fuse_pool_into_projection(self)


def enable_deploy_rewrite(model: nn.Module) -> nn.Module:
    """Let `reparameterize_model(model)` apply `fuse_pool_into_projection` to every InvertedResidual; in place.

    timm's builder instantiates `InvertedResidual` itself, so the blocks are retyped to the method-only subclass
    (no new state: state_dict, forward and TorchScript are unchanged). Idempotent; returns `model`.
    """
    for module in model.modules():
        if type(module) is InvertedResidual:
            module.__class__ = MetaPoolInvertedResidual
    return model
