"""The search CLI's arguments and their checks: one helper per kind of check, each failing before any work with a
message that names the flag and the fix."""
import argparse
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
from torch import nn
from PIL import ImageMode
from timm.data.dataset_factory import _search_split

from timm_metapool.decision import AUTO_ARCH_LR_CEILING, PAPER_ARCH_LR, auto_arch_lr
from timm_metapool.ops import OP_NAMES
from timm_metapool.pmpl import InvalidSetting, PMPLConfig

from .image_check import CHECK_MODES
from .run_files import CHECKPOINT_NAME


DESCRIPTION = (
    'PMPL search on timm\'s data pipeline: runs Algorithm 1 (timm_metapool.pmpl) over a timm dataset, with the meta '
    'split carved from the training split, and writes OUTPUT/genotype.json, search_log.csv, search.png, last.pth and '
    'retrain_command.txt. Works in one process or under torchrun.')
# Folder names of splits that must never be trained on (timm's evaluation synonyms, plus 'test').
_HELD_OUT_SPLIT_NAMES = ('val', 'valid', 'validation', 'eval', 'evaluation', 'test')


def build_parser() -> argparse.ArgumentParser:
    """The search CLI's options, grouped as timm's train.py groups its own (data, model, optimisation, ...)."""
    parser = argparse.ArgumentParser(
        prog='timm-metapool-search', description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    search.add_argument('--output-stride', type=int, default=None, choices=(8, 16, 32),
                        help="timm's output_stride: the last stages dilate instead of striding, so the later enhancer "
                             "slots see larger maps (where pooling windows of different sizes stay different "
                             "functions); default: the model's own (32)")
    search.add_argument('--init-weights', default=None, metavar='PATH_OR_TIMM_TAG',
                        help='start the shared layers from the base timm model\'s weights: a .pth or .safetensors '
                             'state_dict, or a timm pretrained tag (e.g. mobilenetv2_100.ra_in1k); a classifier of '
                             'another class count starts fresh')
    search.add_argument('--head-init', default='zero', choices=('zero', 'timm'),
                        help="the classifier a new search starts from: 'zero' (uniform class probabilities; "
                             "timm_metapool.pmpl.zero_init_classifier) or timm's own init; a classifier loaded by "
                             "--init-weights is kept")
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


def flag_value(args: argparse.Namespace, flag: str) -> Any:
    """The parsed value of `--some-flag`."""
    return getattr(args, flag[2:].replace('-', '_'))


def model_kwargs(args: argparse.Namespace) -> Dict:
    """Architecture kwargs for `timm.create_model` beyond the model name, classes and channels (the retrain command
    passes the same ones through train.py's --model-kwargs)."""
    return {} if getattr(args, 'output_stride', None) is None else dict(output_stride=args.output_stride)


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
        value = flag_value(args, flag)
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
    _check_ranges(args)
    check_channels(args)
    pmpl_config(args)
    _check_device(args.device)
    _check_model(args.model)
    _check_output(args)
    _check_data_dir(args)


def resolve_output(args: argparse.Namespace) -> None:
    """A resume without --output continues in its checkpoint's folder."""
    if args.resume and not args.output:
        args.output = os.path.dirname(os.path.abspath(args.resume))


def _check_ranges(args: argparse.Namespace) -> None:
    """Every numeric flag within its range."""
    _require(0.0 < args.meta_fraction < 1.0, '--meta-fraction', 'strictly between 0 and 1', args.meta_fraction)
    if args.max_images is not None:
        _require(args.max_images >= 2, '--max-images', 'at least 2 per class', args.max_images)
    for flag in ('--epochs', '--batch-size', '--history-interval', '--recount'):
        value = flag_value(args, flag)
        _require(value >= 1, flag, 'at least 1', value)
    _require(args.dist_timeout > 0, '--dist-timeout', 'positive', args.dist_timeout)
    for flag in ('--meta-batch-size', '--num-classes', '--in-chans', '--img-size'):
        value = flag_value(args, flag)
        if value is not None:  # 0 would otherwise pass for "not given"
            _require(value >= 1, flag, 'at least 1', value)
    if args.input_size is not None:
        _require(min(args.input_size) >= 1, '--input-size', 'three sizes of at least 1', args.input_size)
    _require(args.workers >= 0, '--workers', 'at least 0', args.workers)
    _require(0 <= args.seed < 2 ** 32, '--seed', 'in [0, 2**32)', args.seed)
    for flag in ('--reprob', '--hflip', '--vflip'):
        value = flag_value(args, flag)
        _require(0.0 <= value <= 1.0, flag, 'a probability in [0, 1]', value)
    for flag in ('--smoothing', '--drop-path'):
        value = flag_value(args, flag)
        _require(0.0 <= value < 1.0, flag, 'in [0, 1)', value)


def _check_device(device: Optional[str]) -> None:
    """--device names a CPU or CUDA device."""
    if device is None:
        return
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        device_type = None
    if device_type not in ('cpu', 'cuda'):
        raise SystemExit(f"error: --device {device!r} is not a device the search runs on; use 'cpu', 'cuda' "
                         f"or 'cuda:N'.")


def _check_model(model_name: str) -> None:
    """--model is a registered Meta-Pooling model."""
    if model_name not in timm.list_models('*metapool*'):
        raise SystemExit(f"error: --model {model_name!r} is not a Meta-Pooling model; choose one of "
                         f"{', '.join(timm.list_models('*metapool*'))}.")


def _check_output(args: argparse.Namespace) -> None:
    """--output is given and holds no other run, unless this resumes the run there or --overwrite says to replace
    it."""
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
                         f'{resume}--overwrite to start a new search there (the earlier run\'s files are deleted '
                         f'once the new run saves its first checkpoint), or choose a new --output.')


def _check_data_dir(args: argparse.Namespace) -> None:
    """--data-dir exists and (for folder datasets) mixes no held-out split or run output into the training split."""
    if args.data_dir is None:
        return
    if args.dataset == '' and not os.path.isdir(args.data_dir):
        raise SystemExit(f'error: --data-dir {args.data_dir!r} does not exist.')
    if _reads_folders(args.dataset) and os.path.isdir(args.data_dir):
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


def candidate_count(model: nn.Module) -> int:
    """The most candidates any open slot mixes (Eq. 4's margin is hardest to reach there)."""
    return max((len(p) for p in model.slot_probabilities() if p is not None), default=len(OP_NAMES))


def resolve_arch_lr(args: argparse.Namespace, model: nn.Module, planned_steps: int) -> Tuple[float, str]:
    """alpha's Adam lr for this run and a line saying where it comes from (`decision.auto_arch_lr` for 'auto')."""
    if args.arch_lr != 'auto':
        return args.arch_lr, f'alpha lr (eta) {args.arch_lr:g} (--arch-lr)'
    arch_lr = auto_arch_lr(planned_steps, candidate_count(model), args.rho)
    if arch_lr == PAPER_ARCH_LR:
        return arch_lr, f"alpha lr (eta) {arch_lr:g} (--arch-lr auto: the paper's, enough for {planned_steps} steps)"
    capped = ', capped at its ceiling' if arch_lr == AUTO_ARCH_LR_CEILING else ''
    return arch_lr, (f"alpha lr (eta) {arch_lr:.4g} (--arch-lr auto: {planned_steps} planned steps are too few for the "
                     f"paper's {PAPER_ARCH_LR:g} to reach Eq. 4's margin{capped}; --arch-lr {PAPER_ARCH_LR:g} to use "
                     f"it)")


def explicit_arg_names(argv: Optional[Sequence[str]]) -> set:
    """Names of the options actually given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))
