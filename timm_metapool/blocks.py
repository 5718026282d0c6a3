"""timm's inverted-residual blocks with one Meta-Pooling enhancer slot (paper Sec. 2.1, Fig. 2).

The slot is a child module named `meta_pool` that sits in the block's expanded space, right after the depthwise
conv's BN + activation (and anti-aliasing), before the block's own squeeze-excite (`se`), which stays and runs after
it. `nn.Identity` in the slot is `skip`, so an all-`skip` block has exactly the state_dict keys, and computes exactly
the output, of timm's block.

The classes only add the slot: `add_slot` retypes a block timm built (`block.__class__ = ...`) and registers the slot
in forward order, so no weights are copied and the block keeps every attribute timm gave it.
"""
from typing import Dict, Optional, Tuple, Type, Union

import torch
from torch import nn

from timm.models._efficientnet_blocks import InvertedResidual, UniversalInvertedResidual

from .deploy import move_pool_to_projection

__all__ = [
    'SLOT_ATTR', 'META_POOL_BLOCKS', 'MetaPoolInvertedResidual', 'MetaPoolUniversalInvertedResidual',
    'has_slot_position', 'slot_channels', 'slot_device_dtype', 'add_slot',
]

# Name of the slot's child module in each block: state_dict keys of a slot are `<block>.meta_pool.*`.
SLOT_ATTR = 'meta_pool'


class MetaPoolInvertedResidual(InvertedResidual):
    """timm's InvertedResidual (MBConv) with the enhancer slot `meta_pool` after `conv_dw`, `bn2`, `aa`, before `se`.

    `reparameterize()` is timm's `reparameterize_model` hook: a fixed `avgK` slot moves behind `conv_pwl`
    (`deploy.move_pool_to_projection`).
    """
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.conv_s2d(x)
            x = self.bn_s2d(x)
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.meta_pool(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x

    def reparameterize(self) -> None:
        moved = move_pool_to_projection(self.meta_pool, self.conv_pwl, between=self.se)
        if moved is not None:
            self.meta_pool, self.conv_pwl = moved


class MetaPoolUniversalInvertedResidual(UniversalInvertedResidual):
    """timm's UniversalInvertedResidual (MobileNetV4 UIB) with the enhancer slot `meta_pool` after `dw_mid` (the
    depthwise conv of the expanded space, with its BN, activation and anti-aliasing), before `se`.

    Only blocks that have that depthwise conv get a slot (`has_slot_position`): the FFN and ConvNeXt-like UIB
    variants have no depthwise conv in the expanded space. `reparameterize()` moves a fixed `avgK` slot behind
    `pw_proj.conv`, before `pw_proj`'s BN.
    """
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dw_start(x)
        x = self.pw_exp(x)
        x = self.dw_mid(x)
        x = self.meta_pool(x)
        x = self.se(x)
        x = self.pw_proj(x)
        x = self.dw_end(x)
        x = self.layer_scale(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x

    def reparameterize(self) -> None:
        moved = move_pool_to_projection(self.meta_pool, self.pw_proj.conv, between=self.se)
        if moved is not None:
            self.meta_pool, self.pw_proj.conv = moved


# timm block class -> its Meta-Pooling class. Exact types only: a subclass of timm's blocks (CondConvResidual, ...)
# has its own forward, which the slot's forward would replace.
_SLOT_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    InvertedResidual: MetaPoolInvertedResidual,
    UniversalInvertedResidual: MetaPoolUniversalInvertedResidual,
}
META_POOL_BLOCKS: Tuple[Type[nn.Module], ...] = tuple(_SLOT_CLASSES.values())


def has_slot_position(block: nn.Module) -> bool:
    """Whether `block` is a timm block with a depthwise conv in its expanded space, i.e. a place for a slot."""
    if type(block) is InvertedResidual:
        return True
    if type(block) is UniversalInvertedResidual:
        return not isinstance(block.dw_mid, nn.Identity)
    return False


def _depthwise_conv(block: Union[InvertedResidual, UniversalInvertedResidual]) -> nn.Module:
    return block.conv_dw if isinstance(block, InvertedResidual) else block.dw_mid.conv


def slot_channels(block: nn.Module) -> int:
    """Width of the map the slot sees: the depthwise conv's output channels (the expanded space)."""
    return _depthwise_conv(block).out_channels


def add_slot(block: nn.Module, slot: Optional[nn.Module] = None) -> nn.Module:
    """Retype timm `block` to its Meta-Pooling class and put `slot` (default `nn.Identity`, `skip`) in it; in place.

    The slot is registered right before `se`, so the block's modules and state_dict keys follow the forward order.
    """
    if not has_slot_position(block):
        raise ValueError(f'{type(block).__name__} has no depthwise conv in its expanded space to put a Meta-Pooling '
                         f'slot after.')
    block.__class__ = _SLOT_CLASSES[type(block)]
    modules = list(block._modules.items())
    index = [name for name, _ in modules].index('se')
    modules.insert(index, (SLOT_ATTR, nn.Identity() if slot is None else slot))
    block._modules = dict(modules)
    return block


def slot_device_dtype(block: nn.Module) -> Dict[str, Optional[Union[torch.device, torch.dtype]]]:
    """Device and dtype of the block's depthwise conv weights (`meta` for a model built on the meta device); a
    `MixedConv2d` (MixNet) holds one conv per kernel size, all alike."""
    weight = next(_depthwise_conv(block).parameters())
    return dict(device=weight.device, dtype=weight.dtype)
