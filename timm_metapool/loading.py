"""The load side: reading checkpoints, and checking weights against the model they are loaded into.

Reads timm train.py checkpoints, the search's `last.pth`, plain state_dicts and safetensors files without unpickling
code, verifies their checksum (`integrity`), maps search-space weights onto a fixed genotype, and is timm's
`pretrained_filter_fn` for every registered model (`checkpoint_filter_fn`): weights of another genotype are refused
naming the slot, and weights without a genotype (timm's base models) become a warm start.
"""
import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .blocks import SLOT_ATTR
from .genotype import Genotype, GenotypeLike
from .integrity import (
    GENOTYPE_STATE_KEY, GenotypeMismatchError, check_genotype_codes, check_weights_checksum, codes_tensor,
)
from .mixed_op import ARCH_PARAM_NAME
from .pretrained import (
    SAFETENSORS_CHECKSUM_KEY, SAFETENSORS_GENOTYPE_KEY, SAFETENSORS_OUTPUT_STRIDE_KEY, check_weights_genotype,
    local_weights_file, read_safetensors_metadata,
)

__all__ = [
    'TrainedCheckpoint', 'load_trained_checkpoint', 'parse_checkpoint_genotype', 'slot_key_prefix',
    'fixed_state_dict', 'verify_state_dict', 'check_classifier_size', 'warm_start_state_dict', 'slot_key_prefixes',
    'check_weights_file', 'built_output_stride',
    'checkpoint_filter_fn', 'infer_head', 'build_model_for_weights',
]

_logger = logging.getLogger(__name__)

# timm train.py keys that describe evaluation preprocessing; the export's pretrained_cfg records them.
_DATA_CONFIG_KEYS = ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')
# Model kwargs that change what the network computes without showing in its weights' keys or shapes: weights load
# into a model built without them, silently, so they travel with the weights (config.json model_args).
ARCHITECTURE_KWARGS = ('output_stride',)


@dataclass
class TrainedCheckpoint:
    """What a training or search checkpoint holds: weights plus whatever says how they were made."""
    state_dict: Dict[str, torch.Tensor]
    path: str
    arch: Optional[str] = None
    genotype: Optional[Any] = None
    train_args: Dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None

    @property
    def summary_describes_ema(self) -> bool:
        """Whether timm train.py's summary.csv of this run holds the EMA weights' eval metrics (it evaluates the EMA
        in place of the model under --model-ema, unless the EMA is kept on the CPU)."""
        return bool(self.train_args.get('model_ema')) and not self.train_args.get('model_ema_force_cpu')

    @property
    def architecture_kwargs(self) -> Dict[str, Any]:
        """The `ARCHITECTURE_KWARGS` the weights were trained with: timm train.py's --model-kwargs, or the search's
        --output-stride."""
        given = dict(self.train_args.get('model_kwargs') or {})
        given.setdefault('output_stride', self.train_args.get('output_stride'))
        return {k: given[k] for k in ARCHITECTURE_KWARGS if given.get(k) is not None}

    @property
    def data_config(self) -> Dict[str, Any]:
        """The preprocessing arguments the checkpoint was trained/evaluated with (timm train.py args), if known."""
        return {k: self.train_args[k] for k in _DATA_CONFIG_KEYS if self.train_args.get(k)}


def _torch_load(path: str) -> Any:
    # timm train.py stores its argparse.Namespace under 'args'; allow exactly that class, nothing else unpickled.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise ValueError(f'Cannot load checkpoint {path!r} with torch.load(weights_only=True): {e}. It must be a '
                         f'timm train.py checkpoint, a PMPL search checkpoint or a plain state_dict.') from e


