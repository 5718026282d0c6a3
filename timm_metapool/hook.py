"""The block-wrapping hook: Meta-Pooling for any timm network built from inverted-residual blocks.

`add_meta_pooling(model, genotype=None)` puts one enhancer slot in every InvertedResidual (and every MobileNetV4
UniversalInvertedResidual with a middle depthwise conv) of a timm model, right after the depthwise conv's BN +
activation, before the block's own squeeze-excite (paper Sec. 2.1 and Fig. 2: an enhancer "after each layer"), and
gives the model the search-space API of `MetaPoolingMixin`. With `genotype=None` every slot is a `MetaPooling`
mixed op over the eight candidates (Eq. 1, the PMPL search space); with a genotype each slot is its chosen op.
All-`skip` leaves the state_dict keys and the outputs of the timm model as they were.

The model is retyped to a subclass of its own class that adds `MetaPoolingMixin`. The subclasses of timm's
EfficientNet and MobileNetV3 classes (and their features-only twins) are defined here, so such models pickle,
deepcopy and script as usual; a subclass for any other class is made once and kept at module level under its name.
"""
from typing import Dict, List, Optional, Type

from torch import nn

from timm.models._efficientnet_blocks import InvertedResidual
from timm.models._efficientnet_builder import _init_weight_goog
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3, MobileNetV3Features

from .blocks import META_POOL_BLOCKS, add_slot, has_slot_position, slot_channels, slot_device_dtype
from .genotype import Genotype, GenotypeLike
from .mixed_op import MetaPooling
from .search_space import MetaPoolingMixin
from .ops import OP_NAMES, create_op

__all__ = [
    'add_meta_pooling', 'slot_blocks', 'create_slot', 'meta_pool_class', 'MetaPoolEfficientNet',
    'MetaPoolEfficientNetFeatures', 'MetaPoolMobileNetV3', 'MetaPoolMobileNetV3Features',
]

# Where timm defines its inverted-residual networks' blocks (named in the error for a model without a slot position).
_TIMM_BLOCKS_MODULE = InvertedResidual.__module__

# Properties TorchScript must not compile (they return Python objects).
_JIT_UNUSED = ['genotype', 'num_slots', 'num_fixed_slots']


class MetaPoolEfficientNet(MetaPoolingMixin, EfficientNet):
    """timm EfficientNet (EfficientNet, MobileNetV2, MNASNet, FBNet, ...) with Meta-Pooling slots."""
    __jit_unused_properties__ = _JIT_UNUSED


class MetaPoolEfficientNetFeatures(MetaPoolingMixin, EfficientNetFeatures):
    """Features-only twin of `MetaPoolEfficientNet` (timm's `features_only=True`)."""
    __jit_unused_properties__ = _JIT_UNUSED


class MetaPoolMobileNetV3(MetaPoolingMixin, MobileNetV3):
    """timm MobileNetV3 (MobileNetV3, MobileNetV4, ...) with Meta-Pooling slots."""
    __jit_unused_properties__ = _JIT_UNUSED


class MetaPoolMobileNetV3Features(MetaPoolingMixin, MobileNetV3Features):
    """Features-only twin of `MetaPoolMobileNetV3` (timm's `features_only=True`)."""
    __jit_unused_properties__ = _JIT_UNUSED


_MODEL_CLASSES: Dict[type, type] = {
    EfficientNet: MetaPoolEfficientNet,
    EfficientNetFeatures: MetaPoolEfficientNetFeatures,
    MobileNetV3: MetaPoolMobileNetV3,
    MobileNetV3Features: MetaPoolMobileNetV3Features,
}


def meta_pool_class(base: Type[nn.Module]) -> Type[nn.Module]:
    """The subclass of `base` with `MetaPoolingMixin`: one of the classes above, or one made once and kept here."""
    if issubclass(base, MetaPoolingMixin):
        return base
    cls = _MODEL_CLASSES.get(base)
    if cls is None:
        name = f'MetaPool{base.__name__}'
        cls = type(name, (MetaPoolingMixin, base), dict(
            __module__=__name__, __qualname__=name, __jit_unused_properties__=_JIT_UNUSED,
            __doc__=f'{base.__module__}.{base.__qualname__} with Meta-Pooling slots (`add_meta_pooling`).'))
        if name not in globals():  # importable by name, so pickle finds it in this process
            globals()[name] = cls
        _MODEL_CLASSES[base] = cls
    return cls


def slot_blocks(model: nn.Module) -> List[nn.Module]:
    """The timm blocks of `model` that take a slot, in module (forward) order."""
    return [m for m in model.modules() if has_slot_position(m)]


def create_slot(channels: int, op_name: Optional[str] = None, device=None, dtype=None) -> nn.Module:
    """One slot's module: a `MetaPooling` over every candidate (Eq. 1) when `op_name` is None, else that op.

    Its layers are initialised as timm initialises every layer of its inverted-residual networks
    (`_init_weight_goog`), which the slot would have had if timm had built it: with PyTorch's default init the Global
    Context Enhancers of a search at small batches and 1x1 maps overflowed float32 in the first steps.
    """
    slot = (MetaPooling(channels, op_names=OP_NAMES, device=device, dtype=dtype) if op_name is None else
            create_op(op_name, channels, device=device, dtype=dtype))
    for name, module in slot.named_modules():
        _init_weight_goog(module, name)
    return slot


def add_meta_pooling(model: nn.Module, genotype: Optional[GenotypeLike] = None) -> nn.Module:
    """Put a Meta-Pooling enhancer slot in every inverted-residual block of timm `model`; in place, returns `model`.

    Args:
        model: a timm model (or features-only model) with InvertedResidual / UniversalInvertedResidual blocks.
        genotype: None for the search space (every slot a `MetaPooling`); otherwise any form `Genotype.parse` takes
            (list, 'a,b,...', a preset op name such as 'skip', 'random:SEED', a JSON path), one op per slot.

    Raises:
        ValueError: `model` has no block with a depthwise conv in its expanded space, it already has Meta-Pooling
            slots, or the genotype does not fit its slots.
    """
    hooked = [m for m in model.modules() if isinstance(m, META_POOL_BLOCKS)]
    if isinstance(model, MetaPoolingMixin) or hooked:
        raise ValueError(f'This {type(model).__name__} already has Meta-Pooling slots ({len(hooked)}); '
                         f'add_meta_pooling takes a timm model without them.')
    blocks = slot_blocks(model)
    if not blocks:
        found = sorted({type(m).__name__ for m in model.modules() if type(m).__module__ == _TIMM_BLOCKS_MODULE})
        found = ', '.join(found) or "none of timm's efficientnet blocks"
        raise ValueError(
            f'{type(model).__name__} has no InvertedResidual block (nor a UniversalInvertedResidual with a middle '
            f'depthwise conv), so it has no place for a Meta-Pooling slot: the enhancer sits after the depthwise conv '
            f'of an inverted residual (its blocks: {found}). '
            f'Use a timm network built from them (mobilenetv2_*, mobilenetv3_large/small_*, efficientnet_*, '
            f'mnasnet_*, mobilenetv4_conv_*, ...).')
    ops = [None] * len(blocks) if genotype is None else list(Genotype.parse(genotype, num_slots=len(blocks)))
    # Every slot is built before any block changes, so a slot that cannot be built leaves the model as it was.
    slots = [create_slot(slot_channels(block), op_name, **slot_device_dtype(block))
             for block, op_name in zip(blocks, ops)]
    for block, slot in zip(blocks, slots):
        add_slot(block, slot)
    model.__class__ = meta_pool_class(type(model))
    return model
