"""Every state_dict knows its genotype, no load path unpickles code, and corrupted weights are named.

Parameter-free slots (skip, maxK, avgK) leave no trace in keys or shapes, so without the genotype in the weights two
architectures load each other's weights silently. The references here are timm's own loaders and models.
"""
import argparse
import logging
import os
import shlex

import pytest
import torch
import timm
from timm.models import load_checkpoint, resume_checkpoint
from timm.utils import CheckpointSaver, ModelEmaV3

import timm_metapool  # noqa: F401
from _helpers import randomize_bn
from timm_metapool.data import generate_demo_dataset
from timm_metapool.hub import export_for_hub
from timm_metapool.integrity import GENOTYPE_STATE_KEY, ChecksumMismatchError, GenotypeMismatchError
from timm_metapool.pmpl import PMPLConfig, PMPLSearch
from timm_metapool.pretrained import PRETRAINED_TAGS
from train_hooks import publish
from train_hooks import search as search_cli

MODEL = 'mobilenetv2_metapool_035'
NUM_SLOTS = 16
NUM_CLASSES = 4


def _genotype(first: str, rest: str = 'skip'):
    return [first] + [rest] * (NUM_SLOTS - 1)


def _x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))




def _model(genotype, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(MODEL, genotype=genotype, num_classes=NUM_CLASSES), seed).eval()


SLOT0_SWAP = r"slot 0 \(blocks\.1\.0\) is 'max3' in the weights but 'avg7' in this model"


def test_parameter_free_swap_is_refused_by_load_state_dict():
    a, b = _model(_genotype('max3')), _model(_genotype('avg7'))
    assert a.state_dict().keys() == b.state_dict().keys()  # keys and shapes alone cannot tell them apart
    with torch.no_grad():
        assert not torch.allclose(a(_x()), b(_x()))
    for strict in (True, False):
        with pytest.raises(GenotypeMismatchError, match=SLOT0_SWAP):
            b.load_state_dict(a.state_dict(), strict=strict)
    twin = _model(_genotype('max3'), seed=1)
    twin.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(_x()), a(_x()))


def test_slot_with_weights_swap_names_the_slot_not_a_key_list():
    with pytest.raises(GenotypeMismatchError, match=r"slot 0 \(blocks\.1\.0\) is 'global' in the weights but 'skip'"):
        _model('skip').load_state_dict(_model(_genotype('global')).state_dict())
    with pytest.raises(GenotypeMismatchError, match="search space.*in the weights but 'skip'.*--from-supernet"):
        _model('skip').load_state_dict(timm.create_model(MODEL, num_classes=NUM_CLASSES).state_dict())


def test_timm_loaders_and_checkpoint_saver_files_carry_the_genotype(tmp_path):
    """timm's CheckpointSaver (what train.py writes, EMA included), then load_checkpoint (validate.py --checkpoint,
    train.py --initial-checkpoint) and resume_checkpoint (train.py --resume)."""
    a = _model(_genotype('max3'))
    optimizer = torch.optim.SGD(a.parameters(), lr=0.1)
    ema = ModelEmaV3(a, decay=0.9)
    ema.update(a, step=1)
    saver = CheckpointSaver(a, optimizer, args=argparse.Namespace(model=MODEL), model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = str(tmp_path / 'model_best.pth.tar')
    b = _model(_genotype('avg7'))
    for use_ema in (False, True):
        with pytest.raises(GenotypeMismatchError, match=SLOT0_SWAP):
            load_checkpoint(b, path, use_ema=use_ema)
    with pytest.raises(GenotypeMismatchError, match=SLOT0_SWAP):
        resume_checkpoint(b, path)
    twin = _model(_genotype('max3'), seed=3)
    load_checkpoint(twin, path, use_ema=True)
    with torch.no_grad():
        assert torch.equal(twin(_x()), ema.module(_x()))


def test_timm_base_weights_load_exactly_into_all_skip_and_warm_start_other_genotypes(tmp_path, caplog):
    base = randomize_bn(timm.create_model('mobilenetv2_035', num_classes=NUM_CLASSES)).eval()
    assert GENOTYPE_STATE_KEY not in base.state_dict()
    skip = _model('skip', seed=5)
    skip.load_state_dict(base.state_dict())  # strict: timm's own weights, no genotype, fit all-skip exactly
    with torch.no_grad():
        assert torch.equal(skip(_x()), base(_x()))
    with pytest.raises(GenotypeMismatchError, match="carry no Meta-Pooling genotype.*slot 0 .*'global'.*"
                                                    "pretrained_cfg_overlay"):
        _model('global').load_state_dict(base.state_dict())

    path = tmp_path / 'mobilenetv2_035.pth'
    torch.save(base.state_dict(), path)
    with caplog.at_level(logging.INFO, logger='timm_metapool.loading'):
        warm = timm.create_model(MODEL, genotype=_genotype('global', 'avg3'), num_classes=NUM_CLASSES,
                                 pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES))
    assert 'enhancer slots [0] start fresh' in caplog.text
    loaded = warm.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(loaded[key], value), key


