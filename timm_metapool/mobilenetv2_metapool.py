"""MobileNetV2 with Meta-Pooling enhancers, registered with timm as `mobilenetv2_metapool_*`.

The network is timm's own EfficientNet built from timm's MobileNetV2 arch_def. One enhancer slot sits in every
InvertedResidual's expanded space, right after the depthwise conv (the block's `se` slot; paper Fig. 2, "after each
layer"), so state_dict keys stay `blocks.i.j.*` and feature extraction works as for any timm EfficientNet.
With `genotype=None` each slot is a `MetaPooling` (the search space); with a genotype each slot is the chosen op.
"""
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures

from .deploy import enable_deploy_rewrite
from .genotype import Genotype, GenotypeLike
from .mixed_op import ARCH_PARAM_NAME, MetaPooling
from .ops import OP_NAMES, create_op, op_name_of
from .hub import checkpoint_filter_fn
from .pretrained import PRETRAINED_TAGS, resolve_pretrained_genotype

__all__ = ['MetaPoolingMixin', 'MetaPoolEfficientNet', 'MetaPoolEfficientNetFeatures', 'count_enhancer_slots']

# timm's MobileNetV2 arch_def (timm/models/efficientnet.py, _gen_mobilenet_v2).
MOBILENETV2_ARCH_DEF = [
    ['ds_r1_k3_s1_c16'],
    ['ir_r2_k3_s2_e6_c24'],
    ['ir_r3_k3_s2_e6_c32'],
    ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'],
    ['ir_r3_k3_s2_e6_c160'],
    ['ir_r1_k3_s1_e6_c320'],
]


# A mixed op is one leaf for torch.fx feature extraction: its candidates are keyed by op name, and `global` is a
# Python keyword that fx's generated code cannot address as an attribute.
register_notrace_module(MetaPooling)


def _is_slot_block(block: nn.Module) -> bool:
    return isinstance(block, InvertedResidual)


