"""The search driver end to end on the generated dataset: outputs, resume after a kill, torchrun, bad input."""
import argparse
import csv
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import timm
import yaml
from timm.utils import ParseKwargs
from torchvision.datasets import FakeData
from torchvision.transforms import ToTensor
from PIL import Image

from timm_metapool import Genotype
from timm_metapool.data import DEMO_CLASSES, DatasetSplit, generate_demo_dataset
from timm_metapool.decision import PAPER_ARCH_LR, auto_arch_lr
from train_hooks.search import main
from train_hooks.search_report import retrain_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return generate_demo_dataset(str(tmp_path_factory.mktemp('demo') / 'data'), images_per_class={'train': 16})


def search_args(data_dir, output, *extra):
    return ['--data-dir', data_dir, '--output', str(output), '--model', 'mobilenetv2_metapool_035', '--img-size', '32',
            '-b', '16', '--epochs', '3', '--workers', '0', '--lr', '0.01', '--arch-lr', '0.05', '--quiet', *extra]


def test_end_to_end_search_writes_every_output(data_dir, tmp_path):
    out = tmp_path / 'run'
    main(search_args(data_dir, out))
    summary = json.loads((out / 'genotype.json').read_text())
    genotype = Genotype.from_json_file(out / 'genotype.json')
    assert summary['format_version'] == 1 and summary['model'] == 'mobilenetv2_metapool_035'
    assert len(genotype) == summary['num_slots'] == 16
    assert len(summary['probabilities']) == 16 and all(len(p) == 8 for p in summary['probabilities'])
    for ops_pi, op, forced in zip(summary['probabilities'], genotype, summary['forced']):
        assert summary['op_names'][max(range(8), key=ops_pi.__getitem__)] == op  # every slot took its argmax
    assert summary['data']['train_images'] == summary['data']['meta_images'] == 8 * len(DEMO_CLASSES)  # half to meta
    assert summary['args']['meta_fraction'] == 0.5 and summary['seed'] == 0

    rows = list(csv.DictReader((out / 'search_log.csv').open()))
    assert len(rows) == summary['epochs_run'] >= 1
    assert {'train_loss', 'meta_loss', 'train_top1', 'meta_top1', 'slots_fixed', 'pi_0_skip', 'pi_15_avg7'} <= set(rows[0])
    assert (out / 'search.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    command = (out / 'retrain_command.txt').read_text()
    assert f'--model-kwargs genotype={out / "genotype.json"}' in command and '--device-modules timm_metapool' in command

    checkpoint = torch.load(out / 'last.pth', weights_only=False)
    assert checkpoint['genotype'] == genotype.to_string()
    fixed = timm.create_model('mobilenetv2_metapool_035', genotype=str(out / 'genotype.json'),
                              num_classes=len(DEMO_CLASSES))
    fixed.load_state_dict(checkpoint['state_dict'])  # the searched weights fit the fixed architecture


def test_retrain_command_survives_spaces_in_paths(data_dir, tmp_path):
    out = tmp_path / 'my runs' / 'search 1'
    main(search_args(data_dir, out, '--epochs', '1', '--max-images', '32', '-b', '8'))
    argv = shlex.split((out / 'retrain_command.txt').read_text())
    assert argv[argv.index('--data-dir') + 1] == data_dir
    assert argv[argv.index('--model-kwargs') + 1] == f'genotype={out / "genotype.json"}'


def _wait_for_checkpoint(path, process, timeout=300):
    start = time.time()
    while time.time() - start < timeout and process.poll() is None:
        if os.path.exists(path):
            return torch.load(path, weights_only=False)['epoch']
        time.sleep(0.05)
    return None


def test_max_images_takes_a_stratified_sample(data_dir, tmp_path):
    out = tmp_path / 'subset'
    main(search_args(data_dir, out, '--max-images', str(8 * len(DEMO_CLASSES)), '-b', '8', '--epochs', '1'))
    data = json.loads((out / 'genotype.json').read_text())['data']
    assert data['train_images'] + data['meta_images'] == 8 * len(DEMO_CLASSES)  # 8 per class
    assert data['train_images'] == 4 * len(DEMO_CLASSES)  # halved


def test_resume_after_kill_gives_the_same_search(data_dir, tmp_path):
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    settings = ('--rho', '0.9', '--epochs', '2')  # rho high: both epochs run, slots are fixed at the end
    main(search_args(data_dir, straight, *settings))

    process = subprocess.Popen([sys.executable, '-m', 'train_hooks.search', *search_args(data_dir, killed, *settings)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    epoch_at_kill = _wait_for_checkpoint(killed / 'last.pth', process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert epoch_at_kill is not None and epoch_at_kill < 2, 'the run should be killed mid-way'
    main(['--resume', str(killed / 'last.pth')])  # every other setting comes from the checkpoint

    a = json.loads((straight / 'genotype.json').read_text())
    b = json.loads((killed / 'genotype.json').read_text())
    assert a['ops'] == b['ops'] and a['probabilities'] == b['probabilities']
    sa = torch.load(straight / 'last.pth', weights_only=False)['state_dict']
    sb = torch.load(killed / 'last.pth', weights_only=False)['state_dict']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_torchrun_two_processes_agree(data_dir, tmp_path):
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'train_hooks.search',
         *search_args(data_dir, out, '--epochs', '2')],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / 'genotype.json').read_text())
    assert summary['world_size'] == 2
    rank0, rank1 = summary['rank_probabilities']
    assert rank0 == rank1 and rank0 == summary['probabilities']


@pytest.mark.parametrize('flag, value, message', [
    ('--meta-fraction', '0', 'strictly between 0 and 1'),
    ('--meta-fraction', '1.5', 'strictly between 0 and 1'),
    ('--rho', '0', r'--rho must be in \(0, 1\]'),
    ('--rho', '1.2', r'--rho must be in \(0, 1\]'),
    ('--model', 'mobilenetv2_100', 'not a Meta-Pooling model'),
    # Each of these used to fail only after the data was loaded (a traceback from torch) or to be taken silently.
    ('--momentum', '-0.5', r'--momentum must be in \[0, 1\)'),
    ('--arch-weight-decay', '-1', '--arch-weight-decay must be at least 0'),
    ('--lr', 'nan', '--lr must be a finite number, got nan'),
    ('--smoothing', '1.5', r'--smoothing must be in \[0, 1\)'),
    ('--history-interval', '0', '--history-interval must be at least 1'),
    ('--meta-batch-size', '0', '--meta-batch-size must be at least 1'),
    ('--num-classes', '0', '--num-classes must be at least 1'),
    ('--hflip', '2', r'--hflip must be a probability in \[0, 1\]'),
    ('--seed', '-1', '--seed must be in'),
    ('--device', 'gpu0', "--device 'gpu0' is not a device the search runs on"),
    ('--device', 'meta', "--device 'meta' is not a device the search runs on"),
    ('--input-img-mode', 'XYZ', "--input-img-mode 'XYZ' is not a PIL image mode"),
    ('--input-img-mode', 'RGBA', r'--input-img-mode RGBA gives 4-channel images, but the model takes 3'),
])
def test_bad_arguments(data_dir, tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        main(search_args(data_dir, tmp_path / 'x', flag, value))
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('extra, message', [
    (['--in-chans', '1', '--input-size', '3', '32', '32'], 'disagree on the number of input channels'),
    (['--in-chans', '1'], r'1 input channel\(s\) need --mean and --std'),
    (['--input-size', '1', '32', '32', '--mean', '0.5'], r'1 input channel\(s\) need --mean and --std'),
    (['--mean', '0.5', '0.5'], r'--mean takes 1 value or one per input channel \(3\), got 2'),
    (['--std', '0.2', '0', '0.2'], '--std must be positive'),
])
def test_bad_channel_settings(data_dir, tmp_path, extra, message):
    # Each of these used to fail after the data was read, with an assertion or a conv's shape error from torch.
    with pytest.raises(SystemExit, match=message):
        main(search_args(data_dir, tmp_path / 'x', *extra))
    assert not (tmp_path / 'x').exists()


def test_one_channel_search_reads_images_as_grayscale(data_dir, tmp_path):
    # The demo images are RGB files; with one input channel they are read in mode 'L', as timm's train.py reads them.
    out = tmp_path / 'gray'
    main(search_args(data_dir, out, '--in-chans', '1', '--mean', '0.5', '--std', '0.25', '--epochs', '1',
                     '--max-images', '32', '-b', '8'))
    checkpoint = torch.load(out / 'last.pth', weights_only=False)
    assert checkpoint['state_dict']['conv_stem.weight'].shape[1] == 1
    command = (out / 'retrain_command.txt').read_text()
    assert '--input-size 1 32 32 --mean 0.5 --std 0.25 ' in command


def test_dataset_split_converts_images_before_the_transform():
    gray = FakeData(size=4, image_size=(1, 8, 8), random_offset=3)  # torchvision hands these over as 'L' images
    assert gray[0][0].mode == 'L'
    split = DatasetSplit(gray, [2, 0], image_mode='RGB')
    to_tensor = ToTensor()
    split.transform = to_tensor
    assert split.transform is to_tensor  # what was assigned reads back; the conversion runs in front of it
    image = split[0][0]
    assert image.shape == (3, 8, 8) and torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    plain = DatasetSplit(FakeData(size=4, image_size=(1, 8, 8), random_offset=3), [2, 0])
    plain.transform = ToTensor()
    assert torch.equal(plain[0][0][0], image[0])  # unconverted: one channel, the same values


def _write_tiny_fashion_mnist(root, per_class=4, size=28):
    """A small Fashion-MNIST in torchvision's raw layout (idx files), which timm's `torch/fashion_mnist` reads."""
    raw = root / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), size, size), dtype=np.uint8)
    for prefix in ('train', 't10k'):
        header = np.array([2051, len(labels), size, size], '>i4').tobytes()
        (raw / f'{prefix}-images-idx3-ubyte').write_bytes(header + images.tobytes())
        (raw / f'{prefix}-labels-idx1-ubyte').write_bytes(np.array([2049, len(labels)], '>i4').tobytes()
                                                          + labels.tobytes())
    return str(root)


