"""Resuming a search: its checkpoint read safely and checked whole, the settings it keeps, and the checks that the
data, the model and the epoch length still fit it."""
import argparse
import os
from typing import Dict, List, Optional

import torch

from timm_metapool.integrity import check_weights_checksum

from .run_files import CHECKPOINT_FORMAT, CHECKPOINT_NAME, demo_data_dir, search_state_checksum


# What a resume reads of `PMPLSearch.state_dict()`.
_SEARCH_STATE_KEYS = ('weight_optimizer', 'arch_optimizer', 'fix_events')
# Every entry a resume reads, with the type it must have.
_CHECKPOINT_TYPES = dict(model=str, num_slots=int, epoch=int, global_step=int, state_dict=dict, search=dict,
                         log_rows=list, history=list, elapsed_s=(int, float), args=dict, num_classes=int)



def load_resume_state(args: argparse.Namespace) -> Optional[Dict]:
    """The checkpoint of `--resume`, checked to be a PMPL search of `--model` before any work starts."""
    if not args.resume:
        return None
    try:
        state = torch.load(args.resume, map_location='cpu', weights_only=True)  # never unpickles code
    except Exception as e:  # torch raises several types for files that are not checkpoints
        raise SystemExit(f'error: cannot read --resume {args.resume!r} as a search checkpoint (loaded with '
                         f'torch.load(weights_only=True), which refuses pickled code): {e}')
    if not isinstance(state, dict) or state.get('format_version') != CHECKPOINT_FORMAT or 'search' not in state:
        raise SystemExit(f'error: {args.resume!r} is not a PMPL search checkpoint (OUTPUT/{CHECKPOINT_NAME}).')
    missing = [key for key in _CHECKPOINT_TYPES if key not in state]
    mistyped = [key for key, kind in _CHECKPOINT_TYPES.items() if key in state and not isinstance(state[key], kind)]
    if missing or mistyped:
        problems = ([f"it lacks {', '.join(missing)}"] if missing else []) + (
            [f"{', '.join(mistyped)} {'has' if len(mistyped) == 1 else 'have'} the wrong type"] if mistyped else [])
        raise SystemExit(f"error: {args.resume!r} is a damaged search checkpoint: {'; '.join(problems)}. Start a new "
                         f"search, or restore the file from a copy.")
    try:
        check_weights_checksum(state.get('state_dict', {}), state.get('weights_sha256'), args.resume)
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    lacking = [key for key in _SEARCH_STATE_KEYS if key not in state['search']]
    recorded = state.get('search_sha256')
    if lacking or (recorded is not None and search_state_checksum(state['search']) != recorded):
        problem = (f"its search state lacks {', '.join(lacking)}" if lacking else
                   'its optimizer state (momentum, Adam moments) does not match the checksum written with it')
        raise SystemExit(f'error: {args.resume!r} is a damaged search checkpoint: {problem}. Start a new search, or '
                         f'restore the file from a copy.')
    return state


def check_same_split(args: argparse.Namespace, state: Dict, split: Dict) -> None:
    """The data still makes the train/meta split of the run being resumed (a file added, removed or renamed would
    move images between the splits, or shift them)."""
    saved = state.get('split')
    if saved is not None and saved['fingerprint'] != split['fingerprint']:
        raise SystemExit(f"error: the training data changed since the run being resumed: it made "
                         f"{saved['train_images']} train / {saved['meta_images']} meta images, and now makes "
                         f"{split['train_images']} / {split['meta_images']} (or the same counts of other images). A "
                         f"resumed search must keep its split: restore the data in --data-dir {args.data_dir!r}, "
                         f"or start a new search in a new --output.")


def check_same_steps_per_epoch(args: argparse.Namespace, state: Dict, steps_per_epoch: int, world_size: int) -> None:
    """The run being resumed counted its steps (the lr schedule, when slots were fixed) in epochs of the same length:
    -b and the number of processes must give the steps per epoch they gave."""
    saved = state.get('steps_per_epoch')  # absent: saved before it was recorded
    if saved is None or saved == steps_per_epoch:
        return
    raise SystemExit(f"error: the run being resumed made {saved} steps per epoch (-b {state['args'].get('batch_size')} "
                     f"on {state.get('world_size', 1)} process(es)); -b {args.batch_size} on {world_size} makes "
                     f"{steps_per_epoch}, and its learning-rate schedule and step counts are in the old steps. Resume "
                     f"with the same -b and number of processes, or start a new search in a new --output.")


