"""Where published weights live, and how `pretrained=True` finds the genotype that goes with them.

A Meta-Pooling model's architecture depends on its genotype, so weights are only usable with the genotype they were
trained with. Exports store it twice: in `config.json` (`model_args.genotype`) and in the safetensors header metadata
(key `genotype`). `create_model(name, pretrained=True)` without a genotype reads it from one of those; with a genotype,
it is checked against the weights' metadata whenever the weights are already on disk.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import timm.models._hub as timm_hub
from timm.models._builder import resolve_pretrained_cfg
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, hf_split
from timm.models._pretrained import PretrainedCfg

from .genotype import Genotype, GenotypeLike
from .integrity import GenotypeMismatchError, first_slot_difference

__all__ = [
    'PRETRAINED_TAGS', 'WEIGHTS_DIR_ENV', 'SHIPPED_WEIGHTS_DIR', 'read_weights_manifest', 'tag_model_args',
    'SAFETENSORS_GENOTYPE_KEY', 'SAFETENSORS_CHECKSUM_KEY', 'SAFETENSORS_OUTPUT_STRIDE_KEY', 'GenotypeMismatchError',
    'first_genotype_difference', 'local_weights_file', 'read_safetensors_metadata', 'read_safetensors_genotype',
    'check_weights_genotype', 'resolve_pretrained_genotype', 'ConfigFileError', 'name_config_file_in_errors',
]

WEIGHTS_DIR_ENV = 'TIMM_METAPOOL_WEIGHTS_DIR'  # another folder laid out as SHIPPED_WEIGHTS_DIR, read instead of it
SHIPPED_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
WEIGHTS_MANIFEST = 'manifest.json'


def read_weights_manifest(weights_dir: str) -> Dict[str, Dict[str, Any]]:
    """The pretrained tags whose weights file is in `weights_dir`, from its `manifest.json`:

        {"tags": {"ARCH.TAG": {"file": "NAME.safetensors",          # an export's model.safetensors, renamed
                               "model_args": {"in_chans": 1, ...},  # create_model kwargs the weights need
                               "cfg": {"input_size": [1, 56, 56], "mean": [...], ...}}}}  # timm pretrained cfg

    A tag whose file is absent is left out, so that timm.list_pretrained() lists nothing that cannot load.
    """
    path = os.path.join(weights_dir, WEIGHTS_MANIFEST)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, 'r', encoding='utf-8') as f:
            entries = json.load(f)['tags']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'Cannot read the pretrained weights manifest {path}: {e!r}. It must be a JSON object '
                         f'{{"tags": {{"ARCH.TAG": {{"file": ..., "model_args": ..., "cfg": ...}}}}}}.') from None
    tags = {}
    for tag, entry in entries.items():
        file = os.path.join(weights_dir, entry['file'])
        if os.path.isfile(file):
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.get('cfg', {}).items()}  # as timm's
            tags[tag] = dict(file=file, model_args=dict(entry.get('model_args', {})), cfg=cfg)
    return tags


# The one place that lists pretrained weights, 'arch.tag' -> where they are (`file` shipped in the package's
# weights/ folder, or `hf_hub_id`), the create_model kwargs they need and their pretrained cfg; only tags whose
# files exist. ImageNet weights are out of reach on the machines this package is developed on.
PRETRAINED_TAGS: Dict[str, Dict[str, Any]] = read_weights_manifest(
    os.environ.get(WEIGHTS_DIR_ENV) or SHIPPED_WEIGHTS_DIR)


def tag_model_args(variant: str, pretrained_cfg: Any = None) -> Dict[str, Any]:
    """The create_model kwargs that the pretrained tag named ('ARCH.TAG') needs (its manifest's `model_args`); none
    for an architecture's untagged default, which has no weights."""
    if not isinstance(pretrained_cfg, str):
        return {}
    return dict(PRETRAINED_TAGS.get(f'{variant}.{pretrained_cfg}', {}).get('model_args', {}))


SAFETENSORS_GENOTYPE_KEY = 'genotype'
SAFETENSORS_CHECKSUM_KEY = 'weights_sha256'  # integrity.weights_checksum of the tensors, checked on load
SAFETENSORS_OUTPUT_STRIDE_KEY = 'output_stride'  # the network the weights were trained in, checked on load

_INSTEAD = (
    "Instead: build the architecture with genotype=... and pretrained=False, load your own export with "
    "timm.create_model('local-dir:DIR', pretrained=True) or pretrained_cfg_overlay=dict(file='model.safetensors'), "
    "or use 'hf-hub:ORG/NAME' for weights you published."
)


def first_genotype_difference(
        weights_genotype: Genotype,
        requested: Genotype,
        slot_names: Optional[Sequence[str]] = None,
) -> Optional[str]:
    """A sentence naming the first slot where the two genotypes differ, or None if they are equal."""
    return first_slot_difference(tuple(weights_genotype), tuple(requested), slot_names, describe=repr,
                                 own_name='the requested genotype')


def read_safetensors_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """A safetensors file's header metadata (empty if it has none)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError on truncated or corrupt headers
        raise ValueError(f'Cannot read safetensors file {str(path)!r} (truncated or corrupted?): {e}. Download it '
                         f'again or re-export it with `python -m train_hooks.publish`.') from e


def read_safetensors_genotype(path: Union[str, os.PathLike]) -> Optional[str]:
    """The genotype string stored in a safetensors file's header metadata, or None if it has none."""
    return read_safetensors_metadata(path).get(SAFETENSORS_GENOTYPE_KEY)


def local_weights_file(cfg: PretrainedCfg) -> Optional[str]:
    """The weights file `cfg` loads from, if it is on this machine already (never downloads).

    Follows timm's source order (`_resolve_pretrained_source`): a `local-dir:` export's `model.safetensors`, an
    explicit `file`, then the Hugging Face cache for `hf_hub_id`.
    """
    if cfg.source == 'local-dir' or (cfg.file and os.path.isdir(cfg.file)):
        candidate = Path(cfg.file) / HF_SAFE_WEIGHTS_NAME
        return str(candidate) if candidate.is_file() else None
    if cfg.file and cfg.source != 'hf-hub':
        if not os.path.exists(cfg.file):
            raise FileNotFoundError(f'Pretrained weights file {str(cfg.file)!r} (the pretrained cfg\'s `file`, e.g. '
                                    f'pretrained_cfg_overlay=dict(file=...)) does not exist; check the path.')
        return str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo_id, revision = hf_split(cfg.hf_hub_id)
        cached = try_to_load_from_cache(repo_id, cfg.hf_hub_filename or HF_SAFE_WEIGHTS_NAME, revision=revision)
        return cached if isinstance(cached, str) else None
    return None


def check_weights_genotype(
        cfg: PretrainedCfg,
        genotype: Genotype,
        slot_names: Optional[Sequence[str]] = None,
) -> None:
    """Raise `GenotypeMismatchError` if the weights of `cfg`, when already on disk, were exported with another
    genotype (their safetensors metadata), naming the first differing slot. Weights not on disk are not checked."""
    weights_file = local_weights_file(cfg)
    if not (weights_file and weights_file.endswith('.safetensors')):
        return
    stored = read_safetensors_genotype(weights_file)
    difference = stored and first_genotype_difference(Genotype.parse(stored), genotype, slot_names)
    if difference:
        raise GenotypeMismatchError(
            f'Weights {weights_file!r} were trained with another genotype: {difference}. Build the model with the '
            f'genotype stored with them ({stored}), or leave genotype out to use it. (For a local-dir: or hf-hub: '
            f"export, timm passes the genotype of its config.json model_args: if you did not give one, that file's "
            f'genotype disagrees with its weights; put theirs back there.)')


def _genotype_from_config_file(path: str, repo_id: str) -> str:
    try:
        with open(path, 'r', encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f'Cannot read config.json of {repo_id!r} at {path!r}: {e}. Delete it from the Hub cache '
                         f'and download it again.') from e
    genotype = config.get('model_args', {}).get('genotype')
    if not genotype:
        raise ValueError(f"config.json of {repo_id!r} has no model_args.genotype: it was not exported by "
                         f"timm_metapool. {_INSTEAD}")
    return genotype


class ConfigFileError(json.JSONDecodeError):
    """A `config.json` that is not valid JSON, with the file's path and the fix in the message.

    A subclass of `json.JSONDecodeError` (so of `ValueError`), so code that catches timm's own error still does.
    """

    def __init__(self, path: str, error: json.JSONDecodeError):
        super().__init__(error.msg, error.doc, error.pos)
        self.path = path
        self.detail = str(error)

    def __str__(self) -> str:
        return (f'Cannot read {self.path}: it is not valid JSON ({self.detail}); the file is truncated or damaged. '
                f'Export the folder again (timm-metapool-publish), copy it again, or for hf-hub: delete it from the '
                f'Hub cache so that it is downloaded again.')


def name_config_file_in_errors() -> None:
    """Make timm's `config.json` reader (used by `local-dir:` and `hf-hub:`) name the file when it is not valid JSON.

    timm parses the file before any model code runs, and its bare `JSONDecodeError` names neither the file nor the
    fix. Wraps `timm.models._hub.load_cfg_from_json` once; every other behaviour, and the error's type, stay timm's.
    """
    original = timm_hub.load_cfg_from_json
    if getattr(original, 'names_config_file', False):
        return

    def load_cfg_from_json(json_file):
        try:
            return original(json_file)
        except json.JSONDecodeError as e:
            raise ConfigFileError(str(json_file), e) from None

    load_cfg_from_json.names_config_file = True
    timm_hub.load_cfg_from_json = load_cfg_from_json


def _no_weights(variant: str) -> RuntimeError:
    tags = [t for t in PRETRAINED_TAGS if t.startswith(variant + '.')]
    named = (f"; name one of its tags: timm.create_model({tags[0]!r}, pretrained=True)" if tags else
             f" (tags with weights: {', '.join(PRETRAINED_TAGS) or 'none'})")
    return RuntimeError(f"{variant} has no pretrained weights{named}. {_INSTEAD}")


def _download_config(repo_id: str) -> str:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    hub_id, revision = hf_split(repo_id)
    cached = try_to_load_from_cache(hub_id, 'config.json', revision=revision)
    if isinstance(cached, str):
        return cached
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f'HF_HUB_OFFLINE is set and {repo_id!r} is not in the local Hub cache. Download it '
                           f'once online, or unset HF_HUB_OFFLINE. {_INSTEAD}')
    try:
        return hf_hub_download(hub_id, 'config.json', revision=revision, etag_timeout=5)
    except Exception as e:  # network, auth and missing-repo errors all end the same way for the user
        raise RuntimeError(f'Cannot fetch config.json of {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: '
                           f'{e}). {_INSTEAD}') from e


