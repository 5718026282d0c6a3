"""Export a trained Meta-Pooling model for the Hugging Face Hub, and optionally push it.

    python -m train_hooks.publish --checkpoint output/train/RUN/model_best.pth.tar \\
        --model mobilenetv2_metapool_100 --out exports/my-model [--genotype runs/search1/genotype.json] \\
        [--repo-id ORG/NAME --push]

Accepts timm train.py checkpoints (`checkpoint-*.pth.tar`, `model_best.pth.tar`), the PMPL search's `last.pth` and
safetensors files; the genotype is the one the weights carry. Search-space weights are refused unless
--from-supernet names the sub-network to export.
The export is checked by loading it back with `timm.create_model('local-dir:OUT', pretrained=True)`.
"""
import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

from timm.utils import ParseKwargs

__all__ = ['main']


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-metapool-publish',
        description='Export a Meta-Pooling checkpoint as a timm Hub folder (config.json, model.safetensors, '
                    'README.md), genotype included, and optionally push it to the Hugging Face Hub.')
    parser.add_argument('--checkpoint', required=True, help='timm train.py checkpoint, search last.pth, or state_dict')
    parser.add_argument('--model', required=True, help='architecture, e.g. mobilenetv2_metapool_100')
    parser.add_argument('--genotype', default=None,
                        help="genotype JSON path or string ('skip,global,...'); default: the one the weights carry")
    parser.add_argument('--from-supernet', action='store_true',
                        help='export the --genotype sub-network of search-space weights as they are (not retrained; '
                             'no metrics)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help="architecture kwargs the weights were trained with that they do not show (timm's "
                             "output_stride=16); default: those recorded in a train.py or search checkpoint")
    parser.add_argument('--out', required=True, help='new folder to write the export to (must not exist)')
    parser.add_argument('--repo-id', default=None, help='Hub repo ORG/NAME (named in the model card; used by --push)')
    parser.add_argument('--push', action='store_true', help='upload the export to --repo-id')
    parser.add_argument('--private', action='store_true', help='create the Hub repo as private')
    parser.add_argument('--token', default=None, help='Hugging Face token (default: the logged-in one / HF_TOKEN)')
    parser.add_argument('--use-ema', action='store_true', help="export the checkpoint's EMA weights")
    parser.add_argument('--search-plot', default=None, help='image of the search (e.g. alpha per slot) for the card')
    parser.add_argument('--metrics', default=None, help="JSON object of metrics, or timm train.py's summary.csv")
    parser.add_argument('--dataset', default=None, help='dataset name for the model card')
    return parser


def _check_model_name(model_name: str, checkpoint_arch: Optional[str]) -> None:
    import timm
    from timm.models import split_model_name_tag

    known = timm.list_models('*metapool*')
    if model_name not in known:
        raise ValueError(f"Unknown architecture {model_name!r}: publish exports Meta-Pooling models, one of "
                         f"{', '.join(known)}.")
    if checkpoint_arch and split_model_name_tag(checkpoint_arch)[0] != model_name:
        raise ValueError(f'The checkpoint was trained as {checkpoint_arch!r}, not {model_name!r}; pass '
                         f'--model {checkpoint_arch}.')


def _choose_genotype(requested: Optional[str], checkpoint, num_slots: int, from_supernet: bool):
    """The genotype to export: the one the weights carry (`integrity.GENOTYPE_STATE_KEY`), which --genotype may
    only confirm; for search-space weights (--from-supernet) the sub-network named by --genotype or the checkpoint.
    Weights that carry none (a plain state_dict of another tool) need --genotype."""
    from timm_metapool import Genotype
    from timm_metapool.loading import parse_checkpoint_genotype
    from timm_metapool.integrity import SEARCH_SLOT, codes_to_op_names, state_dict_codes
    from timm_metapool.pretrained import first_genotype_difference

    path = checkpoint.path
    codes = state_dict_codes(checkpoint.state_dict)
    if codes is not None and SEARCH_SLOT in codes:
        if not from_supernet:
            raise ValueError(
                f'Checkpoint {path!r} holds search-space (supernet) weights: every candidate of its open slots, '
                f'trained together, so no metrics of it describe one sub-network. Retrain the genotype (timm '
                f'train.py --model-kwargs genotype=...) and publish that checkpoint; or pass --from-supernet with '
                f'--genotype to export the sub-network\'s shared weights as they are, without metrics.')
        chosen = requested if requested is not None else checkpoint.genotype
        if chosen is None:
            raise ValueError(f'--from-supernet: checkpoint {path!r} does not say which sub-network to export; pass '
                             f'--genotype (e.g. the genotype.json of the search).')
        return parse_checkpoint_genotype(chosen, num_slots)
    if codes is None:
        if requested is None:
            raise ValueError(f'The weights in {path!r} do not record their genotype (a plain state_dict made '
                             f'without timm_metapool); pass --genotype with the one they were trained with.')
        return parse_checkpoint_genotype(requested, num_slots)
    names = codes_to_op_names(codes)
    if names is None:
        raise ValueError(f'The weights in {path!r} have slots holding modules that are none of the eight '
                         f'candidates (e.g. timm\'s SqueezeExcite put in the slots); they cannot be exported as a '
                         f'Meta-Pooling genotype.')
    genotype = Genotype(tuple(names))
    if requested is not None:
        difference = first_genotype_difference(genotype, parse_checkpoint_genotype(requested, num_slots))
        if difference:
            raise ValueError(f'--genotype disagrees with the genotype stored in the checkpoint\'s weights: '
                             f'{difference}. Leave --genotype out to use the stored one.')
    return genotype


