"""The arms' models: a genotype of the package's search space, or timm's SqueezeExcite / CoordAttn in every slot."""
import functools
from typing import List, Optional, Tuple

import torch
import timm
from timm.layers.coord_attn import CoordAttn
from timm.layers.squeeze_excite import SqueezeExcite

from timm_metapool.blocks import SLOT_ATTR

from .plan import RECIPE


@functools.lru_cache(maxsize=None)
def num_slots() -> int:
    return timm.create_model(RECIPE.model, output_stride=RECIPE.output_stride).num_slots


def with_timm_attention(model: torch.nn.Module, attention: str) -> torch.nn.Module:
    """timm's SqueezeExcite or CoordAttn in every enhancer slot, as the paper's Tables 2 and 4 (the model is built
    all-`skip`, so the slot is empty otherwise)."""
    for block in model.enhancer_blocks():
        channels = block.conv_dw.out_channels
        enhancer = SqueezeExcite(channels, rd_ratio=0.25) if attention == 'se' else CoordAttn(channels)
        setattr(block, SLOT_ATTR, enhancer)
    return model


def build_model(genotype: Optional[str], attention: Optional[str]) -> torch.nn.Module:
    model = timm.create_model(RECIPE.model, genotype=genotype, num_classes=10, in_chans=1,
                              output_stride=RECIPE.output_stride)
    return with_timm_attention(model, attention) if attention else model


def slot_map_sizes(model: torch.nn.Module) -> List[Tuple[int, int]]:
    """Spatial size of the map each enhancer slot sees for one RECIPE.img_size input."""
    sizes: List[Tuple[int, int]] = []
    hooks = [getattr(b, SLOT_ATTR).register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
             for b in model.enhancer_blocks()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, RECIPE.img_size, RECIPE.img_size))
    for hook in hooks:
        hook.remove()
    return sizes