def test_torchvision_dataset_images_take_the_model_channels(tmp_path):
    # torchvision's FashionMNIST stores 'L' images and timm converts images only in its own readers: with the default
    # three channels the search converts them (it used to stop at the first batch with a shape error) and says what
    # timm's train.py needs instead; with one channel there is nothing to convert.
    root = _write_tiny_fashion_mnist(tmp_path / 'fm')
    common = ['--dataset', 'torch/fashion_mnist', '--data-dir', root, '--model', 'mobilenetv2_metapool_035',
              '--img-size', '28', '-b', '8', '--epochs', '1', '--workers', '0', '--quiet']
    main(common + ['--output', str(tmp_path / 'rgb')])
    command, note = (tmp_path / 'rgb' / 'retrain_command.txt').read_text().splitlines()
    assert '--input-size 3 28 28' in command
    assert note.startswith("# note: torch/fashion_mnist stores 'L' images") and '--input-size 1 28 28' in note
    main(common + ['--output', str(tmp_path / 'gray'), '--in-chans', '1', '--mean', '0.3', '--std', '0.3'])
    command, = (tmp_path / 'gray' / 'retrain_command.txt').read_text().splitlines()
    assert '--input-size 1 28 28 --mean 0.3 --std 0.3' in command


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_output(tmp_path):
    # Without --data-dir the demo dataset is generated into the output dir before the batch size can be checked
    # against it; left behind, it would get the corrected rerun refused for a non-empty output dir.
    args = ['--model', 'mobilenetv2_metapool_035', '--epochs', '1', '--workers', '0', '--quiet', '-b', '100000']
    with pytest.raises(SystemExit, match='fewer than one global batch of 100000'):
        main(['--output', str(tmp_path / 'demo')] + args)
    assert not (tmp_path / 'demo').exists()
    with pytest.raises(SystemExit, match=f'--num-classes 3 is fewer than the {len(DEMO_CLASSES)} classes'):
        main(['--output', str(tmp_path / 'demo'), '--num-classes', '3'] + args[:-2])
    assert not (tmp_path / 'demo').exists()
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit, match='fewer than one global batch'):
        main(['--output', str(mine), '--overwrite'] + args)
    assert (mine / 'notes.txt').read_text() == 'mine'


