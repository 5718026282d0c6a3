"""PMPL search on timm's data pipeline: `python -m train_hooks.search` / `timm-metapool-search`.

Runs Algorithm 1 (timm_metapool.pmpl) over a timm dataset, with the meta split carved from the training split, and
writes OUTPUT/genotype.json, search_log.csv, search.png, last.pth and retrain_command.txt. Works in one process or
under `torchrun` (DistributedDataParallel for the weights, alpha gradients averaged across ranks).
"""
import argparse
import contextlib
import csv
import datetime
import errno
import io
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import timm
from PIL import Image, ImageMode
from timm.data import create_dataset, create_loader, create_transform, resolve_data_config
from timm.data.dataset_factory import _search_split  # the rule create_dataset finds a split's folder by
from timm.scheduler import CosineLRScheduler

import timm_metapool  # noqa: F401  (registers the models)
from timm_metapool.data import (
    BadImageError, DatasetSplit, dataset_class_names, dataset_targets, generate_demo_dataset, split_fingerprint,
    stored_image_mode, stratified_split)
from timm_metapool.base_weights import load_base_weights
from timm_metapool.integrity import check_weights_checksum, weights_checksum
from timm_metapool.ops import OP_NAMES
from timm_metapool.decision import PAPER_ARCH_LR, auto_arch_lr, budget_shortfall, search_verdict
from timm_metapool.pmpl import InvalidSetting, PMPLConfig, PMPLSearch

from .image_check import CHECK_MODES, find_bad_images, sample_paths
from .search_plot import plot_search

CHECKPOINT_FORMAT = 1
# Folder names of splits that must never be trained on (timm's evaluation synonyms, plus 'test').
_HELD_OUT_SPLIT_NAMES = ('val', 'valid', 'validation', 'eval', 'evaluation', 'test')
LOG_NAME, GENOTYPE_NAME, PLOT_NAME, CHECKPOINT_NAME, RETRAIN_NAME = (
    'search_log.csv', 'genotype.json', 'search.png', 'last.pth', 'retrain_command.txt')
_CHECKPOINT_KEYS = ('model', 'num_slots', 'epoch', 'global_step', 'state_dict', 'search', 'log_rows', 'history',
                    'elapsed_s', 'args', 'num_classes')
RUN_OUTPUTS = (LOG_NAME, GENOTYPE_NAME, PLOT_NAME, CHECKPOINT_NAME, RETRAIN_NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-metapool-search', description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data (timm.data.create_dataset)')
    data.add_argument('--data-dir', default=None,
                      help='dataset root; omit to generate and use the embedded demo dataset in OUTPUT/demo_data')
    data.add_argument('--dataset', default='', help="timm dataset spec: '' (folder), 'torch/fashion_mnist', 'hfds/...'")
    data.add_argument('--train-split', default='train')
    data.add_argument('--dataset-download', action='store_true',
                      help='let torch/ and tfds/ datasets that can download themselves do so (as timm train.py)')
    data.add_argument('--meta-fraction', type=float, default=0.5,
                      help='share of each class of the training split moved to the meta split (never validation)')
    data.add_argument('--max-images', type=int, default=None,
                      help='search on a class-stratified, seeded sample of about this many training images (each '
                           'class takes its rounded share; at least 2 per class)')
    data.add_argument('--num-classes', type=int, default=None, help='default: read from the dataset')
    data.add_argument('--in-chans', type=int, default=None, help="default: --input-size's C, else 3")
    data.add_argument('--img-size', type=int, default=None)
    data.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    data.add_argument('--mean', type=float, nargs='+', default=None)
    data.add_argument('--std', type=float, nargs='+', default=None)
    data.add_argument('--interpolation', default='')
    data.add_argument('--crop-pct', type=float, default=None)
    data.add_argument('--input-img-mode', default=None,
                      help="mode images are converted to when read ('RGB', 'L', ...); default: 'RGB' for 3 input "
                           "channels, else 'L' (as timm's train.py)")
    data.add_argument('--workers', '-j', type=int, default=4)
    data.add_argument('--check-images', default='header', choices=CHECK_MODES,
                      help="check every training image once before the search: its header and size, a full decode, "
                           "or not at all")
    data.add_argument('--skip-bad-images', action='store_true',
                      help='leave the images the check finds bad out of both splits (default: stop and list them)')
    aug = parser.add_argument_group('train-split augmentation (timm.data.create_loader)')
    aug.add_argument('--aa', default=None, help="auto-augment policy, e.g. 'rand-m9-mstd0.5'")
    aug.add_argument('--reprob', type=float, default=0.0)
    aug.add_argument('--remode', default='pixel')
    aug.add_argument('--recount', type=int, default=1)
    aug.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0])
    aug.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.])
    aug.add_argument('--hflip', type=float, default=0.5)
    aug.add_argument('--vflip', type=float, default=0.0)
    aug.add_argument('--color-jitter', type=float, default=0.4)
    aug.add_argument('--train-interpolation', default='random')
    aug.add_argument('--no-aug', action='store_true')
    search = parser.add_argument_group('PMPL (defaults: paper Sec. 3.1)')
    search.add_argument('--model', default='mobilenetv2_metapool_100')
    search.add_argument('--init-weights', default=None, metavar='PATH_OR_TIMM_TAG',
                        help='start the shared layers from the base timm model\'s weights: a .pth or .safetensors '
                             'state_dict, or a timm pretrained tag (e.g. mobilenetv2_100.ra_in1k); a classifier of '
                             'another class count starts fresh')
    search.add_argument('--epochs', type=int, default=30, help='at most this many epochs; ends once all are fixed')
    search.add_argument('--batch-size', '-b', type=int, default=128,
                        help='global batch: under torchrun each process takes an equal share')
    search.add_argument('--meta-batch-size', type=int, default=None, help='global; default: --batch-size')
    search.add_argument('--lr', type=float, default=0.05, help='zeta: SGD lr (cosine) and virtual-step size')
    search.add_argument('--momentum', type=float, default=0.9)
    search.add_argument('--weight-decay', type=float, default=4e-5)
    search.add_argument('--arch-lr', type=_arch_lr_arg, default='auto',
                        help=f"eta: Adam lr of alpha; 'auto': the paper's {PAPER_ARCH_LR:g}, raised when the planned "
                             f"steps are too few for it to reach Eq. 4's margin (timm_metapool.decision)")
    search.add_argument('--arch-weight-decay', type=float, default=1e-3)
    search.add_argument('--rho', type=float, default=0.2, help='Eq. 4 early-stopping margin')
    search.add_argument('--first-order', action='store_true', help='DARTS first-order: no virtual step')
    search.add_argument('--no-early-stop', action='store_true',
                        help='never fix slots mid-search (ablation); all slots are forced to argmax at the end')
    search.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    search.add_argument('--drop-path', type=float, default=0.0)
    search.add_argument('--seed', type=int, default=0)
    run = parser.add_argument_group('run')
    run.add_argument('--output', default=None, help='output dir (required unless --resume)')
    run.add_argument('--resume', default=None, help='OUTPUT/last.pth of an earlier run to continue')
    run.add_argument('--overwrite', action='store_true', help='allow writing into an existing output dir')
    run.add_argument('--device', default=None, help="default: 'cuda' when available, else 'cpu'")
    run.add_argument('--amp', action='store_true', help='mixed precision (GPU)')
    run.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    run.add_argument('--channels-last', action='store_true')
    run.add_argument('--quiet', action='store_true', help='no progress bar; one line per epoch (for log files)')
    run.add_argument('--history-interval', type=int, default=10, help='record softmax(alpha) every N steps')
    run.add_argument('--dist-timeout', type=float, default=300.0,
                     help='seconds a rank waits for the others (torchrun) before the search stops with an error')
    return parser


