"""Where published weights live, and how `pretrained=True` finds the genotype that goes with them.

A Meta-Pooling model's architecture depends on its genotype, so weights are only usable with the genotype they were
trained with. Exports store it twice: in `config.json` (`model_args.genotype`) and in the safetensors header metadata
(key `genotype`). `create_model(name, pretrained=True)` without a genotype reads it from one of those.
"""
import json
import os
from typing import Any, Dict, Optional, Union

from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg

__all__ = ['PRETRAINED_TAGS', 'SAFETENSORS_GENOTYPE_KEY', 'resolve_pretrained_genotype', 'read_safetensors_genotype']

# The one place that lists Hub weights: 'arch.tag' -> repo id, and whether files have been published there.
# Nothing is published yet: ImageNet training is out of reach on the machines this package is developed on.
PRETRAINED_TAGS: Dict[str, Dict[str, Any]] = {
    'mobilenetv2_metapool_100.pmpl_in1k': dict(
        hf_hub_id='timm-metapool/mobilenetv2_metapool_100.pmpl_in1k', published=False),
}

SAFETENSORS_GENOTYPE_KEY = 'genotype'

_INSTEAD = (
    "Instead: build the architecture with genotype=... and pretrained=False, load your own export with "
    "timm.create_model('local-dir:DIR') or pretrained_cfg_overlay=dict(file='model.safetensors'), "
    "or use 'hf-hub:ORG/NAME' for weights you published."
)


def read_safetensors_genotype(path: Union[str, os.PathLike]) -> Optional[str]:
    """The genotype string stored in a safetensors file's header metadata, or None if it has none."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError on truncated or corrupt headers
        raise ValueError(f'Cannot read safetensors file {str(path)!r}: {e}. Re-export it with '
                         f'`python -m train_hooks.publish`.') from e
    return metadata.get(SAFETENSORS_GENOTYPE_KEY)


def _genotype_from_config_file(path: str, repo_id: str) -> str:
    with open(path, 'r', encoding='utf-8') as f:
        config = json.load(f)
    genotype = config.get('model_args', {}).get('genotype')
    if not genotype:
        raise ValueError(f"config.json of {repo_id!r} has no model_args.genotype: it was not exported by "
                         f"timm_metapool. {_INSTEAD}")
    return genotype


def _download_config(repo_id: str, published: bool) -> str:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, 'config.json')
    if isinstance(cached, str):
        return cached
    if not published:
        raise RuntimeError(
            f'No pretrained weights are published for {repo_id!r} yet (and none are in the local Hub cache). '
            f'{_INSTEAD}')
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f'HF_HUB_OFFLINE is set and {repo_id!r} is not in the local Hub cache. Download it '
                           f'once online, or unset HF_HUB_OFFLINE. {_INSTEAD}')
    try:
        return hf_hub_download(repo_id, 'config.json', etag_timeout=5)
    except Exception as e:  # network, auth and missing-repo errors all end the same way for the user
        raise RuntimeError(f'Cannot fetch config.json of {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: '
                           f'{e}). {_INSTEAD}') from e


def resolve_pretrained_genotype(
        variant: str,
        pretrained_cfg: Optional[Union[str, Dict[str, Any], PretrainedCfg]] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> str:
    """Find the genotype of the weights `pretrained=True` will load for `variant`.

    Order: a local weights file (`pretrained_cfg_overlay=dict(file=...)`, genotype in its safetensors metadata),
    then the Hub repo of the pretrained tag (its `config.json`). Fails fast with a message that says what to do.
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.file:
        genotype = read_safetensors_genotype(cfg.file) if str(cfg.file).endswith('.safetensors') else None
        if not genotype:
            raise ValueError(f'Weights file {cfg.file!r} carries no genotype in its metadata; pass genotype=... '
                             f'(the one it was trained with) or re-export it with `python -m train_hooks.publish`.')
        return genotype
    if cfg.hf_hub_id:
        tag = f'{variant}.{cfg.tag}' if cfg.tag else variant
        published = PRETRAINED_TAGS.get(tag, {}).get('published', True)
        return _genotype_from_config_file(_download_config(cfg.hf_hub_id, published), cfg.hf_hub_id)
    raise RuntimeError(f'{variant} has no pretrained weights registered (tags with weights: '
                       f"{', '.join(PRETRAINED_TAGS) or 'none'}). {_INSTEAD}")