def test_existing_output_is_never_overwritten(data_dir, tmp_path):
    out = tmp_path / 'taken'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit, match='exists and is not empty.*no checkpoint is in it.*--overwrite'):
        main(search_args(data_dir, out))
    assert os.listdir(out) == ['notes.txt'] and (out / 'notes.txt').read_text() == 'mine'
    with pytest.raises(SystemExit, match='is a file, not a directory'):
        main(search_args(data_dir, out / 'notes.txt'))
    assert os.listdir(out) == ['notes.txt'] and (out / 'notes.txt').read_text() == 'mine'


def test_missing_and_empty_data_dirs(tmp_path):
    with pytest.raises(SystemExit, match='does not exist'):
        main(search_args(str(tmp_path / 'nowhere'), tmp_path / 'o1'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match='cannot read the training split'):
        main(search_args(str(tmp_path / 'empty'), tmp_path / 'o2'))
    with pytest.raises(SystemExit, match='cannot read the training split.*Dataset not found.*add --dataset-download'):
        main(search_args(str(tmp_path / 'empty'), tmp_path / 'o3', '--dataset', 'torch/fashion_mnist'))
    assert not (tmp_path / 'o3').exists()
    with pytest.raises(SystemExit, match='cannot read the training split.*Unknown torchvision dataset nosuch'):
        main(search_args(str(tmp_path / 'empty'), tmp_path / 'o4', '--dataset', 'torch/nosuch'))
    assert not (tmp_path / 'o4').exists()


@pytest.mark.skipif(importlib.util.find_spec('datasets') is not None, reason="needs Hugging Face 'datasets' absent")
def test_dataset_reader_without_its_package(tmp_path):
    with pytest.raises(SystemExit, match="'hfds/mnist' needs the 'datasets' package.*pip install datasets"):
        main(search_args(str(tmp_path), tmp_path / 'out', '--dataset', 'hfds/mnist'))
    assert not (tmp_path / 'out').exists()


def test_class_with_too_few_images(tmp_path):
    root = generate_demo_dataset(str(tmp_path / 'data'), images_per_class={'train': 4})
    lonely = os.path.join(root, 'train', DEMO_CLASSES[0])
    for name in sorted(os.listdir(lonely))[1:]:
        os.remove(os.path.join(lonely, name))
    with pytest.raises(SystemExit, match=f"Class '{DEMO_CLASSES[0]}' \\(index \\d\\) has 1 image.*at least 2"):
        main(search_args(root, tmp_path / 'out'))


def test_resume_from_another_model_or_a_foreign_file(data_dir, tmp_path):
    out = tmp_path / 'run'
    main(search_args(data_dir, out, '--epochs', '1'))
    resume = ['--resume', str(out / 'last.pth')]
    with pytest.raises(SystemExit, match='is a search of mobilenetv2_metapool_035 with 16 slots'):
        main(resume + search_args(data_dir, out, '--model', 'mobilenetv2_metapool_110d'))
    foreign = tmp_path / 'foreign.pth'
    torch.save({'weights': 1}, foreign)
    with pytest.raises(SystemExit, match='not a PMPL search checkpoint'):
        main(['--resume', str(foreign)] + search_args(data_dir, out))
    with pytest.raises(SystemExit, match='is not a file'):
        main(['--resume', str(tmp_path / 'nope.pth')] + search_args(data_dir, out))


def _image_folder(root, classes, per_class, size=16):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(root, name, f'{i}.png'))
    return str(root)


