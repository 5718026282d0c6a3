"""A search run's files: the checkpoint (`last.pth`) and log written atomically, resume checks, and what --overwrite
clears. A run never leaves a partial file, and nothing of another run sits beside its checkpoint."""
import argparse
import contextlib
import csv
import errno
import io
import os
import shutil
import sys
from typing import Dict, List, Optional

import torch

from timm_metapool.integrity import check_weights_checksum, weights_checksum
from timm_metapool.pmpl import PMPLSearch


CHECKPOINT_FORMAT = 1


LOG_NAME, GENOTYPE_NAME, PLOT_NAME, CHECKPOINT_NAME, RETRAIN_NAME = (
    'search_log.csv', 'genotype.json', 'search.png', 'last.pth', 'retrain_command.txt')


# Every entry a resume reads, with the type it must have.
_CHECKPOINT_TYPES = dict(model=str, num_slots=int, epoch=int, global_step=int, state_dict=dict, search=dict,
                         log_rows=list, history=list, elapsed_s=(int, float), args=dict, num_classes=int)


RUN_OUTPUTS = (LOG_NAME, GENOTYPE_NAME, PLOT_NAME, CHECKPOINT_NAME, RETRAIN_NAME)


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write `path` whole or not at all: through `path.tmp`, renamed into place once flushed to disk. A failed write
    removes the `.tmp` and leaves the previous file as it was; a full disk says so."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = 'the previous one is kept' if os.path.exists(path) else 'nothing was written'
            raise SystemExit(f'error: No space left on device while writing {path} ({len(data)} bytes); {kept}. '
                             f'Free space there, then resume with --resume {os.path.join(os.path.dirname(path), CHECKPOINT_NAME)} '
                             f'if it exists, or start again.') from None
        raise


def atomic_save(obj, path: str) -> None:
    buffer = io.BytesIO()  # serialised in memory, so that a full disk is an OSError of our own write
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode('utf-8'), path)


def write_log_csv(rows: List[Dict], path: str) -> None:
    if not rows:
        return
    text = io.StringIO(newline='')
    writer = csv.DictWriter(text, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), path)


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
        raise SystemExit(f'error: --output-stride {args.output_stride} differs from the run being resumed, which was '
                         f'searched with {searched_stride}; drop --output-stride to continue it.')
    trained_channels = state['state_dict']['conv_stem.weight'].shape[1]
    if in_chans != trained_channels:
        raise SystemExit(f'error: the run being resumed takes {trained_channels}-channel inputs, not '
                         f"{in_chans} (--in-chans, else --input-size's C); drop those flags to continue "
                         f'it.')


# Settings that make the train/meta split (the model's shapes are checked on their effect: `check_resumed_model`).
_SPLIT_SETTINGS = ('dataset', 'data_dir', 'train_split', 'seed', 'meta_fraction', 'max_images')


def merge_resumed_args(args: argparse.Namespace, saved: Dict, explicit: set) -> None:
    """A resumed run keeps the settings of the run it continues, except those given again explicitly; those that
    make the train/meta split must be given as they were."""
    saved = dict(saved)
    run_dir = os.path.dirname(os.path.abspath(args.resume))
    data_dir_before = saved.get('data_dir')
    if data_dir_before and saved.get('output') and os.path.normpath(data_dir_before) == os.path.normpath(
            os.path.join(saved['output'], 'demo_data')):
        # The demo dataset: found (or made) again in the run's folder, wherever that is now.
        saved['data_dir'], data_dir_before = None, os.path.join(run_dir, 'demo_data')
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
    for name, value in saved.items():
        if name not in explicit and name not in ('resume', 'overwrite', 'output') and hasattr(args, name):
            setattr(args, name, value)


def _comparable(name: str, value):
    if name == 'data_dir' and value is not None:
        return os.path.realpath(value)
    if name == 'dataset':
        return '' if value in ('', 'folder') else value  # timm reads both with its folder reader
    return value


@contextlib.contextmanager
def removed_if_nothing_saved(output: str, enabled: bool = True):
    """Undo what a run wrote into a fresh output dir when it stops before its first checkpoint.

    Data-dependent errors (a batch larger than the split, an unreadable dataset, a NaN loss in the first epoch) come
    after the demo dataset is generated in OUTPUT/demo_data; left there, it would get the corrected rerun refused
    for a non-empty output dir. A dir that held anything before the run (`--overwrite`, `--resume`) is left as is.
    """
    existed = os.path.isdir(output)
    fresh = not existed or not os.listdir(output)
    try:
        yield
    except BaseException:
        if enabled and fresh and not os.path.isfile(os.path.join(output, CHECKPOINT_NAME)):
            _remove_run_output(output, keep_dir=existed)
        raise


def _remove_run_output(output: str, keep_dir: bool) -> None:
    if not os.path.isdir(output):
        return
    for entry in os.listdir(output):
        path = os.path.join(output, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if not keep_dir:
        os.rmdir(output)
    print(f'(nothing had been saved: removed what this run wrote in {output!r})', file=sys.stderr, flush=True)


def clear_previous_run(output: str) -> List[str]:
    """Delete the files an earlier search wrote in `output` (and their `.tmp`), so that none of them sits beside
    the new run's; other files (the demo dataset, the user's) stay. Returns the names deleted."""
    removed = []
    for name in RUN_OUTPUTS:
        for path in (os.path.join(output, name), os.path.join(output, name + '.tmp')):
            if os.path.lexists(path):
                os.remove(path)
                removed.append(os.path.basename(path))
    return removed


def save_checkpoint(args, search: PMPLSearch, model, epoch: int, global_step: int, log_rows, history, elapsed: float,
                    num_classes: int, split: Dict) -> None:
    """OUTPUT/last.pth, written atomically: a kill mid-write leaves the previous epoch's file intact."""
    genotype = model.genotype
    state_dict = model.state_dict()
    atomic_save(dict(
        format_version=CHECKPOINT_FORMAT, model=args.model, num_slots=model.num_slots, epoch=epoch,
        global_step=global_step, state_dict=state_dict, weights_sha256=weights_checksum(state_dict),
        search=search.state_dict(),
        genotype=None if genotype is None else genotype.to_string(), log_rows=log_rows, history=history,
        elapsed_s=elapsed, args=_args_for_resume(args), num_classes=num_classes, split=split,
    ), os.path.join(args.output, CHECKPOINT_NAME))


def _args_for_resume(args: argparse.Namespace) -> Dict:
    """The arguments a resume restores, with absolute paths: a resume may run from another directory."""
    saved = dict(vars(args), output=os.path.abspath(args.output))
    if args.data_dir is not None:
        saved['data_dir'] = os.path.abspath(args.data_dir)
    return saved
