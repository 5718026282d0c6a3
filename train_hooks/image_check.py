"""Check the training images once before a search, so that no bad file is silently replaced by another.

timm's `ImageDataset` answers a file it cannot read with the next file in the folder (possibly of another class, or
of the meta split). The search reads every file's header (or decodes it, `--check-images decode`) in parallel before
it starts: empty, unreadable and oversized files are listed by path, and the run stops, or with `--skip-bad-images`
they are left out of both splits and counted.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from PIL import Image

from timm_metapool.data import sample_files

__all__ = ['CHECK_MODES', 'image_problem', 'find_bad_images', 'sample_paths']

CHECK_MODES = ('header', 'decode', 'off')


def image_problem(path: str, decode: bool = False) -> Optional[str]:
    """Why `path` cannot be a training image, or None: empty, not an image PIL reads, over PIL's decompression-bomb
    limit (`Image.MAX_IMAGE_PIXELS`), or (with `decode`) pixels that do not decode."""
    try:
        if os.path.getsize(path) == 0:
            return 'empty file'
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                return f'{width}x{height} pixels, over the {Image.MAX_IMAGE_PIXELS} PIL decodes safely'
            if decode:
                image.load()
    except Image.DecompressionBombError as e:
        return f'oversized ({e})'
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for damaged files
        return f'unreadable ({type(e).__name__}: {e})'
    return None


def sample_paths(dataset) -> Optional[List[str]]:
    """The file path of every sample of a timm folder dataset, or None for datasets not read from files on disk
    (a tar reader's members are checked by timm when read)."""
    files = sample_files(dataset)
    return files if files and os.path.isfile(files[0]) else None


def find_bad_images(
        paths: Sequence[str],
        decode: bool = False,
        workers: int = 8,
        progress: bool = True,
) -> Dict[int, str]:
    """Index -> problem for every bad file among `paths`, checked by `workers` threads (file reads release the GIL),
    with a progress bar."""
    def check(index: int):
        return index, image_problem(paths[index], decode=decode)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), desc='checking images', unit='img', leave=False)
    bad = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, problem in pool.map(check, range(len(paths)), chunksize=64):
            if problem:
                bad[index] = problem
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return bad
