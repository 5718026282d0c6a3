"""A search run's files: the checkpoint (`last.pth`) and log written atomically, and what --overwrite sets aside. A
run never leaves a partial file, and nothing of another run sits beside its checkpoint. Reading a checkpoint back is
`resume`'s job."""
import argparse
import contextlib
import csv
import errno
import io
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

import torch

from timm_metapool.integrity import weights_checksum
from timm_metapool.pmpl import PMPLSearch


CHECKPOINT_FORMAT = 1


LOG_NAME, GENOTYPE_NAME, PLOT_NAME, CHECKPOINT_NAME, RETRAIN_NAME = (
    'search_log.csv', 'genotype.json', 'search.png', 'last.pth', 'retrain_command.txt')


RUN_OUTPUTS = (LOG_NAME, GENOTYPE_NAME, PLOT_NAME, CHECKPOINT_NAME, RETRAIN_NAME)

# Where a search without --data-dir generates the embedded demo dataset, inside its output folder.
DEMO_DATA_NAME = 'demo_data'


def demo_data_dir(output: str) -> str:
    """The demo dataset's folder of a search writing to `output`."""
    return os.path.join(output, DEMO_DATA_NAME)


@dataclass
class SearchSetup:
    """What a search runs on, fixed for the whole run: its checkpoint, log and summary record it."""
    num_classes: int
    split: Dict  # fingerprint, train_images, meta_images: what a resume checks is unchanged
    steps_per_epoch: int
    world_size: int  # processes (torchrun), which share each epoch's steps
    data_config: Dict  # timm's resolved data config (input size, mean, std, ...)
    bad_images_left_out: int = 0
    image_mode_note: str = ''  # what timm's train.py would not convert as the search did, or ''


@dataclass
class SearchProgress:
    """How far a search has got: what the checkpoint saves beside the weights and a resume restores."""
    epoch: int = 0
    global_step: int = 0
    log_rows: List[Dict] = field(default_factory=list)
    history: List[Dict] = field(default_factory=list)
    elapsed_s: float = 0.0

    @classmethod
    def from_checkpoint(cls, state: Dict) -> 'SearchProgress':
        return cls(epoch=state['epoch'], global_step=state['global_step'], log_rows=state['log_rows'],
                   history=state['history'], elapsed_s=state['elapsed_s'])


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


def atomic_save(obj: object, path: str) -> None:
    """`torch.save` to `path` whole or not at all (see `atomic_write_bytes`)."""
    buffer = io.BytesIO()  # serialised in memory, so that a full disk is an OSError of our own write
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def atomic_write_text(text: str, path: str) -> None:
    """UTF-8 `text` to `path` whole or not at all (see `atomic_write_bytes`)."""
    atomic_write_bytes(text.encode('utf-8'), path)


def write_log_csv(rows: List[Dict], path: str) -> None:
    """The epoch log rows as a CSV (one column per key of the first row), written atomically; nothing for no rows."""
    if not rows:
        return
    text = io.StringIO(newline='')
    writer = csv.DictWriter(text, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), path)


def search_state_checksum(search_state: Dict) -> str:
    """`weights_checksum` over every tensor of a `PMPLSearch.state_dict()` (the optimizers' momentum and moments),
    named by its path in the nested state."""
    tensors = {}

    def collect(value, path: str) -> None:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(item, f'{path}/{key}')
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                collect(item, f'{path}/{index}')

    collect(search_state, '')
    return weights_checksum(tensors)


@contextlib.contextmanager
def removed_if_nothing_saved(output: str, enabled: bool = True) -> Iterator[None]:
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


# --overwrite moves the earlier run's files here until the new run has saved its first checkpoint.
PREVIOUS_RUN_NAME = '.previous_run'


def set_aside_previous_run(output: str) -> List[str]:
    """--overwrite: move the files an earlier search wrote in `output` (and their `.tmp`) into OUTPUT/.previous_run,
    so that none of them sits beside the new run's; other files (the demo dataset, the user's) stay. The new run's
    first checkpoint deletes them (`discard_previous_run`); a run that stops before it puts them back
    (`previous_run_restored_on_failure`). Returns the names moved."""
    aside = os.path.join(output, PREVIOUS_RUN_NAME)
    moved = []
    for name in RUN_OUTPUTS:
        for found in (name, name + '.tmp'):
            if os.path.lexists(os.path.join(output, found)):
                os.makedirs(aside, exist_ok=True)
                os.replace(os.path.join(output, found), os.path.join(aside, found))
                moved.append(found)
    return moved


def discard_previous_run(output: str) -> None:
    """Delete what `set_aside_previous_run` kept, once the new run has a checkpoint of its own."""
    shutil.rmtree(os.path.join(output, PREVIOUS_RUN_NAME), ignore_errors=True)


@contextlib.contextmanager
def previous_run_restored_on_failure(output: str, enabled: bool = True) -> Iterator[None]:
    """Put the earlier run's files back (replacing any of the new run's) when the new run stops before its first
    checkpoint: an --overwrite that fails loses nothing."""
    try:
        yield
    except BaseException:
        aside = os.path.join(output, PREVIOUS_RUN_NAME)
        if enabled and os.path.isdir(aside):
            for name in os.listdir(aside):
                os.replace(os.path.join(aside, name), os.path.join(output, name))
            os.rmdir(aside)
            print(f"(the run stopped before its first checkpoint: the earlier run's files are back in {output!r})",
                  file=sys.stderr, flush=True)
        raise


def save_checkpoint(args: argparse.Namespace, search: PMPLSearch, progress: SearchProgress,
                    setup: SearchSetup) -> None:
    """OUTPUT/last.pth, written atomically: a kill mid-write leaves the previous epoch's file intact."""
    model = search.model
    genotype = model.genotype
    state_dict = model.state_dict()
    search_state = search.state_dict()
    atomic_save(dict(
        format_version=CHECKPOINT_FORMAT, model=args.model, num_slots=model.num_slots, epoch=progress.epoch,
        global_step=progress.global_step, state_dict=state_dict, weights_sha256=weights_checksum(state_dict),
        search=search_state, search_sha256=search_state_checksum(search_state),
        genotype=None if genotype is None else genotype.to_string(),
        log_rows=progress.log_rows, history=progress.history, elapsed_s=progress.elapsed_s,
        args=_args_for_resume(args), num_classes=setup.num_classes, split=setup.split,
        steps_per_epoch=setup.steps_per_epoch, world_size=setup.world_size,
    ), os.path.join(args.output, CHECKPOINT_NAME))


def _args_for_resume(args: argparse.Namespace) -> Dict:
    """The arguments a resume restores, with absolute paths: a resume may run from another directory."""
    saved = dict(vars(args), output=os.path.abspath(args.output))
    if args.data_dir is not None:
        saved['data_dir'] = os.path.abspath(args.data_dir)
    return saved
