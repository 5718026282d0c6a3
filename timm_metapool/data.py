"""Data plumbing for the PMPL search: the meta split carved from the training split, and the embedded demo dataset.

The paper (Sec. 2.2) creates the meta dataset "by separating the original training dataset"; the validation split is
never used to update alpha.
"""
import hashlib
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose

__all__ = ['dataset_targets', 'dataset_class_names', 'sample_files', 'sample_ids', 'split_fingerprint', 'BadImageError',
           'sample_location', 'stratified_split', 'ConvertImageMode', 'stored_image_mode',
           'DatasetSplit', 'DEMO_CLASSES', 'DEMO_SQUARE_SIDES', 'generate_demo_dataset']


def dataset_targets(dataset: Any) -> List[int]:
    """Class index of every sample, read from the dataset's index (no image is decoded).

    Knows timm's folder/tar readers (`ImageDataset.reader.samples`/`.targets`), timm's `hfds/` reader and
    torchvision datasets (`.targets`).
    """
    reader = getattr(dataset, 'reader', None)
    if reader is not None:
        if hasattr(reader, 'targets'):
            return [int(t) for t in reader.targets]
        if hasattr(reader, 'samples'):
            return [int(t) for _, t in reader.samples]
        if hasattr(reader, 'dataset') and hasattr(reader, 'label_key'):
            return [int(t) for t in reader.dataset[reader.label_key]]
    if hasattr(dataset, 'targets'):
        targets = dataset.targets
        return [int(t) for t in (targets.tolist() if torch.is_tensor(targets) else targets)]
    raise ValueError(
        f'Cannot read the class labels of a {type(dataset).__name__} without decoding every image, so the meta '
        f'split cannot be stratified. Use an image-folder, tar, hfds/ or torch/ dataset from timm.data.create_dataset.')


def dataset_class_names(dataset: Any) -> Optional[Dict[int, str]]:
    """Class index -> name (the folder name for timm's folder reader), or None if the dataset does not say."""
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if class_to_idx:
        return {int(i): str(name) for name, i in class_to_idx.items()}
    return None


def stratified_split(
        targets: Sequence[int],
        meta_fraction: float,
        seed: int = 0,
        class_names: Optional[Dict[int, str]] = None,
) -> Tuple[List[int], List[int]]:
    """Split sample indices into (train, meta), per class, with a seeded shuffle.

    Each class puts round(fraction * n) of its samples into the meta split, at least one on each side.
    """
    if not 0.0 < meta_fraction < 1.0:
        raise ValueError(f'meta_fraction must be strictly between 0 and 1, got {meta_fraction}.')
    by_class: Dict[int, List[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[int(target)].append(index)
    if not by_class:
        raise ValueError('The training split is empty: nothing to carve a meta split from.')
    rng = np.random.default_rng(seed)
    train, meta = [], []
    for target in sorted(by_class):
        indices = by_class[target]
        if len(indices) < 2:
            name = f'{class_names[target]!r} (index {target})' if class_names and target in class_names else target
            raise ValueError(f'Class {name} has {len(indices)} image(s); each class needs at least 2 so that both '
                             f'the train and the meta split get one. Add images or drop the class.')
        shuffled = [indices[i] for i in rng.permutation(len(indices))]
        n_meta = min(max(1, round(meta_fraction * len(indices))), len(indices) - 1)
        meta.extend(shuffled[:n_meta])
        train.extend(shuffled[n_meta:])
    return sorted(train), sorted(meta)


class ConvertImageMode:
    """Transform: a PIL image converted to `mode` ('RGB', 'L', ...); anything else passes unchanged.

    timm applies its `input_img_mode` in its own readers (folder, tar, hfds, ...) only; torchvision's datasets
    (`torch/...`) hand their images over in their own mode, 'L' for the MNIST family.
    """

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        if isinstance(img, Image.Image) and img.mode != self.mode:
            return img.convert(self.mode)
        return img

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.mode!r})'


def stored_image_mode(dataset: Any) -> Optional[str]:
    """The PIL mode of `dataset`'s first image as its reader returns it (call before a transform is set), or None
    when its samples are not PIL images."""
    image = dataset[0][0]
    return image.mode if isinstance(image, Image.Image) else None


def sample_files(dataset: Any) -> Optional[List[str]]:
    """The file of every sample when the dataset's reader lists (file, class) pairs (timm's folder and tar readers),
    else None (torchvision and hfds datasets)."""
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if not samples or not isinstance(samples[0], (tuple, list)) or len(samples[0]) != 2:
        return None
    return [str(path) for path, _ in samples]


def sample_ids(dataset: Any, root: Optional[str] = None) -> List[str]:
    """One id per sample, read from the dataset's index: its file (relative to `root`) and class where the reader
    lists files, else its position and class. What a split fingerprint is made of."""
    files, targets = sample_files(dataset), dataset_targets(dataset)
    if files is None:
        return [f'{i}:{t}' for i, t in enumerate(targets)]
    return [f'{os.path.relpath(f, root) if root else f}:{t}' for f, t in zip(files, targets)]


