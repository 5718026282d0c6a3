"""A search run never lies about itself: settings given again on resume, --overwrite, data changed under a resume,
a full disk, damaged checkpoints, the rerun hint, and what a killed export leaves behind."""
import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
import timm
from PIL import Image
from timm.scheduler import CosineLRScheduler

from timm_metapool.data import DEMO_CLASSES, generate_demo_dataset
from timm_metapool import hub
from timm_metapool.hub import export_for_hub
from timm_metapool.pmpl import PMPLConfig, PMPLSearch
from train_hooks.search import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'mobilenetv2_metapool_035'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return generate_demo_dataset(str(tmp_path_factory.mktemp('robust') / 'data'), images_per_class={'train': 8})


def search_args(data_dir, output, *extra):
    return ['--data-dir', str(data_dir), '--output', str(output), '--model', MODEL, '--img-size', '32', '-b', '16',
            '--epochs', '1', '--workers', '0', '--lr', '0.01', '--quiet', '--device', 'cpu', *extra]


def test_resume_applies_settings_given_again_to_the_restored_optimizers():
    torch.manual_seed(0)
    search = PMPLSearch(timm.create_model(MODEL, num_classes=4), PMPLConfig(lr=0.05, arch_lr=0.01))
    CosineLRScheduler(search.weight_optimizer, t_initial=100, t_in_epochs=False)  # stores initial_lr in the group
    state, weights = copy.deepcopy(search.state_dict()), copy.deepcopy(search.model.state_dict())

    resumed = PMPLSearch(timm.create_model(MODEL, num_classes=4), PMPLConfig(lr=0.05, arch_lr=0.01))
    resumed.load_state_dict(state, weights)
    changes = resumed.apply_config(PMPLConfig(lr=0.001, momentum=0.0, arch_lr=0.5, rho=0.3))
    assert changes == ['lr 0.05 -> 0.001', 'momentum 0.9 -> 0.0', 'arch_lr 0.01 -> 0.5', 'rho 0.2 -> 0.3']
    scheduler = CosineLRScheduler(resumed.weight_optimizer, t_initial=100, t_in_epochs=False)  # as the CLI does
    scheduler.step_update(0)
    assert resumed.weight_optimizer.param_groups[0]['lr'] == pytest.approx(0.001)
    assert resumed.weight_optimizer.param_groups[0]['momentum'] == 0.0
    assert resumed.arch_optimizer.param_groups[0]['lr'] == 0.5 and resumed.config.rho == 0.3
    assert resumed.apply_config(PMPLConfig(lr=0.001, momentum=0.0, arch_lr=0.5, rho=0.3)) == []


def _checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)['epoch']
    except Exception:  # mid-rename
        return None


