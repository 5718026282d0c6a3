"""Fashion-MNIST from Debian's package through timm's datasets: the retrain transform and loaders."""
import gzip
import os
import shutil
from typing import Tuple

import torch
import torchvision
from timm.data import create_dataset, create_loader

from .plan import DEBIAN_DIR, MEAN, RECIPE, STD


def prepare_data(root: str) -> str:
    """Fashion-MNIST from Debian's package, unpacked where torchvision's FashionMNIST (timm 'torch/fashion_mnist')
    looks for it. Nothing is downloaded."""
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    names = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']
    if all(os.path.exists(os.path.join(raw, n)) for n in names):
        return root
    if not os.path.isdir(DEBIAN_DIR):
        raise SystemExit(f'error: {DEBIAN_DIR} not found; install it with: apt-get install -y dataset-fashion-mnist')
    os.makedirs(raw, exist_ok=True)
    for name in names:
        tmp = os.path.join(raw, f'{name}.{os.getpid()}.tmp')  # two lanes may unpack at once
        with gzip.open(os.path.join(DEBIAN_DIR, name + '.gz'), 'rb') as src, open(tmp, 'wb') as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, os.path.join(raw, name))
    return root


def retrain_transform() -> torchvision.transforms.Compose:
    """Whole image at RECIPE.img_size, shifted by up to RECIPE.retrain_translate_px in each direction (background
    fill) and flipped: Fashion-MNIST's usual pad-and-crop augmentation, which keeps a garment's shape."""
    t = torchvision.transforms
    return t.Compose([
        t.Resize(RECIPE.img_size, interpolation=t.InterpolationMode.BILINEAR),
        t.RandomCrop(RECIPE.img_size, padding=RECIPE.retrain_translate_px, fill=0),
        t.RandomHorizontalFlip(RECIPE.hflip), t.ToTensor(), t.Normalize(MEAN, STD)])


def make_loaders(data_root: str) -> Tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Timm's `torch/fashion_mnist` datasets; the training split with `retrain_transform` (timm's train transforms
    have no translation), the test split with timm's eval transform (resize, no crop)."""
    train = create_dataset('torch/fashion_mnist', root=data_root, split='train', is_training=True)
    train.transform = retrain_transform()
    train_loader = torch.utils.data.DataLoader(train, batch_size=RECIPE.batch_size, shuffle=True, drop_last=True,
                                               num_workers=RECIPE.workers)
    test = create_dataset('torch/fashion_mnist', root=data_root, split='validation')
    test_loader = create_loader(test, input_size=(1, RECIPE.img_size, RECIPE.img_size), batch_size=RECIPE.batch_size,
                                mean=MEAN, std=STD, num_workers=RECIPE.workers, use_prefetcher=False,
                                persistent_workers=False, is_training=False, crop_pct=1.0)
    return train_loader, test_loader


def memory_format(images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if RECIPE.channels_last else images
