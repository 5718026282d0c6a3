"""Meta-Pooling versions of timm's lightweight networks, registered with timm and built through `add_meta_pooling`.

Each entrypoint builds timm's own model with the same arguments, then adds the enhancer slots (`hook.py`): one
mechanism for every family. Names insert `_metapool` before a trailing width multiplier (`mobilenetv2_100` ->
`mobilenetv2_metapool_100`, `mnasnet_100` -> `mnasnet_metapool_100`), else append it (`efficientnet_b0` ->
`efficientnet_b0_metapool`); `timm.list_models('*metapool*')` lists them all.
`genotype=None` gives the PMPL search space (every slot a `MetaPooling`, Eq. 1); a genotype gives the fixed network,
and `genotype='skip'` is exactly the timm model (same state_dict keys and outputs).
"""
import json
import logging
import os
import re
from functools import partial
from typing import Any, Callable, Dict, Optional

from torch import nn

import timm
from timm.models import (
    build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model, split_model_name_tag,
)
from timm.models._builder import pretrained_cfg_for_features

from .genotype import GenotypeLike
from .hook import add_meta_pooling, meta_pool_class, slot_blocks
from .loading import ARCHITECTURE_KWARGS, checkpoint_filter_fn
from .pretrained import PRETRAINED_TAGS, resolve_pretrained_genotype, tag_model_args

__all__ = ['METAPOOL_FAMILIES', 'base_model_name', 'create_metapool_model']

_logger = logging.getLogger(__name__)

# Registered name -> the timm model it adds Meta-Pooling to.
METAPOOL_FAMILIES: Dict[str, str] = {
    **{f'mobilenetv2_metapool_{width}': f'mobilenetv2_{width}'
       for width in ('035', '050', '075', '100', '110d', '120d', '140')},
    'mobilenetv3_large_metapool_100': 'mobilenetv3_large_100',
    'mobilenetv3_small_metapool_100': 'mobilenetv3_small_100',
    'efficientnet_b0_metapool': 'efficientnet_b0',
    'efficientnet_lite0_metapool': 'efficientnet_lite0',
    'mnasnet_metapool_100': 'mnasnet_100',
    'mobilenetv4_conv_small_metapool': 'mobilenetv4_conv_small',
}

# Evaluation settings copied from the base model's default pretrained cfg (not its weights' location).
_BASE_CFG_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'pool_size', 'crop_pct',
                  'test_crop_pct', 'crop_mode', 'interpolation', 'mean', 'std', 'first_conv', 'classifier',
                  'num_classes', 'license')


def base_model_name(model_name: str) -> str:
    """The timm model a registered Meta-Pooling model is built from (a pretrained tag is dropped)."""
    return METAPOOL_FAMILIES[model_name.split('.')[0]]


def _cfg(base: str, **kwargs) -> Dict[str, Any]:
    base_cfg = get_pretrained_cfg(base)
    cfg = {k: getattr(base_cfg, k) for k in _BASE_CFG_KEYS if getattr(base_cfg, k) is not None}
    return {'url': '', **cfg,
            'paper_name': 'Progressive Meta-Pooling Learning for Lightweight Image Classification Model', **kwargs}


def _build_with_slots(
        base: str,
        variant: str,
        genotype: Optional[GenotypeLike],
        pretrained: bool,
        pretrained_cfg: Any,
        pretrained_cfg_overlay: Optional[Dict[str, Any]],
        **kwargs,
) -> nn.Module:
    """timm's `base` built with `kwargs`, then `add_meta_pooling`; the model factory given to `build_model_with_cfg`.

    For `pretrained=True` without a genotype, the genotype is read from the weights (`resolve_pretrained_genotype`).
    """
    se_layer = kwargs.get('se_layer')
    model = timm.create_model(base, **kwargs)
    blocks = slot_blocks(model)
    if se_layer is not None and all(isinstance(b.se, nn.Identity) for b in blocks):
        # timm's builder drops it without a word where the arch_def has no se ratio.
        raise ValueError(
            f'{variant} takes no se_layer (got {se_layer!r}): timm\'s {base} has no squeeze-excite in its blocks '
            f'(its arch_def has no se ratio), so timm would ignore it. The Meta-Pooling enhancer is each block\'s '
            f'`meta_pool`, chosen by genotype=; to put another module there (e.g. timm\'s CoordAttn for a '
            f'comparison), assign block.meta_pool for each block in model.enhancer_blocks().')
    if pretrained:
        # Without a genotype, read the one stored with the weights; with one, check it against them.
        genotype = resolve_pretrained_genotype(
            variant, pretrained_cfg, pretrained_cfg_overlay, genotype=genotype, num_slots=len(blocks))
    warn_if_searched_on_another_model(variant, genotype)
    return add_meta_pooling(model, genotype=genotype)


def _network(variant: str) -> str:
    """A variant's name without its width multiplier (`mobilenetv2_metapool_035` -> `mobilenetv2_metapool`)."""
    return re.sub(r'_\d+d?$', '', variant)


