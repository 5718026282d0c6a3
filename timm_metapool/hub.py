"""The genotype travels with the weights: checkpoint reading, Hub export, model card and load-time checks.

An export is a folder timm loads by itself (`timm.create_model('local-dir:DIR')`, or `'hf-hub:ORG/NAME'` once
uploaded): `config.json` and `model.safetensors` written by timm's `save_for_hf` (genotype in `model_args`), the
genotype repeated in the safetensors header metadata, and a `README.md` model card.
Load-time checks (`checkpoint_filter_fn`) refuse weights whose enhancer slots disagree with the model's genotype.
"""
import argparse
import copy
import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .blocks import SLOT_ATTR, slot_channels
from .genotype import Genotype, GenotypeLike
from .integrity import (
    GENOTYPE_STATE_KEY, ChecksumMismatchError, GenotypeMismatchError, check_genotype_codes, check_weights_checksum,
    codes_tensor, describe_key_mismatch, weights_checksum,
)
from .mixed_op import ARCH_PARAM_NAME
from .pretrained import (
    SAFETENSORS_CHECKSUM_KEY, SAFETENSORS_GENOTYPE_KEY, check_weights_genotype, local_weights_file,
    read_safetensors_metadata,
)

__all__ = [
    'PAPER_CITATION', 'TrainedCheckpoint', 'GenotypeMismatchError', 'ChecksumMismatchError', 'load_trained_checkpoint',
    'enhancer_slot_names', 'fixed_state_dict', 'verify_state_dict', 'warm_start_state_dict', 'checkpoint_filter_fn',
    'parse_checkpoint_genotype', 'build_model_for_weights', 'check_loads_as_built', 'read_metrics',
    'render_model_card', 'export_for_hub', 'check_repo_id', 'check_push_credentials', 'push_export',
]

_logger = logging.getLogger(__name__)

# Title and authors as printed on the paper; add the venue and year from the publisher's page when citing.
PAPER_CITATION = """@misc{dong_metapooling,
  title={Progressive Meta-Pooling Learning for Lightweight Image Classification Model},
  author={Dong, Peijie and Niu, Xin and Tian, Zhiliang and Li, Lujun and Wang, Xiaodong and Wei, Zimian and
          Pan, Hengyue and Li, Dongsheng}
}"""

# timm train.py keys that describe evaluation preprocessing; the export's pretrained_cfg records them.
_DATA_CONFIG_KEYS = ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')


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


def enhancer_slot_names(model: nn.Module) -> List[str]:
    """Module path of each enhancer slot's block (`blocks.i.j`), in slot order."""
    return model.enhancer_slot_names()


def _slot_state(state_dict: Mapping[str, torch.Tensor], block_name: str) -> Dict[str, torch.Tensor]:
    prefix = f'{block_name}.{SLOT_ATTR}.'
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def fixed_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map search-space (supernet) slot weights onto `model`'s fixed genotype.

    An open MetaPooling slot stores every candidate (`meta_pool.ops.<op>.*`) and its logits (`meta_pool.arch_alpha`);
    a fixed slot stores the chosen op's weights as `meta_pool.*`. The chosen op's weights are kept, the rest dropped: the same
    result as `model.fix_to_genotype()` on the supernet. Slots already in fixed form pass through unchanged.
    """
    out = dict(state_dict)
    for block_name, op_name in zip(enhancer_slot_names(model), model.genotype):
        prefix = f'{block_name}.{SLOT_ATTR}.'
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
    for index, (block_name, op_name, slot) in enumerate(zip(enhancer_slot_names(model), genotype, slots)):
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
    for index, slot in enumerate(model.enhancer_slots()):
        prefix = _slot_prefix(model, slot)
        slot_keys = [k for k in own if k.startswith(prefix)]
        if slot_keys and not any(k.startswith(prefix) for k in state_dict):
            out.update({k: own[k] for k in slot_keys})
            fresh.append(index)
    out[GENOTYPE_STATE_KEY] = own[GENOTYPE_STATE_KEY]
    if fresh:
        _logger.info(f'Warm start from weights without a genotype: enhancer slots {fresh} start fresh, every other '
                     f'layer is loaded.')
    return out


def _slot_prefix(model: nn.Module, slot: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is slot) + '.'


def check_file_checksum(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """`ChecksumMismatchError` when the pretrained weights file on disk (an export: `local-dir:`, `hf-hub:`, an
    overlay `file`) records a checksum that `state_dict`, read from it, does not match."""
    from timm.models._builder import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(model.pretrained_cfg.get('architecture'), pretrained_cfg=dict(model.pretrained_cfg))
    weights_file = local_weights_file(cfg)
    if weights_file and weights_file.endswith('.safetensors'):
        check_weights_checksum(state_dict, read_safetensors_metadata(weights_file).get(SAFETENSORS_CHECKSUM_KEY),
                               weights_file)
    if model.genotype is not None:
        # Checked again here: a Hub download lands on disk only after the builder's own check ran.
        check_weights_genotype(cfg, model.genotype, enhancer_slot_names(model))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm `pretrained_filter_fn`: check pretrained weights before loading them.

    Refuses a corrupted export (its checksum) and weights made for another genotype (the genotype they carry, their
    file's metadata, each slot's keys and shapes), checks that timm can load or drop the classifier
    (`check_classifier_size`), and completes weights without a genotype (timm's base model) as a warm start.
    """
    check_file_checksum(state_dict, model)
    if GENOTYPE_STATE_KEY not in state_dict:
        state_dict = warm_start_state_dict(state_dict, model)
    if model.genotype is not None:
        verify_state_dict(state_dict, model)
    else:
        check_genotype_codes(state_dict[GENOTYPE_STATE_KEY], model.slot_codes(), model.enhancer_slot_names())
    check_classifier_size(state_dict, model)
    return state_dict