def _arch_lr_arg(value: str):
    """--arch-lr: 'auto' or a number (range-checked with the other settings by `pmpl_config`)."""
    if value == 'auto':
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None


def _out_of_range(flag: str, rule: str, value) -> SystemExit:
    return SystemExit(f'error: {flag} must be {rule}, got {value}.')


def _require(in_range: bool, flag: str, rule: str, value) -> None:
    if not in_range:
        raise _out_of_range(flag, rule, value)


def _flag_value(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace('-', '_'))


def input_channels(args: argparse.Namespace) -> int:
    """The model's input channels, resolved as timm's train.py does: --in-chans, else --input-size's C, else 3."""
    if args.in_chans is not None:
        return args.in_chans
    return args.input_size[0] if args.input_size is not None else 3


def image_mode(args: argparse.Namespace) -> str:
    """The mode the dataset converts images to, as timm's train.py chooses it."""
    if args.input_img_mode is not None:
        return args.input_img_mode
    return 'RGB' if input_channels(args) == 3 else 'L'


def check_channels(args: argparse.Namespace) -> None:
    """The channel count, --mean and --std agree (timm asserts on these only once the data config is resolved)."""
    channels = input_channels(args)
    if args.input_size is not None and args.input_size[0] != channels:
        raise SystemExit(f'error: --in-chans {args.in_chans} and --input-size {" ".join(map(str, args.input_size))} '
                         f'disagree on the number of input channels; give one of them.')
    if channels != 3 and (args.mean is None or args.std is None):
        raise SystemExit(f"error: {channels} input channel(s) need --mean and --std (the models' defaults are "
                         f"ImageNet's 3-channel values), e.g. --mean 0.5 --std 0.25 (one value is used for every "
                         f"channel).")
    for flag in ('--mean', '--std'):
        value = _flag_value(args, flag)
        if value is not None and len(value) not in (1, channels):
            raise SystemExit(f'error: {flag} takes 1 value or one per input channel ({channels}), got {len(value)}.')
    if args.std is not None:
        _require(min(args.std) > 0, '--std', 'positive', args.std)
    if args.input_img_mode is not None:
        try:
            bands = len(ImageMode.getmode(args.input_img_mode).bands)
        except KeyError:
            raise SystemExit(f"error: --input-img-mode {args.input_img_mode!r} is not a PIL image mode; use e.g. "
                             f"'RGB', 'L' or 'RGBA'.") from None
        if bands != channels:
            raise SystemExit(f'error: --input-img-mode {args.input_img_mode} gives {bands}-channel images, but the '
                             f'model takes {channels} (--in-chans, else --input-size\'s C, else 3); make them agree.')