def load_trained_checkpoint(path: Union[str, os.PathLike], use_ema: bool = False) -> TrainedCheckpoint:
    """Read a timm train.py checkpoint (`state_dict`, `arch`, `args`), a search checkpoint (`state_dict`,
    `genotype`) or a plain state_dict / safetensors file, without unpickling arbitrary objects."""
    from timm.models import clean_state_dict

    path = str(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f'Checkpoint {path!r} is a directory; give the checkpoint file in it (for a timm '
                                f'train.py run: {os.path.join(path, "model_best.pth.tar")}).')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint {path!r} does not exist.')
    if path.endswith('.safetensors'):
        import safetensors.torch
        metadata = read_safetensors_metadata(path)
        state_dict = safetensors.torch.load_file(path)
        check_weights_checksum(state_dict, metadata.get(SAFETENSORS_CHECKSUM_KEY), path)
        return TrainedCheckpoint(state_dict=state_dict, path=path, genotype=metadata.get(SAFETENSORS_GENOTYPE_KEY))
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise ValueError(f'Checkpoint {path!r} holds a {type(data).__name__}, not a dict of tensors.')
    if 'state_dict' not in data:
        # A plain state_dict: every value a tensor.
        if not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"Checkpoint {path!r} has no 'state_dict' key and is not a plain state_dict "
                             f"(keys: {', '.join(list(map(str, data))[:8])}).")
        return TrainedCheckpoint(state_dict=clean_state_dict(data), path=path)
    check_weights_checksum(data['state_dict'], data.get('weights_sha256'), path)  # the search's last.pth has one
    key = 'state_dict'
    if use_ema:
        if 'state_dict_ema' not in data:
            raise ValueError(f"--use-ema: checkpoint {path!r} has no 'state_dict_ema' (train with --model-ema).")
        key = 'state_dict_ema'
    args = data.get('args')
    train_args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    genotype = data.get('genotype')
    if genotype is None:
        genotype = (train_args.get('model_kwargs') or {}).get('genotype')
    # timm train.py names the architecture 'arch'; the search names it 'model'.
    arch = data.get('arch') or (data['model'] if isinstance(data.get('model'), str) else None)
    # Only timm train.py checkpoints (with 'arch') number their epochs as its summary.csv does.
    epoch = data.get('epoch') if data.get('arch') else None
    return TrainedCheckpoint(state_dict=clean_state_dict(data[key]), path=path, arch=arch, genotype=genotype,
                             train_args=train_args, epoch=epoch if isinstance(epoch, int) else None)


def parse_checkpoint_genotype(value: Any, num_slots: int) -> Genotype:
    """A checkpoint's genotype in any stored form: a `Genotype.to_dict()` dict or anything `Genotype.parse` takes."""
    if isinstance(value, dict):
        return Genotype.parse(Genotype.from_dict(value, source='checkpoint genotype'), num_slots=num_slots)
    return Genotype.parse(value, num_slots=num_slots)


def slot_key_prefix(block_name: str) -> str:
    """The state_dict key prefix of the enhancer slot of the block at module path `block_name`."""
    return f'{block_name}.{SLOT_ATTR}.'


