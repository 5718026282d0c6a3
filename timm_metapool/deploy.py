"""Deploy-time rewrite of fixed Meta-Pooling slots, through timm's `reparameterize_model` convention.

A fixed `avgK` enhancer (paper Sec. 2.1, Local Context Enhancer) sits in the block's expanded space, between the
depthwise conv and the 1x1 projection (`conv_pwl` of an InvertedResidual, `pw_proj.conv` of a
UniversalInvertedResidual). Stride-1 average pooling with zero padding counted and a bias-free 1x1 conv are both
linear and act on different axes (space vs. channels), so they commute exactly: proj(avg(x)) == avg(proj(x)).
Pooling after the projection runs on its out_channels instead of the expanded mid channels, 3x to 6x fewer in
MobileNetV2. The pool must stay before the projection's BN: BN adds a bias, and pooling (bias + y) with zero padding
differs from bias + pool(y) at the borders. Nor may it cross the block's own squeeze-excite: the SE gate is computed
from the map's spatial mean, which a zero-padded pool changes at the borders.

`timm.utils.model.reparameterize_model` only looks at a module's children for a `fuse()` / `reparameterize()`
method, and the enhancer alone cannot reach its block's projection, so the method lives on the block (the Meta-Pooling
blocks of `timm_metapool.blocks` call `move_pool_to_projection`).
"""
from typing import Optional, Tuple

import torch
from torch import nn

from .mixed_op import MetaPooling
from .kernels import same_size_avg_pool
from .ops import op_name_of, pool_kernel_size

__all__ = ['ProjectionAvgPool', 'PoolMovedToProjection', 'move_pool_to_projection']


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


def move_pool_to_projection(
        slot: nn.Module,
        projection: nn.Module,
        between: nn.Module,
) -> Optional[Tuple[PoolMovedToProjection, ProjectionAvgPool]]:
    """The rewrite of one block: `slot` (a fixed `avgK` enhancer) moved behind `projection` (its block's 1x1 conv).

    Returns the modules that replace `slot` and `projection`, or None where the rewrite is not exact: the slot is not
    a fixed `avgK` (skip, global, max pools, open MetaPooling), the projection is not a plain 1x1 conv, or a module
    other than `nn.Identity` runs in between (`between`, the block's squeeze-excite).
    """
    op_name = _fixed_op_name(slot)
    if op_name is None or not op_name.startswith('avg') or not _is_plain_projection(projection):
        return None
    if type(between) is not nn.Identity:
        return None
    return PoolMovedToProjection(op_name), ProjectionAvgPool.from_conv(projection, pool_size=pool_kernel_size(op_name))