def check_args(args: argparse.Namespace) -> None:
    """Fail before any work with a message naming the bad input and the fix."""
    _require(0.0 < args.meta_fraction < 1.0, '--meta-fraction', 'strictly between 0 and 1', args.meta_fraction)
    if args.max_images is not None:
        _require(args.max_images >= 2, '--max-images', 'at least 2 per class', args.max_images)
    for flag in ('--epochs', '--batch-size', '--history-interval', '--recount'):
        value = _flag_value(args, flag)
        _require(value >= 1, flag, 'at least 1', value)
    _require(args.dist_timeout > 0, '--dist-timeout', 'positive', args.dist_timeout)
    for flag in ('--meta-batch-size', '--num-classes', '--in-chans', '--img-size'):
        value = _flag_value(args, flag)
        if value is not None:  # 0 would otherwise pass for "not given"
            _require(value >= 1, flag, 'at least 1', value)
    if args.input_size is not None:
        _require(min(args.input_size) >= 1, '--input-size', 'three sizes of at least 1', args.input_size)
    _require(args.workers >= 0, '--workers', 'at least 0', args.workers)
    _require(0 <= args.seed < 2 ** 32, '--seed', 'in [0, 2**32)', args.seed)
    for flag in ('--reprob', '--hflip', '--vflip'):
        value = _flag_value(args, flag)
        _require(0.0 <= value <= 1.0, flag, 'a probability in [0, 1]', value)
    for flag in ('--smoothing', '--drop-path'):
        value = _flag_value(args, flag)
        _require(0.0 <= value < 1.0, flag, 'in [0, 1)', value)
    check_channels(args)
    pmpl_config(args)
    if args.device is not None:
        try:
            device_type = torch.device(args.device).type
        except RuntimeError:
            device_type = None
        if device_type not in ('cpu', 'cuda'):
            raise SystemExit(f"error: --device {args.device!r} is not a device the search runs on; use 'cpu', 'cuda' "
                             f"or 'cuda:N'.")
    if args.model not in timm.list_models('*metapool*'):
        raise SystemExit(f"error: --model {args.model!r} is not a Meta-Pooling model; choose one of "
                         f"{', '.join(timm.list_models('*metapool*'))}.")
    if args.resume:
        args.output = args.output or os.path.dirname(os.path.abspath(args.resume))
    if not args.output:
        raise SystemExit('error: --output is required (a new directory for the genotype, logs and checkpoint).')
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise SystemExit(f'error: --output {args.output!r} is a file, not a directory; nothing was touched. Choose a '
                         f'new --output.')
    resuming_in_place = args.resume and os.path.isdir(args.output) and os.path.samefile(
        args.output, os.path.dirname(os.path.abspath(args.resume)))
    if os.path.isdir(args.output) and os.listdir(args.output) and not (resuming_in_place or args.overwrite):
        checkpoint = os.path.join(args.output, CHECKPOINT_NAME)
        resume = (f'--resume {checkpoint} to continue it, ' if os.path.isfile(checkpoint) else
                  'no checkpoint is in it (the run stopped before its first epoch ended), so ')
        raise SystemExit(f'error: output dir {args.output!r} exists and is not empty; nothing was touched. Pass '
                         f'{resume}--overwrite to start a new search there (the files of the earlier run are '
                         f'deleted first), or choose a new --output.')
    if args.data_dir is not None and args.dataset == '' and not os.path.isdir(args.data_dir):
        raise SystemExit(f'error: --data-dir {args.data_dir!r} does not exist.')
    if args.data_dir is not None and _reads_folders(args.dataset) and os.path.isdir(args.data_dir):
        check_folder_layout(args)  # a tar file or a missing path is left to the reader's own error


def _reads_folders(dataset: str) -> bool:
    """Whether --dataset reads class folders under --data-dir, finding the split's subfolder as timm does."""
    return '/' not in dataset or dataset in ('torch/folder', 'torch/image_folder')


def check_folder_layout(args: argparse.Namespace) -> None:
    """Refuse folder layouts that would mix other data into the training split: timm reads the whole --data-dir as
    the split when it has no folder for it (a validation folder beside it included), and a run's --output under
    the split's folder becomes one more class at the next read (a resume, or the retrain)."""
    train_root = _search_split(args.data_dir, args.train_split)
    if os.path.samefile(train_root, args.data_dir):
        subfolders = sorted(e.name for e in os.scandir(args.data_dir) if e.is_dir())
        held_out = [name for name in subfolders if name.lower() in _HELD_OUT_SPLIT_NAMES]
        if held_out:
            raise SystemExit(
                f"error: --data-dir {args.data_dir!r} has no {args.train_split!r} folder, so timm would read all of it "
                f"as the training split, the {', '.join(map(repr, held_out))} folder included, and the search would "
                f"train on held-out images. Pass --train-split with the training folder's name (folders there: "
                f"{', '.join(subfolders)}), or point --data-dir at the training images.")
    output = os.path.realpath(args.output)
    if output == os.path.realpath(train_root) or output.startswith(os.path.realpath(train_root) + os.sep):
        raise SystemExit(f'error: --output {args.output!r} is inside the training images ({train_root!r}): its files '
                         f'would be read as one more class. Choose an --output outside it.')


def pmpl_config(args: argparse.Namespace, arch_lr: Optional[float] = None) -> PMPLConfig:
    """Algorithm 1's settings from the command line; one out of range stops the run naming its flag.

    `arch_lr` is the value `--arch-lr auto` resolved to (`resolve_arch_lr`); before the data is read, 'auto' is
    checked as the paper's value.
    """
    if arch_lr is None:
        arch_lr = PAPER_ARCH_LR if args.arch_lr == 'auto' else args.arch_lr
    try:
        return PMPLConfig(
            lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, arch_lr=arch_lr,
            arch_weight_decay=args.arch_weight_decay, rho=args.rho, first_order=args.first_order,
            early_stop=not args.no_early_stop)
    except InvalidSetting as e:
        raise _out_of_range('--' + e.name.replace('_', '-'), e.rule, e.value) from None


def candidate_count(model) -> int:
    """The most candidates any open slot mixes (Eq. 4's margin is hardest to reach there)."""
    return max((len(p) for p in model.slot_probabilities() if p is not None), default=len(OP_NAMES))


