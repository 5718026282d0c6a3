"""Export and Hub push: the genotype travels with the weights.

An export is a folder timm loads by itself (`timm.create_model('local-dir:DIR')`, or `'hf-hub:ORG/NAME'` once
uploaded): `config.json` and `model.safetensors` written by timm's `save_for_hf` (genotype in `model_args`), the
genotype and a checksum of the tensors in the safetensors header metadata, and a `README.md` model card. Nothing in
the package imports this module; loading is `loading.py`.
"""
import copy
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .blocks import slot_channels
from .integrity import describe_key_mismatch, weights_checksum
from .loading import built_output_stride, infer_head
from .pretrained import SAFETENSORS_CHECKSUM_KEY, SAFETENSORS_GENOTYPE_KEY, SAFETENSORS_OUTPUT_STRIDE_KEY

__all__ = [
    'PAPER_CITATION', 'check_loads_as_built', 'read_metrics', 'render_model_card', 'verify_export', 'export_for_hub',
    'check_repo_id', 'check_push_credentials', 'push_export',
]

# Title and authors as printed on the paper; add the venue and year from the publisher's page when citing.
PAPER_CITATION = """@misc{dong_metapooling,
  title={Progressive Meta-Pooling Learning for Lightweight Image Classification Model},
  author={Dong, Peijie and Niu, Xin and Tian, Zhiliang and Li, Lujun and Wang, Xiaodong and Wei, Zimian and
          Pan, Hengyue and Li, Dongsheng}
}"""


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
        built = timm.create_model(model_name, genotype=model.genotype, **infer_head(state)).state_dict()
    detail = describe_key_mismatch(built, state)
    if detail:
        raise ValueError(f'The model\'s weights would not load into {model_name} built from its genotype ({detail}): '
                         f'export the model as timm.create_model builds it, not a features_only model, nor one '
                         f'rewritten by timm\'s reparameterize_model (its Global Context Enhancers\' BN is folded '
                         f'away). Nothing was written.')


def _genotype_table(model: nn.Module) -> str:
    rows = ['| slot | block | channels | enhancer |', '|---:|---|---:|---|']
    for index, (name, block, op_name) in enumerate(zip(model.enhancer_slot_names(), model.enhancer_blocks(),
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
    output_stride = built_output_stride(model)
    if output_stride is not None:
        metadata[SAFETENSORS_OUTPUT_STRIDE_KEY] = str(output_stride)
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


# An export is written to a hidden sibling folder first; this marker file inside tells it from the user's folders.
_STAGING_MARKER = '.timm_metapool_export_in_progress'


def _staging_prefix(out_dir: Path) -> str:
    return f'.{out_dir.name}.metapool-export-'


def _remove_stale_staging(out_dir: Path) -> None:
    """Delete the staging folders an interrupted export to `out_dir` left beside it (a killed publish): only
    folders with the export's own prefix and marker file, never a user's."""
    for stale in out_dir.parent.glob(_staging_prefix(out_dir) + '*'):
        if stale.is_dir() and not stale.is_symlink() and (stale / _STAGING_MARKER).is_file():
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
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=out_dir.parent))
    (staging / _STAGING_MARKER).touch()
    was_training = model.training  # exported and checked in eval mode; a model mid-training goes back to training
    try:
        exported = _with_contiguous_weights(model)
        model_args = dict(genotype=model.genotype.to_string(), **getattr(model, 'architecture_kwargs', {}))
        save_for_hf(exported.eval(), str(staging), model_args=model_args,
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
        (staging / _STAGING_MARKER).unlink()
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