class _Payload:
    """Unpickling it opens (creates) the marker file: code run by the loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.fixture()
def pickle_bomb(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': _model('skip').state_dict(), 'format_version': 1, 'search': {},
                'payload': _Payload(str(marker))}, path)
    torch.load(path, weights_only=False)  # the payload works: a pickle-trusting loader would run it
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_a_pickle_payload_runs_on_no_load_path(pickle_bomb, tmp_path):
    path, marker = pickle_bomb
    with pytest.raises(SystemExit, match='weights_only'):
        search_cli.main(['--resume', str(path), '--output', str(tmp_path / 'resumed')])
    with pytest.raises(SystemExit, match='weights_only'):
        publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(tmp_path / 'export')])
    with pytest.raises(Exception):
        timm.create_model(MODEL, genotype='skip', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(Exception):
        load_checkpoint(_model('skip'), str(path))
    assert not marker.exists()


def _flip_bytes_of(path, tensor: torch.Tensor, count: int = 64):
    """Flip `count` bytes in the middle of `tensor`'s data inside the file (found by its bytes)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    start = data.find(raw)
    assert start >= 0 and data.find(raw, start + 1) < 0
    middle = start + len(raw) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope='module')
def finished_search(tmp_path_factory):
    root = tmp_path_factory.mktemp('search')
    data = generate_demo_dataset(str(root / 'data'), images_per_class={'train': 8})
    out = root / 'run'
    search_cli.main(['--data-dir', data, '--output', str(out), '--model', MODEL, '--img-size', '32', '-b', '16',
                     '--epochs', '1', '--workers', '0', '--quiet', '--device', 'cpu'])
    return out


def test_retrain_command_of_a_cpu_search_names_the_device(finished_search):
    argv = shlex.split((finished_search / 'retrain_command.txt').read_text().splitlines()[0])
    assert argv[argv.index('--device') + 1] == 'cpu'


def test_flipped_bytes_in_a_search_checkpoint_are_caught(finished_search, tmp_path):
    corrupted = tmp_path / 'last.pth'
    corrupted.write_bytes((finished_search / 'last.pth').read_bytes())
    state = torch.load(corrupted, weights_only=True)
    _flip_bytes_of(corrupted, state['state_dict']['conv_head.weight'])
    with pytest.raises(SystemExit, match=f"{corrupted}.* is corrupted"):
        search_cli.main(['--resume', str(corrupted), '--output', str(tmp_path / 'resumed')])
    with pytest.raises(SystemExit, match=f"{corrupted}.* is corrupted"):
        publish.main(['--checkpoint', str(corrupted), '--model', MODEL, '--out', str(tmp_path / 'export')])
    assert not (tmp_path / 'export').exists()


def test_flipped_bytes_in_a_search_checkpoints_optimizer_state_are_caught(finished_search, tmp_path):
    corrupted = tmp_path / 'last.pth'
    corrupted.write_bytes((finished_search / 'last.pth').read_bytes())
    state = torch.load(corrupted, weights_only=True)
    momentum = max((s['momentum_buffer'] for s in state['search']['weight_optimizer']['state'].values()),
                   key=torch.Tensor.numel)
    _flip_bytes_of(corrupted, momentum)
    with pytest.raises(SystemExit, match=f"{corrupted}.* damaged search checkpoint: its optimizer state .* does not "
                                         f"match the checksum"):
        search_cli.main(['--resume', str(corrupted), '--output', str(tmp_path / 'resumed')])
    state['search'] = {}
    torch.save(state, corrupted)
    with pytest.raises(SystemExit, match='damaged search checkpoint: its search state lacks weight_optimizer, '
                                         'arch_optimizer, fix_events'):
        search_cli.main(['--resume', str(corrupted), '--output', str(tmp_path / 'resumed')])