def resolve_arch_lr(args: argparse.Namespace, model, planned_steps: int) -> Tuple[float, str]:
    """alpha's Adam lr for this run and a line saying where it comes from (`decision.auto_arch_lr` for 'auto')."""
    if args.arch_lr != 'auto':
        return args.arch_lr, f'alpha lr (eta) {args.arch_lr:g} (--arch-lr)'
    arch_lr = auto_arch_lr(planned_steps, candidate_count(model), args.rho)
    if arch_lr == PAPER_ARCH_LR:
        return arch_lr, f"alpha lr (eta) {arch_lr:g} (--arch-lr auto: the paper's, enough for {planned_steps} steps)"
    return arch_lr, (f"alpha lr (eta) {arch_lr:.4g} (--arch-lr auto: {planned_steps} planned steps are too few for the "
                     f"paper's {PAPER_ARCH_LR:g} to reach Eq. 4's margin; --arch-lr {PAPER_ARCH_LR:g} to use it)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Distributed:
    """torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK); a single process otherwise."""

    def __init__(self, device: Optional[str], timeout_s: float = 300.0):
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        use_cuda = (device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
        if use_cuda and not torch.cuda.is_available():
            raise SystemExit('error: --device cuda asked for, but CUDA is not available.')
        self.device = torch.device(f'cuda:{local_rank}' if use_cuda and self.world_size > 1 else
                                   (device or ('cuda' if use_cuda else 'cpu')))
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.enabled:
            # A rank that stops responding ends the others' waits after timeout_s, instead of blocking them forever.
            dist.init_process_group(backend='nccl' if use_cuda else 'gloo',
                                    timeout=datetime.timedelta(seconds=timeout_s))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_over_ranks(self, values: Dict[str, float], keys: Sequence[str]) -> Dict[str, float]:
        """`values` with the entries named in `keys` summed over every rank (each rank sees its own shard)."""
        if not self.enabled:
            return values
        totals = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return {**values, **dict(zip(keys, totals.tolist()))}

    def close(self) -> None:
        if self.enabled:
            dist.destroy_process_group()


def make_datasets(args: argparse.Namespace, dist_env: Distributed):
    """Two dataset objects for the train split (one per loader: different transforms), cut into train/meta views,
    the number of classes, and the mode its reader stores images in (`stored_image_mode`)."""
    def load(download: bool):
        try:
            return create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                  download=download, input_img_mode=image_mode(args))
        except ImportError as e:
            raise SystemExit(f'error: --dataset {args.dataset!r} needs the {e.name!r} package, which is not installed: '
                             f'pip install {e.name}') from None
        except (FileNotFoundError, RuntimeError, ValueError, AssertionError) as e:  # timm asserts on unknown names
            hint = ''
            if not args.dataset_download and args.dataset.startswith(('torch/', 'tfds/')):
                hint = (' Put its files under --data-dir where the dataset class looks for them, or add '
                        '--dataset-download to let it download them.')
            raise SystemExit(f'error: cannot read the training split of --data-dir {args.data_dir!r} '
                             f'(--dataset {args.dataset!r}, --train-split {args.train_split!r}): {e}{hint}')
    # With --dataset-download under torchrun the main rank downloads while the others wait, then they read its files.
    staggered = args.dataset_download and dist_env.enabled
    if staggered and not dist_env.is_main:
        dist.barrier()
    train_base = load(args.dataset_download)
    if staggered and dist_env.is_main:
        dist.barrier()
    meta_base = load(False)
    if len(train_base) == 0:
        raise SystemExit(f'error: the training split of {args.data_dir!r} has no images.')
    targets = dataset_targets(train_base)
    class_names = dataset_class_names(train_base)
    num_classes = len(set(targets))
    bad = check_training_images(args, train_base, dist_env)
    try:
        pool = [i for i in range(len(targets)) if i not in bad]
        if args.max_images is not None and args.max_images < len(pool):
            pool_targets = [targets[i] for i in pool]
            _, local = stratified_split(pool_targets, args.max_images / len(pool), seed=args.seed,
                                        class_names=class_names)
            check_sample_keeps_every_class(pool_targets, local, args.max_images)
            pool = [pool[i] for i in local]
        local_train, local_meta = stratified_split(
            [targets[i] for i in pool], args.meta_fraction, seed=args.seed, class_names=class_names)
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    train_idx, meta_idx = [pool[i] for i in local_train], [pool[i] for i in local_meta]
    mode = image_mode(args)  # also for datasets whose reader does not apply it (torchvision's)
    train_set = DatasetSplit(train_base, train_idx, image_mode=mode)
    train_set.bad_images_left_out = len(bad)  # reported in genotype.json
    return (train_set, DatasetSplit(meta_base, meta_idx, image_mode=mode), num_classes, stored_image_mode(train_set))


def check_training_images(args: argparse.Namespace, dataset, dist_env: Distributed) -> Dict[int, str]:
    """Index -> problem of the bad files of a folder dataset (`image_check`); stops the run listing them unless
    --skip-bad-images, which leaves them out of both splits."""
    paths = None if args.check_images == 'off' else sample_paths(dataset)
    if paths is None:
        return {}
    bad = find_bad_images(paths, decode=args.check_images == 'decode', workers=max(args.workers, 1) * 2,
                          progress=dist_env.is_main and not args.quiet)
    if not bad:
        return {}
    listed = '\n'.join(f'  {paths[i]}: {problem}' for i, problem in sorted(bad.items())[:20])
    more = f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else ''
    if not args.skip_bad_images:
        raise SystemExit(f'error: {len(bad)} of the {len(paths)} training images cannot be used:\n{listed}{more}\n'
                         f'Repair or remove them, or pass --skip-bad-images to leave them out of both splits.')
    if dist_env.is_main:
        print(f'--skip-bad-images: leaving out {len(bad)} of the {len(paths)} training images:\n{listed}{more}',
              flush=True)
    return bad


def per_process_batches(args: argparse.Namespace, world_size: int, input_size: Sequence[int]) -> Tuple[int, int]:
    """The train and meta batch of each process: --batch-size and --meta-batch-size are global batches, split evenly
    over the processes, and each process's batch must let BatchNorm train on the last feature map (stride 32)."""
    last_map = math.ceil(input_size[1] / 32) * math.ceil(input_size[2] / 32)
    batches = []
    for flag in ('--batch-size', '--meta-batch-size'):
        value = _flag_value(args, flag) or args.batch_size
        if value % world_size:
            raise SystemExit(f'error: {flag} {value} is the global batch, split evenly over the {world_size} '
                             f'processes; give a multiple of {world_size}.')
        if value // world_size * last_map < 2:
            raise SystemExit(f'error: {flag} {value} over {world_size} process(es) at input {input_size[1]}x'
                             f'{input_size[2]} gives BatchNorm one value per channel on the last 1x1 feature map, '
                             f'which it cannot train on; give at least {2 * world_size}, or a larger input size.')
        batches.append(value // world_size)
    return batches[0], batches[1]


def check_sample_keeps_every_class(targets: Sequence[int], pool: Sequence[int], max_images: int) -> None:
    """Refuse a --max-images sample that leaves a class fewer than the 2 images its train and meta parts need: each
    class takes its rounded share, so a small class can keep 1 where the total allows 2 per class."""
    total, sampled = Counter(int(t) for t in targets), Counter(int(targets[i]) for i in pool)
    if min(sampled[c] for c in total) >= 2:
        return
    needed = max(math.ceil(2 * len(targets) / n) for n in total.values())  # every class's share at least 2
    raise SystemExit(f'error: --max-images {max_images} leaves some class fewer than 2 images in the sample (each '
                     f'class takes its share, rounded, and the smallest has {min(total.values())} of the '
                     f'{len(targets)} images): the train and meta splits each need one. Give --max-images '
                     f'{min(needed, len(targets))} or more, or leave it out.')


def make_loaders(args, train_set, meta_set, data_config, dist_env: Distributed):
    batch, meta_batch = per_process_batches(args, dist_env.world_size, data_config['input_size'])
    if len(train_set) < batch * dist_env.world_size:
        raise SystemExit(f'error: the train part of the split has {len(train_set)} images, fewer than one global '
                         f'batch of {args.batch_size}; lower --batch-size.')
    train_loader = create_loader(
        train_set, input_size=data_config['input_size'], batch_size=batch, is_training=True, no_aug=args.no_aug,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=dist_env.enabled, use_prefetcher=False,
        # Fresh workers each epoch re-seed from the per-epoch seed, so a resumed run sees the same augmentations.
        persistent_workers=False, device=dist_env.device,
    )
    meta_set.transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'])
    sampler = (torch.utils.data.distributed.DistributedSampler(meta_set, shuffle=True, seed=args.seed, drop_last=True)
               if dist_env.enabled else torch.utils.data.RandomSampler(meta_set))
    meta_loader = torch.utils.data.DataLoader(
        meta_set, batch_size=meta_batch, sampler=sampler, drop_last=True, num_workers=args.workers)
    if len(meta_loader) == 0:
        raise SystemExit(f'error: the meta split has {len(meta_set)} images, fewer than one meta batch; lower '
                         f'--meta-batch-size or raise --meta-fraction.')
    return train_loader, meta_loader


def cycle_batches(loader, epoch: int):
    """Meta batches for one epoch, restarting the loader when it runs out."""
    while True:
        if hasattr(loader.sampler, 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 10_000  # a new order on each restart within the epoch


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


def snapshot_probabilities(model) -> List[Optional[List[float]]]:
    return [None if p is None else [round(float(v), 6) for v in p] for p in model.slot_probabilities()]


def unconverted_by_train_py(args: argparse.Namespace, stored_mode: Optional[str], input_size: Sequence[int]) -> str:
    """A note for what the retrain command cannot carry, or ''. timm's train.py converts images to its
    input_img_mode in its own readers only: a torchvision dataset's images that the search converted would reach
    it unconverted (a shape error at the first batch)."""
    mode = image_mode(args)
    if not args.dataset.startswith('torch/') or stored_mode in (None, mode):
        return ''
    return (f"note: {args.dataset} stores {stored_mode!r} images, which the search converted to {mode!r}; timm's "
            f"train.py does not convert torchvision datasets' images, so retrain with --input-size "
            f"{Image.getmodebands(stored_mode)} {input_size[1]} {input_size[2]} and --mean/--std to match them.")


def retrain_command(args, genotype_path: str, num_classes: int, data_config, device: torch.device) -> str:
    """timm train.py's command line for the paper's retrain recipe on the searched data (shell-quoted); off CUDA it
    names the device, since train.py defaults to cuda."""
    data = args.data_dir or os.path.join(args.output, 'demo_data')
    quote = shlex.quote
    parts = [
        'python train.py', f'--data-dir {quote(data)}', f'--dataset {quote(args.dataset)}' if args.dataset else '',
        '--device-modules timm_metapool', f'--model {args.model}',
        f'--model-kwargs {quote("genotype=" + genotype_path)}',
        f'--train-split {quote(args.train_split)}' if args.train_split != 'train' else '',
        f'--num-classes {num_classes}', f"--input-size {' '.join(map(str, data_config['input_size']))}",
        # the normalisation and image mode the genotype was searched with, which train.py would not derive
        f"--mean {' '.join(map(str, args.mean))}" if args.mean else '',
        f"--std {' '.join(map(str, args.std))}" if args.std else '',
        f'--input-img-mode {quote(args.input_img_mode)}' if args.input_img_mode else '',
        '--epochs 200 --sched cosine --opt sgd --lr 0.05 --momentum 0.9 --weight-decay 4e-5 -b 128',
        f'--device {device.type}' if device.type != 'cuda' else '',
    ]
    return ' '.join(p for p in parts if p)


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
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise SystemExit(f"error: {args.resume!r} is a damaged search checkpoint: it lacks {', '.join(missing)}. "
                         f"Start a new search, or restore the file from a copy.")
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


def check_resumed_model(args: argparse.Namespace, state: Dict) -> None:
    """The resumed checkpoint's weights fit the model these arguments build: architecture, classes, channels."""
    if state['model'] != args.model:
        raise SystemExit(f"error: {args.resume!r} is a search of {state['model']} with {state['num_slots']} slots, "
                         f"not of --model {args.model}; pass --model {state['model']} or drop --model.")
    if args.num_classes is not None and args.num_classes != state['num_classes']:
        raise SystemExit(f"error: --num-classes {args.num_classes} differs from the run being resumed, which has "
                         f"{state['num_classes']}; drop --num-classes to continue it.")
    trained_channels = state['state_dict']['conv_stem.weight'].shape[1]
    if input_channels(args) != trained_channels:
        raise SystemExit(f'error: the run being resumed takes {trained_channels}-channel inputs, not '
                         f"{input_channels(args)} (--in-chans, else --input-size's C); drop those flags to continue "
                         f'it.')


def explicit_arg_names(argv: Optional[Sequence[str]]) -> set:
    """Names of the options actually given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


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


def run(args: argparse.Namespace, explicit: Optional[set] = None) -> Dict:
    """Run a search for parsed `args`; `explicit` names the options the user gave (for --resume)."""
    if args.resume:
        if not os.path.isfile(args.resume):
            raise SystemExit(f'error: --resume {args.resume!r} is not a file; point it at OUTPUT/{CHECKPOINT_NAME}.')
        resume_state = load_resume_state(args)
        merge_resumed_args(args, resume_state['args'], explicit if explicit is not None else set(vars(args)))
        check_resumed_model(args, resume_state)
    else:
        resume_state = None
    check_args(args)
    dist_env = Distributed(args.device, timeout_s=args.dist_timeout)
    checkpoint = os.path.join(args.output, CHECKPOINT_NAME)
    try:
        with removed_if_nothing_saved(args.output, enabled=dist_env.is_main):
            return _run(args, dist_env, resume_state)
    except BadImageError as e:
        raise SystemExit(f'error: {str(e).strip().splitlines()[-1]}') from None
    except FloatingPointError as e:
        kept = f'Last good checkpoint: {checkpoint}' if os.path.isfile(checkpoint) else 'No epoch had completed.'
        raise SystemExit(f'error: {e} {kept}')
    except RuntimeError as e:  # gloo raises a plain RuntimeError on a timeout, nccl a DistBackendError
        if not (dist_env.enabled and (isinstance(e, dist.DistError) or 'timed out' in str(e).lower())):
            raise
        kept = f'resume from {checkpoint}' if os.path.isfile(checkpoint) else 'no epoch had completed'
        raise SystemExit(f'error: rank {dist_env.rank}: another rank stopped responding for --dist-timeout '
                         f'{args.dist_timeout:g} s ({type(e).__name__}); the search stops here ({kept}).') from None
    finally:
        dist_env.close()


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


def _run(args: argparse.Namespace, dist_env: Distributed, resume_state: Optional[Dict]) -> Dict:
    log = (lambda *a: print(*a, flush=True)) if dist_env.is_main else (lambda *a: None)
    if dist_env.is_main:
        os.makedirs(args.output, exist_ok=True)
        if args.overwrite and resume_state is None:
            removed = clear_previous_run(args.output)
            if removed:
                log(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {args.output}")
    if args.data_dir is None:
        args.data_dir = os.path.join(args.output, 'demo_data')
        if dist_env.is_main and not os.path.isdir(args.data_dir):
            log(f'No --data-dir: generating the embedded demo dataset in {args.data_dir}')
            generate_demo_dataset(args.data_dir)
        if dist_env.enabled:
            dist.barrier()
        args.img_size = args.img_size or 32

    train_set, meta_set, found_classes, stored_mode = make_datasets(args, dist_env)
    split = dict(fingerprint=split_fingerprint(train_set, meta_set, root=args.data_dir), train_images=len(train_set),
                 meta_images=len(meta_set))
    if resume_state is not None:
        check_same_split(args, resume_state, split)
    num_classes = args.num_classes or found_classes
    if num_classes < found_classes:
        raise SystemExit(f'error: --num-classes {num_classes} is fewer than the {found_classes} classes of the training '
                         f'split; leave it out to use the dataset\'s count.')
    seed_everything(args.seed)
    model = timm.create_model(args.model, num_classes=num_classes, in_chans=input_channels(args),
                              drop_path_rate=args.drop_path)
    if args.init_weights and resume_state is None:  # a resumed search restores its own weights
        try:
            fresh = load_base_weights(model, args.init_weights)
        except (OSError, ValueError) as e:
            raise SystemExit(f'error: --init-weights: {e}')
        log(f'Shared layers loaded from {args.init_weights}; {len(fresh)} tensors keep their initialisation (the '
            f'enhancer slots\' own, and a classifier of another class count).')
    data_config = resolve_data_config(vars(args), model=model)
    model.to(dist_env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, meta_loader = make_loaders(args, train_set, meta_set, data_config, dist_env)

    steps_per_epoch = len(train_loader)
    arch_lr, arch_lr_note = resolve_arch_lr(args, model, args.epochs * steps_per_epoch)
    config = pmpl_config(args, arch_lr)
    amp_dtype = getattr(torch, args.amp_dtype)
    autocast = (lambda: torch.autocast(dist_env.device.type, dtype=amp_dtype)) if args.amp else contextlib.nullcontext
    scaler = torch.amp.GradScaler(dist_env.device.type) if args.amp and amp_dtype == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    search = PMPLSearch(model, config, loss_fn=loss_fn, wrap=dist_env.wrap, autocast=autocast, grad_scaler=scaler)

    start_epoch, global_step, log_rows, history, elapsed = 0, 0, [], [], 0.0
    if resume_state is not None:
        state = resume_state
        if state['num_slots'] != model.num_slots:
            raise SystemExit(f"error: {args.resume!r} has {state['num_slots']} slots, {args.model} has "
                             f'{model.num_slots}; it was made by another version of the model.')
        search.load_state_dict(state['search'], state['state_dict'])
        for change in search.apply_config(config):
            log(f'Resume with a new setting: {change}')
        start_epoch, global_step = state['epoch'], state['global_step']
        log_rows, history, elapsed = state['log_rows'], state['history'], state['elapsed_s']
        log(f'Resumed {args.resume}: epoch {start_epoch}, {model.num_slots - len(model.open_slots())}/'
            f'{model.num_slots} slots fixed')
    # Built after a resume: fixing slots and resuming may replace the optimizer, the schedule depends only on the step.
    scheduler = CosineLRScheduler(search.weight_optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=0.0,
                                  t_in_epochs=False)

    log(f'PMPL search: {args.model}, {model.num_slots} slots, {len(train_set)} train / {len(meta_set)} meta images, '
        f'{num_classes} classes, input {data_config["input_size"]}, {dist_env.world_size} process(es) on '
        f'{dist_env.device}')
    log(arch_lr_note)
    shortfall = None if args.no_early_stop else budget_shortfall(
        arch_lr, args.epochs * steps_per_epoch, candidate_count(model), args.rho, epochs=args.epochs)
    if shortfall:
        log(f'warning: {shortfall}')
    note = unconverted_by_train_py(args, stored_mode, data_config['input_size'])
    if note:
        log(note)
    epoch = start_epoch
    while epoch < args.epochs and not search.done:
        t0 = time.time()
        seed_everything(args.seed + 1_000_003 * epoch + dist_env.rank)
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        meta_batches = cycle_batches(meta_loader, epoch)
        sums = dict(train_loss=0.0, meta_loss=0.0, train_correct=0, meta_correct=0, n=0, meta_n=0, steps=0, skipped=0)
        bar = None if args.quiet or not dist_env.is_main else _progress(steps_per_epoch, epoch, args.epochs)
        for images, targets in train_loader:
            meta_images, meta_targets = next(meta_batches)
            batches = [(t.to(dist_env.device, non_blocking=True)) for t in (images, targets, meta_images, meta_targets)]
            if args.channels_last:
                batches[0] = batches[0].contiguous(memory_format=torch.channels_last)
                batches[2] = batches[2].contiguous(memory_format=torch.channels_last)
            scheduler.step_update(global_step)
            stats = search.step((batches[0], batches[1]), (batches[2], batches[3]), step=global_step, epoch=epoch)
            global_step += 1
            sums['steps'] += 1
            sums['skipped'] += stats.skipped
            for key, value in (('train_loss', stats.train_loss * stats.batch_size),
                               ('meta_loss', 0.0 if math.isnan(stats.meta_loss) else
                                stats.meta_loss * stats.meta_batch_size),
                               ('train_correct', stats.train_correct), ('meta_correct', stats.meta_correct),
                               ('n', stats.batch_size), ('meta_n', stats.meta_batch_size)):
                sums[key] += value
            if stats.fixed or global_step % args.history_interval == 0:
                history.append({'epoch': global_step / steps_per_epoch, 'probabilities': snapshot_probabilities(model)})
            for event in stats.fixed:
                log(f'  step {global_step}: slot {event.slot} fixed to {event.op_name} '
                    f'(pi={max(event.probabilities):.3f})')
            if bar is not None:
                bar.set_postfix_str(f"loss {sums['train_loss'] / sums['n']:.3f} "
                                    f"fixed {model.num_slots - len(model.open_slots())}/{model.num_slots}")
                bar.update(1)
            if search.done:
                break
        if bar is not None:
            bar.close()
        epoch += 1
        elapsed += time.time() - t0
        check_ranks_agree(model, dist_env, epoch)
        # The log's losses and top-1 cover every rank's shard, not the main rank's alone.
        sums = dist_env.sum_over_ranks(
            sums, ('train_loss', 'meta_loss', 'train_correct', 'meta_correct', 'n', 'meta_n'))
        row = epoch_row(epoch, global_step, search.lr, sums, model, time.time() - t0, elapsed)
        log_rows.append(row)
        history.append({'epoch': global_step / steps_per_epoch, 'probabilities': snapshot_probabilities(model)})
        log(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | meta loss "
            f"{row['meta_loss']:.4f} top1 {row['meta_top1']:.2f} | fixed {row['slots_fixed']}/{model.num_slots} | "
            f"{row['epoch_time_s']:.1f}s" + (f" | {sums['skipped']} steps skipped (float16 overflow; the GradScaler "
                                             f"lowered its scale)" if sums['skipped'] else ''))
        if dist_env.is_main:
            # The checkpoint first: it holds the log rows too, so the CSV never runs ahead of what a resume restores.
            save_checkpoint(args, search, model, epoch, global_step, log_rows, history, elapsed, num_classes,
                            split)
            write_log_csv(log_rows, os.path.join(args.output, LOG_NAME))

    forced = search.apply_early_stopping(global_step, epoch, force=True) if not search.done else []
    for event in forced:
        log(f'  slot {event.slot} forced to its argmax {event.op_name} (pi={max(event.probabilities):.3f})')
    if forced and dist_env.is_main:
        save_checkpoint(args, search, model, epoch, global_step, log_rows, history, elapsed, num_classes, split)
    return finish(args, dist_env, search, model, num_classes, data_config, epoch, global_step, steps_per_epoch,
                  history, elapsed, train_set, meta_set, note, last_top1=final_top1(log_rows))


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


def _progress(total: int, epoch: int, epochs: int):
    from tqdm import tqdm
    return tqdm(total=total, desc=f'epoch {epoch + 1}/{epochs}', leave=False, dynamic_ncols=True)


def epoch_row(epoch: int, step: int, lr: float, sums: Dict, model, epoch_time: float, elapsed: float) -> Dict:
    row = dict(
        epoch=epoch, step=step, lr=round(lr, 8),
        train_loss=sums['train_loss'] / max(sums['n'], 1), train_top1=100.0 * sums['train_correct'] / max(sums['n'], 1),
        meta_loss=sums['meta_loss'] / max(sums['meta_n'], 1) if sums['meta_n'] else float('nan'),
        meta_top1=100.0 * sums['meta_correct'] / max(sums['meta_n'], 1),
        slots_fixed=model.num_slots - len(model.open_slots()), epoch_time_s=round(epoch_time, 3),
        elapsed_s=round(elapsed, 3),
    )
    for slot, probabilities in enumerate(snapshot_probabilities(model)):
        for name, value in zip(OP_NAMES, probabilities or [float('nan')] * len(OP_NAMES)):
            row[f'pi_{slot}_{name}'] = value
    return row


def check_ranks_agree(model, dist_env: Distributed, epoch: int) -> None:
    """Every rank must hold the same alpha and the same fixed slots; anything else is a bug worth stopping for."""
    if not dist_env.enabled:
        return
    mine = (tuple(model.derive_genotype()), tuple(model.open_slots()), snapshot_probabilities(model))
    everyone = dist_env.gather(mine)
    if any(other != everyone[0] for other in everyone):
        raise RuntimeError(f'Ranks disagree on alpha or fixed slots after epoch {epoch}: '
                           f'{[o[0] for o in everyone]}. Stopping; the last checkpoint is from before this epoch.')


def final_top1(log_rows: List[Dict]) -> Optional[float]:
    """The last epoch's meta-split top-1 (%), or its train top-1 when no meta batch ran (every slot already fixed)."""
    if not log_rows:
        return None
    row = log_rows[-1]
    return row['train_top1'] if math.isnan(row['meta_loss']) else row['meta_top1']


def verdict_lines(verdict, events, rho: float) -> List[str]:
    """What the summary says about the genotype: how each slot was decided, and whether it is a decision at all."""
    by_eq4 = sum(not e.forced for e in events)
    lines = [f'{by_eq4} of {len(events)} slots fixed by Eq. 4 (rho {rho:g}), {len(events) - by_eq4} forced to their '
             f'argmax at the end']
    if not verdict.decided:
        lines.append('UNDECIDED: the genotype is not a decision of the search: ' + '; '.join(verdict.reasons) +
                     '. Raise --epochs (more steps), --arch-lr or --lr, or check the data, and search again.')
    return lines


def finish(args, dist_env, search, model, num_classes, data_config, epochs_run, global_step, steps_per_epoch,
           history, elapsed, train_set, meta_set, note: str = '', last_top1: Optional[float] = None) -> Dict:
    genotype = model.genotype
    events = sorted(search.fix_events, key=lambda e: e.slot)
    rank_probabilities = dist_env.gather([e.probabilities for e in events])
    if not dist_env.is_main:
        return {}
    events_out = [dict(asdict(e), epoch_float=e.step / steps_per_epoch) for e in events]
    genotype_path = os.path.join(args.output, GENOTYPE_NAME)
    summary = genotype.to_dict(
        model=args.model, num_slots=model.num_slots, op_names=list(OP_NAMES),
        probabilities=[e.probabilities for e in events],
        fixed_step=[e.step for e in events], fixed_epoch=[e.epoch for e in events], forced=[e.forced for e in events],
        all_fixed_at_epoch=None if any(e.forced for e in events) else max(e['epoch_float'] for e in events_out),
        epochs_run=epochs_run, steps_run=global_step, search_time_s=round(elapsed, 2),
        data=dict(data_dir=args.data_dir, dataset=args.dataset, train_split=args.train_split,
                  train_images=len(train_set), meta_images=len(meta_set), num_classes=num_classes,
                  bad_images_left_out=getattr(train_set, 'bad_images_left_out', 0),
                  input_size=list(data_config['input_size'])),
        seed=args.seed, world_size=dist_env.world_size, rank_probabilities=rank_probabilities, args=vars(args),
    )
    verdict = search_verdict(events, args.rho, num_classes, last_top1)
    summary.update(decided=verdict.decided, undecided_reasons=verdict.reasons, undecided_slots=verdict.undecided_slots,
                   final_top1=last_top1, arch_lr_used=search.config.arch_lr)
    atomic_write_text(json.dumps(summary, indent=2), genotype_path)
    command = retrain_command(args, genotype_path, num_classes, data_config, dist_env.device)
    atomic_write_text(command + '\n' + (f'# {note}\n' if note else ''), os.path.join(args.output, RETRAIN_NAME))
    plotted = plot_search(history, events_out, OP_NAMES, model.num_slots, os.path.join(args.output, PLOT_NAME),
                          title=f'PMPL search of {args.model}')
    print(f'Genotype: {genotype}' + ('' if verdict.decided else ' (UNDECIDED)'), flush=True)
    for line in verdict_lines(verdict, events, args.rho):
        print(line, flush=True)
    print(f'Wrote {genotype_path}, {LOG_NAME}, {CHECKPOINT_NAME}' + (f', {PLOT_NAME}' if plotted else
          ' (no plot: pip install matplotlib)') + f' in {args.output}', flush=True)
    print(f'Retrain with timm (train.py from the timm repository):\n  {command}', flush=True)
    if note:
        print(f'  ({note})', flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run(args, explicit_arg_names(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