def test_validation_folder_is_never_read_as_training_data(tmp_path):
    # No 'train' folder (here 'Train'): timm reads the whole root as the training split, 'val' included.
    _image_folder(tmp_path / 'data' / 'Train', ['a', 'b'], 6)
    _image_folder(tmp_path / 'data' / 'val', ['a', 'b'], 4)
    with pytest.raises(SystemExit, match=r"no 'train' folder.*the 'val' folder included.*--train-split.*Train, val"):
        main(search_args(str(tmp_path / 'data'), tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()
    # 64 px: at 32 px a batch of 2 leaves two values per channel on the 1x1 maps, where BatchNorm's gradients explode.
    main(search_args(str(tmp_path / 'data'), tmp_path / 'out', '--train-split', 'Train', '-b', '2', '--epochs', '1',
                     '--img-size', '64'))
    assert json.loads((tmp_path / 'out' / 'genotype.json').read_text())['args']['train_split'] == 'Train'


def test_output_inside_the_training_images_is_refused(tmp_path):
    root = _image_folder(tmp_path / 'flat', ['a', 'b'], 6)  # classes at the root: the root is the split
    with pytest.raises(SystemExit, match='is inside the training images'):
        main(search_args(root, tmp_path / 'flat' / 'run'))
    assert sorted(os.listdir(root)) == ['a', 'b']


@pytest.mark.parametrize('extra, message', [
    (['-b', '1'], r'--batch-size 1 over 1 process\(es\) at input 32x32 gives BatchNorm one value per channel'),
    (['--meta-batch-size', '1'], r'--meta-batch-size 1 over 1 process\(es\)'),
    (['--max-images', '8'], r'--max-images 8 leaves some class fewer than 2 images.*Give --max-images 12 or more'),
])
def test_batches_and_samples_too_small_for_the_data_name_their_flag(data_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(search_args(data_dir, tmp_path / 'out', *extra))
    assert not (tmp_path / 'out').exists()


def test_output_stride_builds_the_search_and_the_retrain_with_dilated_last_stages(data_dir, tmp_path):
    out = tmp_path / 'run'
    main(search_args(data_dir, out, '--epochs', '1', '--output-stride', '16'))
    argv = shlex.split((out / 'retrain_command.txt').read_text())
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)  # as timm's train.py parses it
    kwargs = parser.parse_known_args(argv)[0].model_kwargs
    assert kwargs['output_stride'] == 16
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=len(DEMO_CLASSES), **kwargs).eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 2  # 32 px / 16; stride 32 gives 1
    model.load_state_dict(torch.load(out / 'last.pth', weights_only=False)['state_dict'])
    resume = ['--resume', str(out / 'last.pth'), '--epochs', '2']
    with pytest.raises(SystemExit, match='--output-stride 8 differs from the run being resumed, which was searched '
                                         'with 16'):
        main(resume + ['--output-stride', '8'])
    main(resume)
    assert json.loads((out / 'genotype.json').read_text())['args']['output_stride'] == 16


def test_resume_keeps_what_makes_the_model_and_the_split(data_dir, tmp_path):
    out = tmp_path / 'run'
    main(search_args(data_dir, out, '--epochs', '1'))
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    resume = ['--resume', str(out / 'last.pth'), '--epochs', '2']
    for flag, value in (('--num-classes', '12'), ('--seed', '7'), ('--meta-fraction', '0.3'),
                        ('--data-dir', str(tmp_path))):
        with pytest.raises(SystemExit, match=f'{flag} {value} differs from the run being resumed'):
            main(resume + [flag, value])
    with pytest.raises(SystemExit, match='takes 3-channel inputs, not 1'):
        main(resume + ['--in-chans', '1', '--mean', '0.5', '--std', '0.5'])
    # Into another run's folder: refused unless --overwrite, and that run's files are left as they were.
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'genotype.json').write_text('theirs')
    with pytest.raises(SystemExit, match='exists and is not empty'):
        main(resume + ['--output', str(other)])
    assert (other / 'genotype.json').read_text() == 'theirs'
    assert {name: (out / name).read_bytes() for name in before} == before
    # The same settings given again, spelled as the run resolved them, are no change.
    seed = json.loads((out / 'genotype.json').read_text())['args']['seed']
    main(resume + ['--num-classes', str(len(DEMO_CLASSES)), '--in-chans', '3', '--input-size', '3', '32', '32', '--dataset', 'folder',
                   '--data-dir', data_dir, '--seed', str(seed)])