def _read_card_metrics(path: str, checkpoint, use_ema: bool):
    """The model card's metrics: summary.csv's row of the checkpoint's epoch, refused where it describes other
    weights than those exported."""
    from timm_metapool import hub

    if path.endswith('.csv') and checkpoint.summary_describes_ema != use_ema:
        whose, fix = (("the EMA weights'", 'Add --use-ema to export the EMA weights') if not use_ema else
                      ("the trained weights' (timm evaluates the EMA only off --model-ema-force-cpu)",
                       'Drop --use-ema to export the weights the metrics describe'))
        raise ValueError(f"--metrics {path!r}: timm train.py's summary.csv of this run holds {whose} metrics, not "
                         f"those of the weights exported. {fix}, or give --metrics as a JSON object of the exported "
                         f"weights' metrics.")
    return hub.read_metrics(path, epoch=checkpoint.epoch)


def architecture_kwargs(given: Dict[str, Any], checkpoint) -> Dict[str, Any]:
    """What the checkpoint recorded, completed by --model-kwargs, which may not contradict it; only
    `loading.ARCHITECTURE_KWARGS` (the genotype has its own flag, and num_classes / in_chans follow the weights)."""
    from timm_metapool.loading import ARCHITECTURE_KWARGS

    other = sorted(set(given) - set(ARCHITECTURE_KWARGS))
    if other:
        raise ValueError(f"--model-kwargs takes {', '.join(ARCHITECTURE_KWARGS)}, not {', '.join(other)} (the genotype "
                         f"has --genotype; num_classes and in_chans follow the weights).")
    for name, value in given.items():
        recorded = checkpoint.architecture_kwargs.get(name)
        if recorded is not None and recorded != value:
            raise ValueError(f'--model-kwargs {name}={value} differs from the checkpoint, which records that its '
                             f'weights were trained with {name}={recorded}; an export must build the network they were '
                             f'trained as. Drop {name} from --model-kwargs.')
    return {**checkpoint.architecture_kwargs, **given}


def publish(args: argparse.Namespace) -> str:
    """Run the export (and push); returns the line a user loads the result with."""
    import timm
    from timm_metapool import hub, loading  # importing the package registers the architectures

    if args.push and not args.repo_id:
        raise ValueError('--push needs --repo-id ORG/NAME.')
    if args.repo_id:
        hub.check_repo_id(args.repo_id)
    token = hub.check_push_credentials(args.token) if args.push else None
    if os.path.lexists(args.out):  # a dangling symlink too
        raise FileExistsError(f'Output directory {args.out!r} already exists; give a new --out (nothing was written).')

    if args.from_supernet and args.metrics:
        raise ValueError('--from-supernet exports shared weights that were never trained as this sub-network: no '
                         'metrics describe them. Drop --metrics (or retrain the genotype and publish that).')
    checkpoint = loading.load_trained_checkpoint(args.checkpoint, use_ema=args.use_ema)
    metrics = _read_card_metrics(args.metrics, checkpoint, args.use_ema) if args.metrics else None
    _check_model_name(args.model, checkpoint.arch)
    # Presets ('skip', 'random:0') need the slot count; a parameter-free build is the one place that knows it.
    num_slots = timm.create_model(args.model, genotype='skip').num_slots
    genotype = _choose_genotype(args.genotype, checkpoint, num_slots, args.from_supernet)
    model = loading.build_model_for_weights(args.model, genotype, checkpoint.state_dict,
                                            architecture_kwargs(args.model_kwargs, checkpoint))

    out = hub.export_for_hub(
        model, args.out, model_name=args.model, repo_id=args.repo_id, data_config=checkpoint.data_config,
        search_plot=args.search_plot, metrics=metrics, dataset=args.dataset)
    print(f'Exported {args.model} with genotype {genotype} to {out}')
    if args.push:
        repo_id, commit = hub.push_export(out, args.repo_id, token=token, private=args.private)
        print(f'Pushed to https://huggingface.co/{repo_id} ({commit})')
        return f"timm.create_model('hf-hub:{repo_id}', pretrained=True)"
    return f"timm.create_model({f'local-dir:{out}'!r}, pretrained=True)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`timm-metapool-publish`: export (and push) a checkpoint, then print the line that loads it."""
    args = _parser().parse_args(argv)
    try:
        load_line = publish(args)
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f'timm-metapool-publish: error: {e}')
    print(f'Load it with:\n  import timm, timm_metapool\n  {load_line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