def test_flipped_bytes_in_an_export_are_caught(tmp_path):
    model = _model(_genotype('global', 'avg5'))
    out = export_for_hub(model, tmp_path / 'export')
    weights = out / 'model.safetensors'
    _flip_bytes_of(weights, model.state_dict()['conv_head.weight'])
    with pytest.raises(ChecksumMismatchError, match=f"{weights}.* is corrupted"):
        timm.create_model(f'local-dir:{out}', pretrained=True)
    with pytest.raises(SystemExit, match=f"{weights}.* is corrupted"):
        publish.main(['--checkpoint', str(weights), '--model', MODEL, '--out', str(tmp_path / 'again')])


def test_publish_refuses_search_space_weights_unless_asked(tmp_path):
    torch.manual_seed(2)
    supernet = randomize_bn(timm.create_model(MODEL, num_classes=NUM_CLASSES), seed=2)
    path = tmp_path / 'supernet.pth.tar'
    torch.save({'epoch': 3, 'arch': MODEL, 'args': argparse.Namespace(model=MODEL, model_kwargs={}),
                'state_dict': supernet.state_dict()}, path)
    genotype = ','.join(_genotype('global', 'max5'))
    with pytest.raises(SystemExit, match='search-space .*supernet.*Retrain the genotype.*--from-supernet'):
        publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(tmp_path / 'refused')])
    with pytest.raises(SystemExit, match='--from-supernet.*no metrics.*Drop --metrics'):
        publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(tmp_path / 'refused'),
                      '--from-supernet', '--genotype', genotype, '--metrics', str(path)])
    assert not (tmp_path / 'refused').exists()
    publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(tmp_path / 'subnet'), '--from-supernet',
                  '--genotype', genotype])
    supernet.fix_to_genotype(genotype)
    loaded = timm.create_model(f'local-dir:{tmp_path / "subnet"}', pretrained=True)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_x()), supernet.eval()(_x()))


def test_training_a_search_space_outside_pmpl_warns_once(caplog):
    supernet = timm.create_model(MODEL, num_classes=NUM_CLASSES)
    with caplog.at_level(logging.WARNING, logger='timm_metapool'):
        supernet.train()
        supernet.train()
    warnings = [r for r in caplog.records if 'not the PMPL search' in r.getMessage()]
    assert len(warnings) == 1 and '--model-kwargs genotype=' in warnings[0].getMessage()
    caplog.clear()
    searched = timm.create_model(MODEL, num_classes=NUM_CLASSES)
    PMPLSearch(searched, PMPLConfig())
    with caplog.at_level(logging.WARNING, logger='timm_metapool'):
        searched.train()
        _model('global').train()  # a fixed architecture is what train.py should train
    assert not [r for r in caplog.records if 'not the PMPL search' in r.getMessage()]


def test_only_tags_with_weights_are_listed_and_pretrained_without_weights_fails_at_once():
    listed = timm.list_pretrained('*metapool*')
    assert listed == sorted(PRETRAINED_TAGS)  # the tags the package ships (timm_metapool/weights), each with its file
    assert all(os.path.isfile(PRETRAINED_TAGS[tag]['file']) for tag in listed)
    assert [m for m in timm.list_models(pretrained=True) if 'metapool' in m] == listed
    assert not [tag for tag in listed if tag.startswith('mobilenetv2_metapool_100.')]  # no weights for the 100
    for kwargs in ({}, {'genotype': 'skip'}):
        with pytest.raises(RuntimeError, match='mobilenetv2_metapool_100 has no pretrained weights.*local-dir:'):
            timm.create_model('mobilenetv2_metapool_100', pretrained=True, **kwargs)