def test_demo_run_resumes_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ['--model', 'mobilenetv2_metapool_035', '--workers', '0', '--quiet', '-b', '16', '--max-images', '64',
              '--lr', '0.01']
    main(['--output', 'demo', '--epochs', '1'] + common)  # a relative --output, the demo data inside it
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The resume reads the dataset again (the saved path was 'demo/demo_data', relative to the first directory).
    main(['--resume', str(tmp_path / 'demo' / 'last.pth'), '--epochs', '2'])
    assert os.listdir(elsewhere) == []  # found the demo data beside the checkpoint, generated nothing here


def test_global_batches_split_evenly_over_torchrun_processes():
    from train_hooks.search_args import build_parser
    from train_hooks.search_data import per_process_batches
    args = build_parser().parse_args(['-b', '8', '--meta-batch-size', '4'])
    assert per_process_batches(args, world_size=2, input_size=(3, 32, 32)) == (4, 2)
    args.batch_size = 3  # used to run as 2 per process (a global batch of 4), silently
    with pytest.raises(SystemExit, match='--batch-size 3 is the global batch, split evenly over the 2 processes'):
        per_process_batches(args, world_size=2, input_size=(3, 32, 32))
    args.batch_size, args.meta_batch_size = 8, 1  # used to be blamed on --batch-size
    with pytest.raises(SystemExit, match='--meta-batch-size 1 is the global batch'):
        per_process_batches(args, world_size=2, input_size=(3, 32, 32))
    args.meta_batch_size = 2  # one image per process: fine where the last feature map has more than one value
    assert per_process_batches(args, world_size=2, input_size=(3, 64, 64)) == (4, 1)
    with pytest.raises(SystemExit, match='gives BatchNorm one value per channel'):
        per_process_batches(args, world_size=2, input_size=(3, 32, 32))