def _genotype_of_weights(variant: str, cfg: PretrainedCfg) -> str:
    """The genotype the weights of `cfg` were exported with; fails fast when it cannot be known."""
    weights_file = local_weights_file(cfg)
    if weights_file and weights_file.endswith('.safetensors'):
        genotype = read_safetensors_genotype(weights_file)
        if genotype:
            return genotype
    if cfg.file:
        where = ('in their metadata' if str(cfg.file).endswith('.safetensors') else
                 'that can be read before the model is built (only a safetensors export records it in its header)')
        raise ValueError(f'Weights {cfg.file!r} carry no genotype {where}; pass genotype=... (the one they were '
                         f'trained with) or export them with `python -m train_hooks.publish`.')
    if cfg.hf_hub_id:
        return _genotype_from_config_file(_download_config(cfg.hf_hub_id), cfg.hf_hub_id)
    raise _no_weights(variant)


def resolve_pretrained_genotype(
        variant: str,
        pretrained_cfg: Optional[Union[str, Dict[str, Any], PretrainedCfg]] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        genotype: Optional[GenotypeLike] = None,
        num_slots: Optional[int] = None,
) -> Union[str, GenotypeLike]:
    """The genotype to build for `pretrained=True`.

    Without `genotype`: read it from the weights (a local safetensors file's metadata, else the Hub repo's
    `config.json`), failing fast with a message that says what to do. With `genotype`: return it, after checking it
    against the metadata of weights already on disk (`num_slots` expands presets such as 'skip' for that check).
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.file and os.path.isdir(cfg.file) and cfg.source != 'local-dir':
        # timm loads `file` as a weights file; a folder would end in a bare FileNotFoundError after the build.
        raise ValueError(f'Pretrained file {cfg.file!r} is a folder: give its weights file '
                         f'({os.path.join(cfg.file, HF_SAFE_WEIGHTS_NAME)}), or load the folder as '
                         f"timm.create_model('local-dir:{cfg.file}', pretrained=True).")
    if not (cfg.file or cfg.hf_hub_id or cfg.url or cfg.state_dict):
        raise _no_weights(variant)  # timm would only warn and go on with random weights
    if genotype is None:
        return _genotype_of_weights(variant, cfg)
    check_weights_genotype(cfg, Genotype.parse(genotype, num_slots=num_slots))
    return genotype