class MetaPoolingMixin:
    """Search-space API shared by the classifier and the features-only network (both have `self.blocks`)."""

    def enhancer_blocks(self) -> List[InvertedResidual]:
        """The blocks that own an enhancer slot (`block.se`), in slot order."""
        return [b for stage in self.blocks for b in stage if _is_slot_block(b)]

    def enhancer_slots(self) -> List[nn.Module]:
        """Each slot's module: a `MetaPooling` while open, the chosen op once fixed."""
        return [b.se for b in self.enhancer_blocks()]

    @property
    def num_slots(self) -> int:
        return len(self.enhancer_blocks())

    def open_slots(self) -> List[int]:
        """Indices of slots still searching (unfixed MetaPooling)."""
        return [i for i, s in enumerate(self.enhancer_slots()) if isinstance(s, MetaPooling) and not s.is_fixed]

    def arch_parameters(self) -> List[nn.Parameter]:
        """Architecture logits (alpha) of the open slots: PMPL's outer-loop variables (Eq. 3)."""
        return [self.enhancer_slots()[i].arch_alpha for i in self.open_slots()]

    def named_weight_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """Network weights theta: every parameter except the architecture logits."""
        for name, p in self.named_parameters():
            if not name.endswith(ARCH_PARAM_NAME):
                yield name, p

    def weight_parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def slot_probabilities(self) -> List[Optional[torch.Tensor]]:
        """softmax(alpha) per slot (detached); None for a slot that holds a fixed op without logits."""
        return [s.probabilities().detach() if isinstance(s, MetaPooling) else None for s in self.enhancer_slots()]

    @property
    def genotype(self) -> Optional[Genotype]:
        """The architecture once every slot is fixed, else None (use `derive_genotype()` mid-search)."""
        names = [op_name_of(s) for s in self.enhancer_slots()]
        return Genotype(tuple(names)) if all(n is not None for n in names) else None

    def derive_genotype(self) -> Genotype:
        """Fixed slots keep their op; open slots take argmax(alpha) (Alg. 1, "fix the distribution by argmax")."""
        names = []
        for slot in self.enhancer_slots():
            if isinstance(slot, MetaPooling):
                names.append(slot.chosen or slot.op_names[int(slot.arch_alpha.argmax())])
            else:
                names.append(op_name_of(slot))
        return Genotype(tuple(names))

    def fix_slot(self, index: int, op_name: str) -> nn.Module:
        """Replace open slot `index` by its candidate `op_name`, keeping that op's trained weights.

        The replaced slot holds the bare op, so the state_dict matches a model built from the final genotype. A slot
        whose MetaPooling was fixed on its own (`MetaPooling.fix`) is replaced by its chosen op the same way.
        """
        blocks = self.enhancer_blocks()
        if not 0 <= index < len(blocks):  # negative indices too: fix events and logs name slots by their index
            raise IndexError(f'Slot {index} does not exist: this model has {len(blocks)} enhancer slots, '
                             f'0 to {len(blocks) - 1}.')
        block = blocks[index]
        slot = block.se
        self._check_can_fix(index, op_name)
        block.se = slot.ops[op_name] if slot.is_fixed else slot.fix(slot.op_names.index(op_name))
        return block.se

    def _check_can_fix(self, index: int, op_name: str) -> None:
        """ValueError unless slot `index` can take `op_name`: it searches (or was fixed to `op_name` inside its
        MetaPooling) and has that candidate."""
        slot = self.enhancer_slots()[index]
        if not isinstance(slot, MetaPooling):
            raise ValueError(f'Slot {index} is already fixed to {op_name_of(slot)!r}.')
        if slot.is_fixed and slot.chosen != op_name:
            raise ValueError(f'Slot {index} is already fixed to {slot.chosen!r} (by MetaPooling.fix), not '
                             f'{op_name!r}.')
        if op_name not in slot.op_names:
            raise ValueError(f'Slot {index} has no candidate {op_name!r}; its candidates are {slot.op_names}.')

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`; a strict load of a fixed genotype's weights into the search space, or of
        search-space weights into a fixed model, stops with what to do (the plain error only lists the keys)."""
        if strict:
            self._check_weights_kind(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_weights_kind(self, state_dict: Mapping[str, Any]) -> None:
        searching = any(isinstance(s, MetaPooling) for s in self.enhancer_slots())
        from_search = any('.se.ops.' in k or k.endswith(f'.se.{ARCH_PARAM_NAME}') for k in state_dict)
        if searching and not from_search:
            raise ValueError(
                'These weights are of a fixed genotype, and this model is the search space (built without genotype=). '
                'Build it with the genotype they were trained with: timm.create_model(..., genotype=...), or '
                '--model-kwargs genotype=... for timm\'s scripts.')
        if not searching and from_search:
            raise ValueError(
                'These weights are of the search space (a PMPL search checkpoint, with every candidate of each slot), '
                'and this model has a fixed genotype. Fix them to it first: `python -m train_hooks.publish` exports '
                'them as a fixed model, or in Python supernet.fix_to_genotype() before state_dict().')

    def fix_to_genotype(self, genotype: Optional[GenotypeLike] = None) -> Genotype:
        """Fix every open slot in place to `genotype` (default: `derive_genotype()`); returns the final genotype.

        Slots already fixed must agree with the genotype. The whole genotype is checked before any slot is fixed, so
        a refused genotype leaves the model as it was.
        """
        target = self.derive_genotype() if genotype is None else Genotype.parse(genotype, num_slots=self.num_slots)
        to_fix = []
        for index, (slot, op_name) in enumerate(zip(self.enhancer_slots(), target)):
            if isinstance(slot, MetaPooling):
                self._check_can_fix(index, op_name)
                to_fix.append((index, op_name))
            elif op_name_of(slot) != op_name:
                raise ValueError(f'Slot {index} is fixed to {op_name_of(slot)!r}, the genotype asks for {op_name!r}.')
        for index, op_name in to_fix:
            self.fix_slot(index, op_name)
        return target


class MetaPoolEfficientNet(MetaPoolingMixin, EfficientNet):
    """timm EfficientNet (MobileNetV2 layout) whose InvertedResidual `se` slots hold Meta-Pooling enhancers."""
    __jit_unused_properties__ = ['genotype', 'num_slots']


class MetaPoolEfficientNetFeatures(MetaPoolingMixin, EfficientNetFeatures):
    """Features-only twin of `MetaPoolEfficientNet` (timm's `features_only=True`)."""
    __jit_unused_properties__ = ['genotype', 'num_slots']


def _create_enhancer(channels: int, op_name: Optional[str], act_layer=None, device=None, dtype=None) -> nn.Module:
    """timm `se_layer` factory for one slot: its chosen op, or a MetaPooling over every candidate when searching."""
    if op_name is None:
        return MetaPooling(channels, op_names=OP_NAMES, device=device, dtype=dtype)
    return create_op(op_name, channels, device=device, dtype=dtype)


def _decode_mobilenetv2(depth_multiplier: float, fix_stem_head: bool) -> List[List[Dict[str, Any]]]:
    return decode_arch_def(MOBILENETV2_ARCH_DEF, depth_multiplier=depth_multiplier, fix_first_last=fix_stem_head)


def count_enhancer_slots(block_args: List[List[Dict[str, Any]]]) -> int:
    return sum(1 for stage in block_args for ba in stage if ba['block_type'] == 'ir')


def _attach_enhancers(block_args: List[List[Dict[str, Any]]], genotype: Optional[Genotype]) -> None:
    """Give each InvertedResidual's block args its slot's `se_layer` factory (timm leaves it alone: se_ratio is 0)."""
    slot = 0
    for stage in block_args:
        for ba in stage:
            if ba['block_type'] == 'ir':
                op_name = None if genotype is None else genotype[slot]
                ba['se_layer'] = partial(_create_enhancer, op_name=op_name)
                slot += 1


def _gen_mobilenetv2_metapool(
        variant: str,
        channel_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        fix_stem_head: bool = False,
        genotype: Optional[GenotypeLike] = None,
        pretrained: bool = False,
        **kwargs,
):
    """Build a MobileNetV2 (timm's arch_def and defaults) with Meta-Pooling enhancer slots.

    Args:
        genotype: None for the search space (every slot a MetaPooling); otherwise any form `Genotype.parse`
            takes (list, 'a,b,...', preset op name, 'random:SEED', JSON path), giving the fixed architecture.
        pretrained: load published weights; without `genotype`, the genotype is read from the weights' config.
    """
    if kwargs.get('se_layer') is not None:
        # timm's builder would drop it without a word (MobileNetV2's arch strings carry no se ratio), and the slot it
        # names already holds the enhancer.
        raise ValueError(
            f'{variant} takes no se_layer (got {kwargs["se_layer"]!r}): every InvertedResidual\'s se slot holds its '
            f'Meta-Pooling enhancer, chosen by genotype=. To put another module there (e.g. timm\'s CoordAttn for a '
            f'comparison), build the model and assign block.se for each block in model.enhancer_blocks().')
    block_args = _decode_mobilenetv2(depth_multiplier, fix_stem_head)
    num_slots = count_enhancer_slots(block_args)
    if pretrained:
        # Without a genotype, read the one stored with the weights; with one, check it against them.
        genotype = resolve_pretrained_genotype(
            variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'), genotype=genotype,
            num_slots=num_slots)
    parsed = None if genotype is None else Genotype.parse(genotype, num_slots=num_slots)
    _attach_enhancers(block_args, parsed)

    round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
    model_kwargs = dict(
        block_args=block_args,
        num_features=1280 if fix_stem_head else max(1280, round_chs_fn(1280)),
        stem_size=32,
        fix_stem=fix_stem_head,
        round_chs_fn=round_chs_fn,
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        **kwargs,
    )
    return _create_metapool_effnet(variant, pretrained, **model_kwargs)


def _create_metapool_effnet(variant: str, pretrained: bool = False, **kwargs):
    """timm's `_create_effnet` with the Meta-Pooling classes."""
    features_mode = ''
    model_cls = MetaPoolEfficientNet
    kwargs_filter = None
    if kwargs.pop('features_only', False):
        if 'feature_cfg' in kwargs or 'feature_cls' in kwargs:
            features_mode = 'cfg'
        else:
            kwargs_filter = ('num_classes', 'num_features', 'head_conv', 'global_pool')
            model_cls = MetaPoolEfficientNetFeatures
            features_mode = 'cls'
    pretrained_strict = kwargs.pop('pretrained_strict', True)
    kwargs.setdefault('pretrained_filter_fn', checkpoint_filter_fn)  # refuse weights of another genotype, by slot
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        features_only=features_mode == 'cfg',
        pretrained_strict=pretrained_strict and features_mode != 'cls',
        kwargs_filter=kwargs_filter,
        **kwargs,
    )
    if features_mode == 'cls':
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return enable_deploy_rewrite(model)  # so timm's reparameterize_model moves fixed avg pools behind conv_pwl


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier',
        'license': 'apache-2.0',
        'paper_name': 'Progressive Meta-Pooling Learning for Lightweight Image Classification Model', **kwargs,
    }


# (variant, channel multiplier, depth multiplier, fix stem/head): timm's mobilenetv2_* widths and depths.
_VARIANTS: Dict[str, Tuple[float, float, bool]] = {
    'mobilenetv2_metapool_035': (0.35, 1.0, False),
    'mobilenetv2_metapool_050': (0.5, 1.0, False),
    'mobilenetv2_metapool_075': (0.75, 1.0, False),
    'mobilenetv2_metapool_100': (1.0, 1.0, False),
    'mobilenetv2_metapool_110d': (1.1, 1.2, True),
    'mobilenetv2_metapool_120d': (1.2, 1.4, True),
    'mobilenetv2_metapool_140': (1.4, 1.0, False),
}

default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in _VARIANTS if not any(tag.startswith(name + '.') for tag in PRETRAINED_TAGS)},
    **{tag: _cfg(hf_hub_id=entry['hf_hub_id']) for tag, entry in PRETRAINED_TAGS.items()},
})


def _make_entrypoint(variant: str) -> Callable[..., MetaPoolEfficientNet]:
    channel_multiplier, depth_multiplier, fix_stem_head = _VARIANTS[variant]

    def entrypoint(pretrained: bool = False, **kwargs) -> MetaPoolEfficientNet:
        return _gen_mobilenetv2_metapool(
            variant, channel_multiplier, depth_multiplier=depth_multiplier, fix_stem_head=fix_stem_head,
            pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f'MobileNetV2 x{channel_multiplier} (depth x{depth_multiplier}) with Meta-Pooling enhancers. '
        '`genotype=None` gives the PMPL search space; a genotype gives the fixed network.')
    return entrypoint


for _variant in _VARIANTS:
    globals()[_variant] = register_model(_make_entrypoint(_variant))