def test_max_images_sample_of_an_imbalanced_dataset_names_the_count_it_needs(tmp_path):
    root = tmp_path / 'imbalanced'
    _image_folder(root, ['a'], 20)
    _image_folder(root, ['b'], 4)
    # 6 images would be 2 per class, but class b's rounded share is 1: it used to be blamed for having 1 image.
    with pytest.raises(SystemExit, match=r'--max-images 6 leaves some class fewer than 2 images.*smallest has 4 of '
                                         r'the 24.*Give --max-images 12 or more'):
        main(search_args(str(root), tmp_path / 'out', '--max-images', '6', '-b', '2'))
    main(search_args(str(root), tmp_path / 'out', '--max-images', '12', '-b', '4', '--img-size', '64',
                     '--epochs', '1'))


def test_arch_lr_auto_is_scaled_to_the_planned_steps_and_logged(data_dir, tmp_path, capsys):
    out = tmp_path / 'auto'
    args = [a for a in search_args(data_dir, out) if a not in ('--arch-lr', '0.05')]
    main(args)
    summary = json.loads((out / 'genotype.json').read_text())
    steps = 3 * 3  # 3 epochs of 3 batches of 16 (8 train images per class)
    assert summary['args']['arch_lr'] == 'auto' and summary['arch_lr_used'] == auto_arch_lr(steps, 8, 0.2)
    assert f"alpha lr (eta) {auto_arch_lr(steps, 8, 0.2):.4g} (--arch-lr auto: {steps} planned steps" in \
        capsys.readouterr().out
    main(search_args(data_dir, tmp_path / 'paper', '--arch-lr', str(PAPER_ARCH_LR)))  # the paper's value, explicitly
    assert json.loads((tmp_path / 'paper' / 'genotype.json').read_text())['arch_lr_used'] == PAPER_ARCH_LR


def test_a_search_that_cannot_decide_says_so_before_and_after(data_dir, tmp_path, capsys):
    out = tmp_path / 'short'
    main(search_args(data_dir, out, '--arch-lr', '3e-4', '--epochs', '2'))
    printed = capsys.readouterr().out
    before, after = printed.split('epoch 1/2')
    assert "warning: alpha cannot reach Eq. 4's margin" in before and '--arch-lr to at least' in before
    summary = json.loads((out / 'genotype.json').read_text())
    assert summary['decided'] is False and all(summary['forced'])
    assert summary['undecided_slots'] == list(range(16)) and 'near-uniform' in summary['undecided_reasons'][0]
    assert '(UNDECIDED)' in after and '0 of 16 slots fixed by Eq. 4' in after


def test_retrain_command_carries_the_recipe_of_the_examples_yaml(tmp_path):
    """The printed command and examples/pmpl_retrain.yaml are the paper's recipe (Sec. 3.1) for timm's train.py: every
    setting the YAML fixes where train.py's own default differs (warm-up, smoothing, colour jitter) is in the
    command too, with the same value."""
    with open(os.path.join(REPO, 'examples', 'pmpl_retrain.yaml'), encoding='utf-8') as f:
        recipe = yaml.safe_load(f)
    argv = shlex.split(retrain_command(
        argparse.Namespace(data_dir='DATA', output='out', dataset='', model='mobilenetv2_metapool_035',
                           train_split='train', mean=None, std=None, input_img_mode=None, output_stride=None),
        'out/genotype.json', 6, {'input_size': (3, 32, 32)}, torch.device('cpu')))
    given = {argv[i].lstrip('-').replace('-', '_'): argv[i + 1] for i in range(len(argv) - 1)
             if argv[i].startswith('-') and not argv[i + 1].startswith('-')}
    given['batch_size'] = given.pop('b')
    for key in ('epochs', 'sched', 'opt', 'lr', 'momentum', 'weight_decay', 'warmup_epochs', 'cooldown_epochs',
                'min_lr', 'color_jitter', 'smoothing', 'batch_size'):
        expected = recipe[key]
        assert (float(given[key]) == float(expected)) if not isinstance(expected, str) else given[key] == expected, key