def test_resume_with_a_new_lr_uses_and_records_it(data_dir, tmp_path, capsys):
    out = tmp_path / 'killed'
    process = subprocess.Popen([sys.executable, '-m', 'train_hooks.search',
                                *search_args(data_dir, out, '--epochs', '3', '--rho', '0.9')],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, epoch = time.time(), None
    while time.time() - start < 300 and process.poll() is None and epoch is None:
        epoch = _checkpoint_epoch(out / 'last.pth') if (out / 'last.pth').exists() else None
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert epoch is not None and epoch < 3, 'the run should be killed mid-way'
    # A budget below the epochs already done would only force the open slots: refused, naming what to give.
    state = torch.load(out / 'last.pth', weights_only=True)
    state['epoch'] = 2
    two_done = tmp_path / 'two_done' / 'last.pth'
    two_done.parent.mkdir()
    torch.save(state, two_done)
    with pytest.raises(SystemExit, match='--epochs 1 is fewer than the 2 epochs the run being resumed has done; give '
                                         '--epochs 2 or more'):
        main(['--resume', str(two_done), '--epochs', '1'])
    capsys.readouterr()
    main(['--resume', str(out / 'last.pth'), '--lr', '0.002', '--epochs', '4', '--rho', '0.95'])
    printed = capsys.readouterr().out
    assert 'Resume with a new setting: lr 0.01 -> 0.002' in printed
    assert 'Resume with a new setting: --epochs 3 -> 4' in printed
    assert 'Resume with a new setting: --rho 0.9 -> 0.95' in printed
    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['args']['lr'] == 0.002
    assert state['search']['weight_optimizer']['param_groups'][0]['initial_lr'] == 0.002


def test_overwrite_loses_nothing_when_it_fails_and_leaves_no_file_of_the_earlier_run(data_dir, tmp_path):
    out = tmp_path / 'run'
    main(search_args(data_dir, out))
    run_files = {'genotype.json', 'search.png', 'retrain_command.txt', 'last.pth', 'search_log.csv'}
    assert run_files <= set(os.listdir(out))
    earlier = {name: (out / name).read_bytes() for name in run_files}
    # A new run that stops before its first checkpoint: the earlier run is back as it was.
    with pytest.raises(SystemExit, match='diverged.*No epoch had completed'):
        main(search_args(data_dir, out, '--overwrite', '--lr', '1e38'))
    assert {name: (out / name).read_bytes() for name in run_files} == earlier
    assert not (out / '.previous_run').exists()
    # One that finishes: only its own files.
    (out / 'search_log.csv.tmp').write_text('left by a write the earlier run never finished')
    main(search_args(data_dir, out, '--overwrite', '--lr', '0.02'))
    assert torch.load(out / 'last.pth', weights_only=True)['args']['lr'] == 0.02
    assert json.loads((out / 'genotype.json').read_text())['args']['lr'] == 0.02
    assert set(os.listdir(out)) == run_files


def test_resume_refuses_another_epoch_length_and_leaves_a_finished_run_as_it_was(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    main(search_args(data_dir, out, '--epochs', '2', '--rho', '0.99'))  # 24 train images: 1 full batch of 16
    resume = ['--resume', str(out / 'last.pth')]
    with pytest.raises(SystemExit, match=r'made 1 steps per epoch \(-b 16 on 1 process\(es\)\); -b 8 on 1 makes 3'):
        main(resume + ['-b', '8'])
    # Every slot was forced at the end of epoch 2: nothing is left to run, and no file is rewritten.
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    capsys.readouterr()
    main(resume + ['--epochs', '3', '--rho', '0.5', '--lr', '0.02'])
    printed = capsys.readouterr().out
    assert 'had finished (every slot fixed): no step is left to run' in printed
    assert 'the settings given anew do not apply' in printed and 'Resume with a new setting' not in printed
    assert {name: (out / name).read_bytes() for name in before} == before


def test_resume_after_the_data_changed_stops_with_what_changed(data_dir, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(data_dir, data)
    out = tmp_path / 'run'
    main(search_args(data, out))
    first_class = sorted(os.listdir(data / 'train'))[0]
    for name in sorted(os.listdir(data / 'train' / first_class))[:2]:
        os.remove(data / 'train' / first_class / name)
    half = 4 * len(DEMO_CLASSES)  # 8 images per class, half of them in the meta split
    with pytest.raises(SystemExit, match=f'training data changed .* {half} train / {half} meta images, and now makes '
                                         f'{half - 1} / {half - 1}'):
        main(['--resume', str(out / 'last.pth')])


@pytest.fixture()
def small_tmpfs(tmp_path):
    mount_point = tmp_path / 'small'
    mount_point.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip('mounting a tmpfs needs root')
    yield mount_point
    subprocess.run(['umount', str(mount_point)], check=True)


def test_full_disk_is_named_and_leaves_no_partial_file(data_dir, small_tmpfs):
    out = small_tmpfs / 'run'
    with pytest.raises(SystemExit, match='No space left on device while writing .*last.pth'):
        main(search_args(data_dir, out))
    left = os.listdir(out) if out.exists() else []
    assert not [name for name in left if name.endswith('.tmp')]
    assert 'search_log.csv' not in left  # the log never runs ahead of the checkpoint


def test_rerun_hint_without_a_checkpoint_does_not_offer_resume(data_dir, tmp_path):
    out = tmp_path / 'early_kill'
    out.mkdir()
    (out / 'stray.txt').write_text('left by a run killed in its first epoch')
    with pytest.raises(SystemExit) as e:
        main(search_args(data_dir, out))
    assert 'no checkpoint is in it' in str(e.value) and '--resume' not in str(e.value)
    assert '--overwrite' in str(e.value)


def test_damaged_checkpoint_names_what_it_lacks(data_dir, tmp_path):
    out = tmp_path / 'run'
    main(search_args(data_dir, out))
    state = torch.load(out / 'last.pth', weights_only=True)
    del state['log_rows']
    damaged = tmp_path / 'damaged.pth'
    torch.save(state, damaged)
    with pytest.raises(SystemExit, match=f"{damaged}.* damaged search checkpoint: it lacks log_rows"):
        main(['--resume', str(damaged)])
    state['log_rows'], state['epoch'] = [], 'one'
    torch.save(state, damaged)
    with pytest.raises(SystemExit, match=f"{damaged}.* damaged search checkpoint: epoch has the wrong type"):
        main(['--resume', str(damaged)])


def test_an_interrupted_export_leaves_nothing_after_the_next_one(tmp_path):
    # What a publish killed mid-write leaves: its hidden staging folder (prefix and marker file) beside --out.
    stale = tmp_path / f'{hub._staging_prefix(tmp_path / "export")}{uuid.uuid4().hex[:8]}'
    stale.mkdir()
    (stale / hub._STAGING_MARKER).touch()
    (stale / 'model.safetensors').write_bytes(b'partial')
    # The user's own hidden folders named like the export are not an export's and stay.
    (tmp_path / '.export.backup').mkdir()
    (tmp_path / '.export.backup' / 'notes.txt').write_text('mine')
    (tmp_path / '.export.git').mkdir()
    export_for_hub(timm.create_model(MODEL, genotype='avg3', num_classes=4), tmp_path / 'export')
    assert sorted(os.listdir(tmp_path)) == ['.export.backup', '.export.git', 'export']
    assert (tmp_path / '.export.backup' / 'notes.txt').read_text() == 'mine'
    assert not any(name.startswith('.') for name in os.listdir(tmp_path / 'export'))


def _image_folder(root, per_class=16, size=32):
    """A small ImageFolder of PNGs (two classes of distinct brightness) to damage on purpose."""
    rng = np.random.default_rng(0)
    for label, level in (('dark', 40), ('light', 200)):
        (root / 'train' / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 20, (size, size, 3)), 0, 255).astype('uint8')
            Image.fromarray(pixels).save(root / 'train' / label / f'{i:02d}.png')
    return root


def test_bad_images_are_listed_before_the_search_or_left_out_and_counted(tmp_path):
    data = _image_folder(tmp_path / 'data')
    empty = data / 'train' / 'dark' / '00.png'
    empty.write_bytes(b'')
    garbage = data / 'train' / 'light' / '03.png'
    garbage.write_bytes(b'not an image at all')
    bomb = data / 'train' / 'light' / '05.png'
    Image.new('1', (14000, 14000)).save(bomb)  # over PIL's decompression-bomb limit, small on disk
    args = ['--data-dir', str(data), '--model', MODEL, '--img-size', '32', '-b', '8', '--epochs', '1', '--workers',
            '0', '--lr', '0.01', '--quiet', '--device', 'cpu']
    with pytest.raises(SystemExit) as e:
        main(args + ['--output', str(tmp_path / 'refused')])
    message = str(e.value)
    assert '3 of the 32 training images cannot be used' in message
    assert f'{empty}: empty file' in message and f'{garbage}: unreadable' in message and f'{bomb}: ' in message
    assert '--skip-bad-images' in message
    main(args + ['--output', str(tmp_path / 'skipped'), '--skip-bad-images'])
    summary = json.loads((tmp_path / 'skipped' / 'genotype.json').read_text())
    assert summary['data']['bad_images_left_out'] == 3
    assert summary['data']['train_images'] + summary['data']['meta_images'] == 29


def test_an_image_that_fails_to_decode_mid_run_is_named_not_replaced(tmp_path):
    data = _image_folder(tmp_path / 'data')
    truncated = data / 'train' / 'dark' / '02.png'
    truncated.write_bytes(truncated.read_bytes()[:200])  # a valid header, pixels cut short
    args = ['--data-dir', str(data), '--model', MODEL, '--img-size', '32', '-b', '8', '--epochs', '1', '--workers',
            '0', '--lr', '0.01', '--quiet', '--device', 'cpu']
    with pytest.raises(SystemExit, match=f'Cannot read training image {truncated}'):
        main(args + ['--output', str(tmp_path / 'midrun')])
    with pytest.raises(SystemExit, match=f'(?s)1 of the 32 .*{truncated}: unreadable'):
        main(args + ['--output', str(tmp_path / 'decoded'), '--check-images', 'decode'])


def test_a_rank_that_stops_responding_ends_the_others_with_a_message(data_dir, tmp_path):
    """Two gloo processes under torchrun; one is stopped (SIGSTOP) after the first checkpoint. The other must not
    wait forever: after --dist-timeout it exits naming the cause and the checkpoint to resume from."""
    out = tmp_path / 'ddp'
    process = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'train_hooks.search',
         *search_args(data_dir, out, '--epochs', '50', '--rho', '0.9', '--dist-timeout', '5')],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not (out / 'last.pth').exists() and time.time() - start < 300 and process.poll() is None:
        time.sleep(0.1)
    workers = subprocess.run(['pgrep', '-P', str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, 'both ranks should be running after the first checkpoint'
    os.kill(int(workers[-1]), signal.SIGSTOP)
    try:
        _, stderr = process.communicate(timeout=240)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert process.returncode != 0
    assert 'another rank stopped responding for --dist-timeout 5 s' in stderr
    assert f'resume from {out / "last.pth"}' in stderr
