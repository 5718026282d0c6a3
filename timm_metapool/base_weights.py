"""Start a Meta-Pooling model from its base timm model's weights (a warm start for the PMPL search or a retrain).

All-`skip` is exactly the base model (`add_meta_pooling`), so the base weights fill every shared layer; only the
enhancer slots' own weights (a `MetaPooling`'s candidates and logits, a `global` enhancer) keep their initialisation.
"""
import os
from typing import Dict, List

import torch
from torch import nn

from .loading import load_trained_checkpoint, slot_key_prefixes, warm_start_state_dict
from .integrity import GENOTYPE_STATE_KEY, describe_key_mismatch

__all__ = ['read_base_weights', 'load_base_weights']


def read_base_weights(source: str) -> Dict[str, torch.Tensor]:
    """A base model's state_dict from a file (timm state_dict or train.py checkpoint, `.pth` / `.pth.tar` read with
    `torch.load(weights_only=True)`, or `.safetensors`) or, when `source` is not a file, a timm pretrained tag such as
    `mobilenetv2_100.ra_in1k` (downloaded by timm)."""
    if os.path.exists(source):
        return load_trained_checkpoint(source).state_dict
    import timm
    if not timm.is_model(source.split('.')[0]):
        raise ValueError(f'Base weights {source!r} are neither a file nor a timm model or pretrained tag.')
    return timm.create_model(source, pretrained=True).state_dict()


def load_base_weights(model: nn.Module, source: str) -> List[str]:
    """Load base-model weights (`read_base_weights(source)`) into every layer of `model` except its enhancer slots.

    Strict on every other key: each must be in the weights with its shape, and the weights may hold nothing else.
    The one exception is a classifier of another class count (the cfg's `classifier`), which keeps its initialisation,
    as timm does for pretrained weights. Returns the keys left as initialised (the slots' own and such a classifier).
    """
    state = dict(read_base_weights(source))
    slot_prefixes = tuple(slot_key_prefixes(model))
    if GENOTYPE_STATE_KEY in state or any(k.startswith(slot_prefixes) for k in state):
        raise ValueError(f'{source!r} holds Meta-Pooling weights, not the base timm model\'s: load them with '
                         f'pretrained_cfg_overlay=dict(file=...) or continue a search with --resume.')
    own = model.state_dict()
    kept = [k for k in own if k.startswith(slot_prefixes)]
    classifier = model.pretrained_cfg.get('classifier')
    for key in (f'{classifier}.weight', f'{classifier}.bias') if classifier else ():
        if key in state and key in own and state[key].shape != own[key].shape:
            state[key] = own[key]
            kept.append(key)
    state = warm_start_state_dict(state, model)  # the slots (and the genotype entry) as the model has them
    detail = describe_key_mismatch(own, state)
    if detail:
        raise ValueError(f'{source!r} does not fit the base model of this Meta-Pooling model ({detail}): give the '
                         f'weights of the timm model it was built from, with the same width and input channels.')
    model.load_state_dict(state)
    return kept
