"""The search's data: the training split read through timm, checked, cut into train and meta splits (paper Sec. 2.2:
the meta split is carved from the training data), and their loaders."""
import argparse
import math
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from timm.data import create_dataset, create_loader, create_transform

from timm_metapool.data import DatasetSplit, dataset_class_names, dataset_targets, stored_image_mode, stratified_split

from .distributed import Distributed
from .image_check import find_bad_images, sample_paths
from .search_args import flag_value, image_mode


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
        value = flag_value(args, flag) or args.batch_size
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


def make_loaders(args: argparse.Namespace, train_set: Dataset, meta_set: Dataset, data_config: Dict,
                 dist_env: Distributed) -> Tuple[DataLoader, DataLoader]:
    """timm loaders for the train and meta splits (timm's transforms and augmentation for the train split, eval
    transforms for the meta split), with distributed samplers under torchrun; refuses a split smaller than one
    global batch."""
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