def _infer_head(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, int]:
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
) -> nn.Module:
    """Build `model_name` with `genotype` and load `state_dict` into it, strictly, in eval mode.

    Search-space checkpoints are mapped onto the genotype first; num_classes and in_chans follow the weights.
    """
    import timm

    model = timm.create_model(model_name, genotype=genotype, **_infer_head(state_dict))
    weights = fixed_state_dict(state_dict, model)
    verify_state_dict(weights, model)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f'The weights do not fit {model_name} outside the enhancer slots (another model width or '
                         f'depth?): {e}') from e
    return model.eval()


def check_loads_as_built(model: nn.Module, model_name: str) -> None:
    """Raise ValueError unless `model`'s weights load into `model_name` built from its genotype, as a loader of the
    export will build it: the same state_dict keys and shapes (compared on the 'meta' device, nothing allocated)."""
    import timm

    built_as = model.pretrained_cfg.get('architecture')
    if built_as is not None and built_as != model_name:
        raise ValueError(f'The model was built as {built_as}, not {model_name}: export it under its own name (leave '
                         f'model_name out). Nothing was written.')
    state = model.state_dict()
    with torch.device('meta'):
        built = timm.create_model(model_name, genotype=model.genotype, **_infer_head(state)).state_dict()
    missing = [k for k in built if k not in state]
    unexpected = [k for k in state if k not in built]
    reshaped = [k for k in built if k in state and built[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        detail = describe_key_mismatch(missing, unexpected, reshaped)
        raise ValueError(f'The model\'s weights would not load into {model_name} built from its genotype ({detail}): '
                         f'export the model as timm.create_model builds it, not a features_only model, nor one '
                         f'rewritten by timm\'s reparameterize_model (its Global Context Enhancers\' BN is folded '
                         f'away). Nothing was written.')


def _genotype_table(model: nn.Module) -> str:
    rows = ['| slot | block | channels | enhancer |', '|---:|---|---:|---|']
    for index, (name, block, op_name) in enumerate(zip(enhancer_slot_names(model), model.enhancer_blocks(),
                                                       model.genotype)):
        rows.append(f'| {index} | `{name}` | {slot_channels(block)} | `{op_name}` |')
    return '\n'.join(rows)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = ['| metric | value |', '|---|---:|']
    rows += [f'| {k} | {v} |' for k, v in metrics.items()]
    return '\n'.join(rows)


def read_metrics(path: Union[str, os.PathLike], epoch: Optional[int] = None) -> Dict[str, Any]:
    """Metrics for the model card: a flat JSON object, or timm train.py's `summary.csv`: the row of `epoch` (the
    exported checkpoint's) when given, else the best `eval_top1` row."""
    path = str(path)
    try:
        if path.endswith('.csv'):
            with open(path, newline='', encoding='utf-8') as f:
                rows = list(csv.DictReader(f))
            if not rows:
                raise ValueError('it has no rows')
            if epoch is None:
                row = max(rows, key=lambda r: float(r.get('eval_top1') or 'nan'))
            else:
                matching = [r for r in rows if r.get('epoch') not in (None, '') and float(r['epoch']) == epoch]
                if not matching:
                    raise ValueError(f"it has no row for epoch {epoch}, the checkpoint's (is it the summary.csv of "
                                     f"the checkpoint's own run?)")
                row = matching[-1]  # a resumed run appends the epoch again: the last row is the weights saved
            return {k: v for k, v in row.items() if k.startswith('eval_') or k == 'epoch'}
        with open(path, encoding='utf-8') as f:
            metrics = json.load(f)
        if not isinstance(metrics, dict):
            raise ValueError('it is not a JSON object')
        return metrics
    except (OSError, ValueError) as e:
        raise ValueError(f'Cannot read metrics {path!r}: {e}. Give a JSON object of name -> value or timm '
                         f"train.py's summary.csv.") from e


def render_model_card(
        model: nn.Module,
        model_name: str,
        repo_id: Optional[str] = None,
        search_plot: Optional[str] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        dataset: Optional[str] = None,
) -> str:
    """README.md for an export: timm's model card plus the genotype table, search plot, metrics and citation."""
    from timm.models._hub import generate_readme

    load_name = f'hf-hub:{repo_id}' if repo_id else 'local-dir:PATH/TO/THIS/FOLDER'
    genotype = model.genotype.to_string()
    sections = [
        'MobileNetV2 with Meta-Pooling receptive-field enhancers: one enhancer per inverted-residual block, chosen '
        'by Progressive Meta-Pooling Learning (PMPL). The genotype below is part of the architecture; it is stored '
        "in `config.json` (`model_args.genotype`) and in the safetensors metadata, and timm rebuilds it on load.",
        f'\n## Genotype\n\n`{genotype}`\n\n{_genotype_table(model)}',
    ]
    if search_plot:
        sections.append(f'\n## Search\n\n![PMPL search]({search_plot})')
    if metrics:
        sections.append(f'\n## Metrics\n\n{_metrics_table(metrics)}')
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': model_name,
        'Params (M)': round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        'Classes': model.num_classes,
        'Papers': ['Progressive Meta-Pooling Learning for Lightweight Image Classification Model'],
    }
    if dataset:
        details['Dataset'] = dataset
    usage = (
        '```python\nimport timm\nimport timm_metapool  # registers the mobilenetv2_metapool_* architectures\n\n'
        f"model = timm.create_model('{load_name}', pretrained=True).eval()\n"
        'print(model.genotype)\n```\n'
    )
    card = dict(
        tags=['image-classification', 'timm', 'timm-metapool', 'meta-pooling'],
        license=model.pretrained_cfg.get('license', 'apache-2.0'),
        description='\n'.join(sections),
        details=details,
        usage=usage,
        citation=PAPER_CITATION,
    )
    return generate_readme(card, repo_id.split('/')[-1] if repo_id else model_name)


def _write_safetensors_with_genotype(model: nn.Module, path: Path, model_name: str) -> None:
    import safetensors.torch

    # timm's save_for_hf writes the same tensors without header metadata; rewrite them with the genotype attached.
    state_dict = model.state_dict()
    metadata = {'format': 'pt', SAFETENSORS_GENOTYPE_KEY: model.genotype.to_string(), 'architecture': model_name,
                SAFETENSORS_CHECKSUM_KEY: weights_checksum(state_dict)}
    safetensors.torch.save_file(state_dict, str(path), metadata=metadata)


def verify_export(model: nn.Module, folder: Union[str, os.PathLike], size: int = 64) -> None:
    """Load `folder` back the way users will (timm's `local-dir:`) and require `model`'s genotype and outputs on a
    seeded random batch in the model's input channels, dtype and device. Outputs are compared up to float rounding
    (relative 1e-5): a model rewritten by `reparameterize_model` pools after its projections, the reloaded one
    before them. RuntimeError if the export does not reproduce the model."""
    import timm

    reference = next(model.parameters())
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).to(reference).eval()
    x = torch.randn(2, model.conv_stem.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    x = x.to(reference)
    with torch.no_grad():
        expected, got = model.eval()(x), reloaded(x)
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if reloaded.genotype != model.genotype or not error <= 1e-5:
        raise RuntimeError(f'The export does not reproduce the model (genotype {reloaded.genotype} loaded back, '
                           f'relative output error {error:.2g}); nothing was written. Please report this as a bug.')


# File signatures of the image formats a model card on the Hub displays.
_IMAGE_SIGNATURES = {'.png': (b'\x89PNG\r\n\x1a\n',), '.jpg': (b'\xff\xd8\xff',), '.jpeg': (b'\xff\xd8\xff',),
                     '.gif': (b'GIF87a', b'GIF89a'), '.svg': (b'<?xml', b'<svg')}


def check_image_file(path: Union[str, os.PathLike], what: str) -> None:
    """FileNotFoundError / ValueError unless `path` is a PNG, JPEG, GIF or SVG file whose first bytes say so."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} {str(path)!r} does not exist.')
    signatures = _IMAGE_SIGNATURES.get(Path(path).suffix.lower())
    with open(path, 'rb') as f:
        head = f.read(16).lstrip()
    if signatures is None or not head.startswith(signatures):
        raise ValueError(f'{what} {str(path)!r} is not a PNG, JPEG, GIF or SVG image (by its name and first bytes); '
                         f'give the search.png the search wrote.')


def _current_umask() -> int:
    umask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(umask)
    return umask


def _make_readable_as_user_files(folder: Path) -> None:
    """Give `folder` and its files the permissions of ones the user makes: mkdtemp makes the folder private (0700)
    and safetensors writes its file 0600, which would hide the weights from others on shared storage."""
    umask = _current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _with_contiguous_weights(model: nn.Module) -> nn.Module:
    """`model`, or a copy of it with contiguous (NCHW) weights where any are not: safetensors stores contiguous
    tensors only, and a model trained channels-last (timm train.py --channels-last) keeps its conv weights so. The
    user's model keeps its layout."""
    if all(t.is_contiguous() for t in model.state_dict().values()):
        return model
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def _remove_stale_staging(out_dir: Path) -> None:
    """Delete the hidden staging folders an interrupted export to `out_dir` left beside it (a killed publish)."""
    for stale in out_dir.parent.glob(f'.{out_dir.name}.*'):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def export_for_hub(
        model: nn.Module,
        out_dir: Union[str, os.PathLike],
        model_name: Optional[str] = None,
        repo_id: Optional[str] = None,
        data_config: Optional[Dict[str, Any]] = None,
        search_plot: Optional[Union[str, os.PathLike]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        dataset: Optional[str] = None,
) -> Path:
    """Write `config.json`, `model.safetensors` (genotype in its metadata) and `README.md` to a new `out_dir`.

    Everything is written to a temporary sibling folder first, loaded back through timm and compared with the model
    (`verify_export`), and moved into place at the end, so a failure leaves nothing half-written and an existing
    `out_dir` is never touched.
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    if os.path.lexists(out_dir):  # a dangling symlink too: os.replace could not put the export there
        raise FileExistsError(f'Output directory {str(out_dir)!r} already exists; give a new --out (nothing was '
                              f'written).')
    if model.genotype is None:
        raise ValueError('The model has open search slots; fix them (model.fix_to_genotype()) before exporting.')
    if search_plot is not None:
        check_image_file(search_plot, 'Search plot')
    if repo_id is not None:
        check_repo_id(repo_id)  # the model card's load line names it
    model_name = model_name or model.pretrained_cfg['architecture']
    check_loads_as_built(model, model_name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    was_training = model.training  # exported and checked in eval mode; a model mid-training goes back to training
    try:
        exported = _with_contiguous_weights(model)
        save_for_hf(exported.eval(), str(staging), model_args=dict(genotype=model.genotype.to_string()),
                    safe_serialization=True, data_config=data_config)
        _write_safetensors_with_genotype(exported, staging / 'model.safetensors', model_name)
        plot_name = None
        if search_plot is not None:
            plot_name = 'search_plot' + Path(search_plot).suffix
            shutil.copyfile(search_plot, staging / plot_name)
        card = render_model_card(model, model_name, repo_id=repo_id, search_plot=plot_name, metrics=metrics,
                                 dataset=dataset)
        (staging / 'README.md').write_text(card, encoding='utf-8')
        _make_readable_as_user_files(staging)
        verify_export(exported, staging)
        if os.path.lexists(out_dir):  # appeared while we were writing
            raise FileExistsError(f'Output directory {str(out_dir)!r} appeared during the export; nothing was '
                                  f'written to it.')
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return out_dir


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if the Hub would take it ('ORG/NAME' or 'NAME'); a ValueError saying why not, before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f'{repo_id!r} is not a Hugging Face repo id: {e} Give ORG/NAME, e.g. me/mnv2-metapool.') \
            from None
    return repo_id


def check_push_credentials(token: Optional[str] = None) -> str:
    """The Hugging Face token a push will use; fails before any work if there is none or the Hub is offline."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError('HF_HUB_OFFLINE is set: cannot push. Unset it, or publish without --push and upload the '
                           'export folder later.')
    token = token or get_token()
    if not token:
        raise RuntimeError('No Hugging Face token found: run `hf auth login` (or set HF_TOKEN, or pass --token) '
                           'before --push. The export folder can be uploaded later with `hf upload`.')
    return token


def push_export(
        out_dir: Union[str, os.PathLike],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: str = 'Add Meta-Pooling model',
) -> Tuple[str, Any]:
    """Upload an export folder as it is (weights, genotype metadata, card) to `repo_id`; returns (repo_id, commit).

    Same steps as timm's `push_to_hf_hub` (create the repo if needed, upload one folder), but uploading the files
    already written: `push_to_hf_hub` re-serialises the model and would drop the genotype from the safetensors header.
    """
    from huggingface_hub import HfApi
    from timm import __version__ as timm_version

    check_repo_id(repo_id)
    token = check_push_credentials(token)
    api = HfApi(token=token, library_name='timm', library_version=timm_version)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), commit_message=commit_message)
    return repo_id, commit