def check_resumed_model(args: argparse.Namespace, state: Dict, in_chans: int) -> None:
    """The resumed checkpoint's weights fit the model these arguments build (`in_chans` input channels):
    architecture, classes, output stride, channels."""
    if state['model'] != args.model:
        raise SystemExit(f"error: {args.resume!r} is a search of {state['model']} with {state['num_slots']} slots, "
                         f"not of --model {args.model}; pass --model {state['model']} or drop --model.")
    if args.num_classes is not None and args.num_classes != state['num_classes']:
        raise SystemExit(f"error: --num-classes {args.num_classes} differs from the run being resumed, which has "
                         f"{state['num_classes']}; drop --num-classes to continue it.")
    searched_stride = state['args'].get('output_stride', args.output_stride)  # absent: saved before the flag existed
    if args.output_stride != searched_stride:
        searched = searched_stride or "the model's default (32)"
        raise SystemExit(f'error: --output-stride {args.output_stride} differs from the run being resumed, which was '
                         f'searched with {searched}; drop --output-stride to continue it.')
    trained_channels = state['state_dict']['conv_stem.weight'].shape[1]
    if in_chans != trained_channels:
        raise SystemExit(f'error: the run being resumed takes {trained_channels}-channel inputs, not '
                         f"{in_chans} (--in-chans, else --input-size's C); drop those flags to continue "
                         f'it.')


# Settings that make the train/meta split (the model's shapes are checked on their effect: `check_resumed_model`).
_SPLIT_SETTINGS = ('dataset', 'data_dir', 'train_split', 'seed', 'meta_fraction', 'max_images')
# Settings a resume puts into the restored optimizers (`PMPLSearch.apply_config` reports their changes).
_OPTIMIZER_SETTINGS = ('lr', 'momentum', 'weight_decay', 'arch_lr', 'arch_weight_decay')


def merge_resumed_args(args: argparse.Namespace, saved: Dict, explicit: set) -> List[str]:
    """A resumed run keeps the settings of the run it continues, except those given again explicitly; those that
    make the train/meta split must be given as they were. Returns a '--flag old -> new' line per setting given anew
    (the optimizers' own are reported by `PMPLSearch.apply_config`, which puts them into the restored optimizers)."""
    saved = dict(saved)
    run_dir = os.path.dirname(os.path.abspath(args.resume))
    data_dir_before = saved.get('data_dir')
    if data_dir_before and saved.get('output') and os.path.normpath(data_dir_before) == os.path.normpath(
            demo_data_dir(saved['output'])):
        # The demo dataset: found (or made) again in the run's folder, wherever that is now.
        saved['data_dir'], data_dir_before = None, demo_data_dir(run_dir)
    elif data_dir_before and not os.path.isabs(data_dir_before):
        if 'data_dir' not in explicit and not os.path.isdir(data_dir_before):
            raise SystemExit(f'error: the run being resumed read --data-dir {data_dir_before!r}, relative to the '
                             f'directory it ran in, which is not found from here; pass --data-dir with that folder.')
        data_dir_before = None  # saved by an earlier version, relative to an unknown directory: cannot compare
    for name in _SPLIT_SETTINGS:
        before = data_dir_before if name == 'data_dir' else saved.get(name)
        if name in explicit and not (name == 'data_dir' and before is None) and (
                _comparable(name, getattr(args, name)) != _comparable(name, before)):
            flag = '--' + name.replace('_', '-')
            raise SystemExit(f'error: {flag} {getattr(args, name)} differs from the run being resumed ({flag} '
                             f'{before}); it makes the train/meta split, which a resumed search keeps. Drop {flag} '
                             f'to continue that run, or start a new search in a new --output.')
    changes = []
    for name, value in saved.items():
        if name in ('resume', 'overwrite', 'output') or not hasattr(args, name):
            continue
        if name not in explicit:
            setattr(args, name, value)
        elif getattr(args, name) != value and name not in _SPLIT_SETTINGS + _OPTIMIZER_SETTINGS:
            changes.append(f"--{name.replace('_', '-')} {value} -> {getattr(args, name)}")
    return changes


def _comparable(name: str, value):
    if name == 'data_dir' and value is not None:
        return os.path.realpath(value)
    if name == 'dataset':
        return '' if value in ('', 'folder') else value  # timm reads both with its folder reader
    return value