def split_fingerprint(train: 'DatasetSplit', meta: 'DatasetSplit', root: Optional[str] = None) -> str:
    """SHA-256 of the samples in the train and the meta split: a resumed search checks that its data still makes
    the split it was searching on (Sec. 2.2: alpha learns on the meta split, theta on the train split)."""
    ids = sample_ids(train.dataset, root)
    digest = hashlib.sha256()
    for name, split in (('train', train), ('meta', meta)):
        digest.update(name.encode())
        for index in split.indices:
            digest.update(ids[index].encode() + b'\n')
    return digest.hexdigest()


class DatasetSplit(torch.utils.data.Dataset):
    """A view of `dataset` restricted to `indices` that forwards `transform` to it.

    timm's `create_loader` assigns `loader.dataset.transform`; a `torch.utils.data.Subset` would swallow that
    assignment, leaving the images untransformed. Give each split its own underlying dataset object so the train
    and meta splits can carry different transforms. With `image_mode`, every image is converted to that mode before
    the transform (`ConvertImageMode`), whatever dataset it comes from. A file that cannot be read raises
    `BadImageError` naming it: timm's `ImageDataset` would return the next file instead.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], image_mode: Optional[str] = None):
        self.dataset = dataset
        self.indices = list(indices)
        self.image_mode = image_mode
        self._transform = getattr(dataset, 'transform', None)
        if hasattr(dataset, '_max_retries'):
            dataset._max_retries = 1  # timm's ImageDataset: raise at the bad file instead of reading the next one

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, value):
        self._transform = value
        if self.image_mode is not None and value is not None:
            value = Compose([ConvertImageMode(self.image_mode), value])
        self.dataset.transform = value

    def __getitem__(self, index: int):
        sample = self.indices[index]
        try:
            return self.dataset[sample]
        except (OSError, RuntimeError) as e:
            raise BadImageError(f'Cannot read training image {sample_location(self.dataset, sample)} ({e}). Remove or '
                                f'repair it, or start the search again with --check-images decode --skip-bad-images '
                                f'to leave such files out.') from e

    def __len__(self) -> int:
        return len(self.indices)


class BadImageError(RuntimeError):
    """A training image that cannot be read; the message names the file."""


def sample_location(dataset: Any, index: int) -> str:
    """The file of sample `index` when the dataset's reader knows it, else its index (for error messages)."""
    files = sample_files(dataset)
    return files[index] if files is not None and index < len(files) else f'#{index}'


DEMO_SQUARE_SIDES: Tuple[int, ...] = (4, 7, 10, 14, 19, 25)
DEMO_CLASSES: Tuple[str, ...] = tuple(f'square_{side:02d}px' for side in DEMO_SQUARE_SIDES)


def _demo_pattern(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One filled square whose side (in a 32 px frame, scaled to `size`) is the class; placed anywhere at least 2 px
    from the border. Returns a mask in {0, 1}."""
    if name not in DEMO_CLASSES:
        raise ValueError(f'Unknown demo class {name!r}; classes are {DEMO_CLASSES}.')
    side = DEMO_SQUARE_SIDES[DEMO_CLASSES.index(name)] * size / 32
    margin = 2 * size / 32
    top, left = rng.uniform(margin, size - margin - side, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ((yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)).astype(np.float32)


def _demo_image(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A bright square on a dark ground, both grey levels drawn per image (so that the image's mean brightness does
    not give the side away), with sensor noise."""
    pattern = _demo_pattern(name, size, rng)
    fg, bg = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.4)
    image = pattern * fg + (1 - pattern) * bg + rng.normal(0, 0.08, size=pattern.shape)
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode='RGB')


def generate_demo_dataset(
        root: str,
        images_per_class: Dict[str, int] = None,
        image_size: int = 32,
        seed: int = 0,
) -> str:
    """Write the embedded procedural dataset as an ImageFolder: `root/<split>/<class>/<index>.png`.

    Six scale classes (`DEMO_CLASSES`): one square per image whose side (4 to 25 px at 32 px) is the class. Inside
    a square, along its edges and at its corners, a 3x3 window sees the same in every class; only context as wide
    as the square tells the sides apart. Seeded, no downloads. Default sizes: 250 train and 50 validation images per
    class. Refuses to write into a non-empty directory.
    """
    images_per_class = images_per_class or {'train': 250, 'validation': 50}
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f'Demo dataset directory {root!r} exists and is not empty; choose another path.')
    rng = np.random.default_rng(seed)
    for split, count in images_per_class.items():
        for name in DEMO_CLASSES:
            class_dir = os.path.join(root, split, name)
            os.makedirs(class_dir, exist_ok=True)
            for index in range(count):
                _demo_image(name, image_size, rng).save(os.path.join(class_dir, f'{index:04d}.png'))
    return root