def warn_if_searched_on_another_model(variant: str, genotype: Optional[GenotypeLike]) -> None:
    """Say so when `genotype` is a search's genotype.json made for another network (another width of the same one is
    fine: its slots sit in the same blocks): a slot count that happens to agree does not make the receptive fields
    found for one network those of another."""
    if not (isinstance(genotype, (str, os.PathLike)) and str(genotype).endswith('.json') and os.path.isfile(genotype)):
        return
    try:
        with open(genotype, 'r', encoding='utf-8') as f:
            searched_on = json.load(f).get('model')
    except (OSError, ValueError, AttributeError):
        return  # Genotype.parse names what is wrong with the file
    if isinstance(searched_on, str) and _network(split_model_name_tag(searched_on)[0]) != _network(variant):
        _logger.warning(f'{genotype} was searched on {searched_on}, and {variant} is built with it: its ops go to '
                        f'the slots of another network. Search {variant} itself for its own genotype.')


def warn_tag_arg_overridden(tag: str, name: str, trained: Any, given: Any) -> None:
    """Say that a create_model kwarg differs from the one the pretrained tag's weights were trained with: timm adapts
    the weights where it can (the stem for another `in_chans`, a new classifier), and timm's validate.py passes
    in_chans=3 unless told otherwise, which then fails on the tag's own data."""
    flag = '--' + name.replace('_', '-')
    _logger.warning(
        f'{tag}: its weights were trained with {name}={trained} but {name}={given} was given; timm adapts the '
        f'weights to it where it can. To use them as trained, pass {name}={trained} (timm scripts: {flag} {trained}).')


def create_metapool_model(
        variant: str,
        pretrained: bool = False,
        genotype: Optional[GenotypeLike] = None,
        **kwargs,
) -> nn.Module:
    """Build registered `variant`: timm's base model with every kwarg, Meta-Pooling slots, then pretrained weights.

    timm's `build_model_with_cfg` does the rest as for the base model: the variant's pretrained cfg, loading (with
    `loading.checkpoint_filter_fn`, which refuses weights of another genotype) and `features_only` (timm's
    EfficientNetFeatures / MobileNetV3Features; with `feature_cls` / `feature_cfg`, timm's wrapper around the model
    with slots). Either way the features model keeps the search-space API and the genotype guard.
    """
    base = METAPOOL_FAMILIES[variant]
    for name, value in tag_model_args(variant, kwargs.get('pretrained_cfg')).items():
        if name in kwargs and kwargs[name] != value:
            warn_tag_arg_overridden(f"{variant}.{kwargs['pretrained_cfg']}", name, value, kwargs[name])
        kwargs.setdefault(name, value)  # what the tag's weights were trained with, unless given
    features_only = kwargs.pop('features_only', False)
    wrapped_features = features_only and ('feature_cfg' in kwargs or 'feature_cls' in kwargs)
    features_cls = features_only and not wrapped_features
    pretrained_strict = kwargs.pop('pretrained_strict', True)
    factory = partial(
        _build_with_slots, base, variant, genotype, pretrained, kwargs.get('pretrained_cfg'),
        kwargs.get('pretrained_cfg_overlay'), **({'features_only': True} if features_cls else {}))
    kwargs.setdefault('pretrained_filter_fn', checkpoint_filter_fn)
    model = build_model_with_cfg(
        factory,
        variant,
        pretrained,
        features_only=wrapped_features,
        pretrained_strict=pretrained_strict and not features_cls,
        **kwargs,
    )
    if features_cls:
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    if wrapped_features:  # timm's feature wrapper holds the slots: it gets the search-space API and genotype guard
        model.__class__ = meta_pool_class(type(model))
    # Exports write these into config.json's model_args, so that a load rebuilds the same network.
    model.architecture_kwargs = {k: kwargs[k] for k in ARCHITECTURE_KWARGS if kwargs.get(k) is not None}
    return model


def _make_entrypoint(variant: str) -> Callable[..., nn.Module]:
    base = METAPOOL_FAMILIES[variant]

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_metapool_model(variant, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f'timm\'s {base} with a Meta-Pooling enhancer slot in every inverted-residual block. '
        '`genotype=None` gives the PMPL search space; a genotype gives the fixed network.')
    return entrypoint


default_cfgs = generate_default_cfgs({
    **{tag: _cfg(base_model_name(tag), **{k: entry[k] for k in ('file', 'hf_hub_id') if k in entry},
                 **entry.get('cfg', {}))
       for tag, entry in PRETRAINED_TAGS.items()},
    # Each architecture's default stays its untagged cfg (the base model's, no weights): timm takes in_chans and
    # num_classes from the default cfg, so a tag for another dataset as the default would change what
    # create_model(arch) builds. '.*' marks the default, and it must come after the tags with weights, which timm
    # would otherwise move in front of it.
    **{f'{name}.*': _cfg(base) for name, base in METAPOOL_FAMILIES.items()},
})

for _variant in METAPOOL_FAMILIES:
    globals()[_variant] = register_model(_make_entrypoint(_variant))