def _slot_state(state_dict: Mapping[str, torch.Tensor], block_name: str) -> Dict[str, torch.Tensor]:
    prefix = slot_key_prefix(block_name)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def fixed_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map search-space (supernet) slot weights onto `model`'s fixed genotype.

    An open MetaPooling slot stores every candidate (`meta_pool.ops.<op>.*`) and its logits (`meta_pool.arch_alpha`);
    a fixed slot stores the chosen op's weights as `meta_pool.*`. The chosen op's weights are kept, the rest dropped: the same
    result as `model.fix_to_genotype()` on the supernet. Slots already in fixed form pass through unchanged.
    """
    out = dict(state_dict)
    for prefix, op_name in zip(slot_key_prefixes(model), model.genotype):
        chosen = f'{prefix}ops.{op_name}.'
        for key in [k for k in out if k.startswith(prefix + 'ops.') or k == prefix + ARCH_PARAM_NAME]:
            value = out.pop(key)
            if key.startswith(chosen):
                out[prefix + key[len(chosen):]] = value
    if GENOTYPE_STATE_KEY in out:
        out[GENOTYPE_STATE_KEY] = codes_tensor(model.slot_codes())
    return out


def _describe_slot_weights(weights: Mapping[str, torch.Tensor]) -> str:
    if not weights:
        return 'no weights (a parameter-free op: skip, max* or avg*)'
    if any(k.startswith('ops.') or k == ARCH_PARAM_NAME for k in weights):
        return 'search-space (MetaPooling supernet) weights; export them with `python -m train_hooks.publish`'
    shapes = ', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(weights.items()))
    return f"'global' enhancer weights ({shapes})"


def verify_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise `GenotypeMismatchError` naming the first enhancer slot whose weights do not fit `model`'s genotype.

    Compares each slot's keys and shapes before `load_state_dict` runs, so the error says which slot and which op
    instead of listing raw missing/unexpected keys.
    """
    genotype = model.genotype
    if genotype is None:
        raise ValueError('The model still has open search slots (genotype=None); build it with the genotype of '
                         'the weights.')
    if GENOTYPE_STATE_KEY in state_dict:
        check_genotype_codes(state_dict[GENOTYPE_STATE_KEY], model.slot_codes(), model.enhancer_slot_names())
    slots = model.enhancer_slots()
    for index, (block_name, op_name, slot) in enumerate(zip(model.enhancer_slot_names(), genotype, slots)):
        have = _slot_state(state_dict, block_name)
        want = slot.state_dict()
        if have.keys() == want.keys():
            resized = [k for k in sorted(want) if have[k].shape != want[k].shape]
            if resized:
                key = resized[0]
                raise GenotypeMismatchError(
                    f'Enhancer slot {index} ({block_name}) holds {op_name!r} weights of other shapes than this '
                    f'model\'s ({key}: {tuple(have[key].shape)} in the checkpoint, {tuple(want[key].shape)} here): '
                    f'the weights were made for another model width. Build the architecture they were trained as '
                    f'(config.json "architecture").')
        else:
            raise GenotypeMismatchError(
                f'Enhancer slot {index} ({block_name}): the checkpoint holds {_describe_slot_weights(have)}, but '
                f'the genotype asks for {op_name!r}, which needs {_describe_slot_weights(want)}. The weights were '
                f'trained with another genotype: build the model with the genotype stored with the weights '
                f'(config.json model_args.genotype, or the safetensors metadata).')


def check_classifier_size(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise ValueError when the weights' classifier has another class count than the pretrained cfg declares while
    the model was built for the declared count. timm drops a pretrained head only where the model's count differs
    from the cfg's, so this case would end in load_state_dict's size mismatch; the usual cause is a
    `pretrained_cfg_overlay=dict(file=...)` without the weights' `num_classes`."""
    weight = state_dict.get('classifier.weight')
    declared = model.pretrained_cfg.get('num_classes')
    built_for = getattr(model, 'num_classes', None)  # None for features_only models: timm drops the head
    if weight is None or declared is None or built_for != declared or weight.shape[0] == declared:
        return
    trained = weight.shape[0]
    raise ValueError(f'The weights\' classifier has {trained} classes, but the pretrained cfg declares {declared} '
                     f'and the model was built for {built_for}: pass num_classes={trained} to '
                     f'timm.create_model and to pretrained_cfg_overlay. To fine-tune with another number of classes, '
                     f'give the model yours and the overlay num_classes={trained}; timm then drops the head.')


def warm_start_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Weights without a genotype (timm's own base-model weights) completed for `model`: every enhancer slot they
    have no weights for keeps `model`'s freshly initialised ones, and the genotype entry becomes the model's, so a
    strict load then fills the shared layers exactly. Logs which slots start fresh."""
    own = model.state_dict()
    out = dict(state_dict)
    fresh = []
    for index, prefix in enumerate(slot_key_prefixes(model)):
        slot_keys = [k for k in own if k.startswith(prefix)]
        if slot_keys and not any(k.startswith(prefix) for k in state_dict):
            out.update({k: own[k] for k in slot_keys})
            fresh.append(index)
    out[GENOTYPE_STATE_KEY] = own[GENOTYPE_STATE_KEY]
    if fresh:
        _logger.info(f'Warm start from weights without a genotype: enhancer slots {fresh} start fresh, every other '
                     f'layer is loaded.')
    return out


def slot_key_prefixes(model: nn.Module) -> List[str]:
    """The state_dict key prefix of each enhancer slot (`blocks.i.j.meta_pool.`), in slot order."""
    return [slot_key_prefix(name) for name in model.enhancer_slot_names()]


def check_weights_file(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Check the pretrained weights file on disk (an export: `local-dir:`, `hf-hub:`, an overlay `file`) against what
    it records: `ChecksumMismatchError` when `state_dict`, read from it, does not match its checksum,
    `GenotypeMismatchError` for another genotype, ValueError for another output stride (the same tensors in a
    network that dilates elsewhere)."""
    from timm.models._builder import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(model.pretrained_cfg.get('architecture'), pretrained_cfg=dict(model.pretrained_cfg))
    weights_file = local_weights_file(cfg)
    if weights_file and weights_file.endswith('.safetensors'):
        metadata = read_safetensors_metadata(weights_file)
        check_weights_checksum(state_dict, metadata.get(SAFETENSORS_CHECKSUM_KEY), weights_file)
        _check_output_stride(metadata.get(SAFETENSORS_OUTPUT_STRIDE_KEY), model, weights_file)
    if model.genotype is not None:
        # Checked again here: a Hub download lands on disk only after the builder's own check ran.
        check_weights_genotype(cfg, model.genotype, model.enhancer_slot_names())


def built_output_stride(model: nn.Module) -> Optional[int]:
    """The output stride `model` was built with (timm's `output_stride`: 32, or 16 / 8 with the last stages
    dilated), read from its feature info; None for a features-only model, whose outputs may stop earlier."""
    info = getattr(model, 'feature_info', None)
    if not isinstance(info, list) or not info:
        return None
    return int(info[-1]['reduction'])


def _check_output_stride(recorded: Optional[str], model: nn.Module, weights_file: str) -> None:
    built = built_output_stride(model)
    if recorded is None or built is None or int(recorded) == built:
        return
    raise ValueError(f'The weights in {weights_file!r} were trained with output_stride={recorded}, but this model '
                     f'was built with output_stride={built}: the same tensors in a network that dilates other '
                     f'layers, which computes something else. Build it with output_stride={recorded} (timm scripts: '
                     f'--model-kwargs output_stride={recorded}).')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm `pretrained_filter_fn`: check pretrained weights before loading them.

    Refuses a corrupted export (its checksum) and weights made for another genotype (the genotype they carry, their
    file's metadata, each slot's keys and shapes), checks that timm can load or drop the classifier
    (`check_classifier_size`), and completes weights without a genotype (timm's base model) as a warm start.
    """
    check_weights_file(state_dict, model)
    if GENOTYPE_STATE_KEY not in state_dict:
        state_dict = warm_start_state_dict(state_dict, model)
    if model.genotype is not None:
        verify_state_dict(state_dict, model)
    else:
        check_genotype_codes(state_dict[GENOTYPE_STATE_KEY], model.slot_codes(), model.enhancer_slot_names())
    check_classifier_size(state_dict, model)
    return state_dict


def infer_head(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """num_classes and in_chans the weights were trained with (classifier and stem shapes)."""
    args = {}
    if 'classifier.weight' in state_dict:
        args['num_classes'] = int(state_dict['classifier.weight'].shape[0])
    elif any(k.startswith('conv_head.') for k in state_dict):
        args['num_classes'] = 0  # trained or exported without a classifier
    if 'conv_stem.weight' in state_dict:
        args['in_chans'] = int(state_dict['conv_stem.weight'].shape[1])
    return args


def build_model_for_weights(
        model_name: str,
        genotype: GenotypeLike,
        state_dict: Mapping[str, torch.Tensor],
        architecture_kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Build `model_name` with `genotype` (and `architecture_kwargs`, e.g. output_stride) and load `state_dict` into
    it, strictly, in eval mode.

    Search-space checkpoints are mapped onto the genotype first; num_classes and in_chans follow the weights. Weights
    that record no genotype (a plain state_dict of another tool) are taken as `genotype`'s, which the caller names,
    once each slot's keys and shapes fit it.
    """
    import timm

    model = timm.create_model(model_name, genotype=genotype, **infer_head(state_dict), **(architecture_kwargs or {}))
    weights = fixed_state_dict(state_dict, model)
    verify_state_dict(weights, model)
    weights.setdefault(GENOTYPE_STATE_KEY, codes_tensor(model.slot_codes()))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f'The weights do not fit {model_name} outside the enhancer slots (another model width or '
                         f'depth?): {e}') from e
    return model.eval()
