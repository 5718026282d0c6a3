"""Export, publish and load round trips through timm's and huggingface_hub's real code, offline; bad inputs."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm
from safetensors import safe_open
from timm.models._hub import load_model_config_from_path

import timm_metapool  # noqa: F401
from _helpers import fill_hub_cache, randomize_bn, subprocess_env
from timm_metapool import OP_NAMES, Genotype
from timm_metapool.hub import export_for_hub
from timm_metapool.integrity import GENOTYPE_STATE_KEY, GenotypeMismatchError
from timm_metapool.loading import checkpoint_filter_fn
from timm_metapool.pretrained import resolve_pretrained_genotype
from train_hooks import publish

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = 'mobilenetv2_metapool_035'
NUM_SLOTS = 16
NUM_CLASSES = 5
# Every third slot 'global' (has weights), the others parameter-free pooling ops.
GENOTYPE = Genotype(tuple('global' if i % 3 == 0 else OP_NAMES[2 + i % 6] for i in range(NUM_SLOTS)))


def _input(size=48):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _outputs(model, size=48):
    with torch.no_grad():
        return model.eval()(_input(size))




def _block_name(model, slot):
    block = model.enhancer_blocks()[slot]
    return next(name for name, m in model.named_modules() if m is block)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('hub')


@pytest.fixture(scope='module')
def trained(work):
    """A 'trained' model, and a timm train.py-style checkpoint of it whose genotype is a JSON path in model_kwargs."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(MODEL, genotype=GENOTYPE, num_classes=NUM_CLASSES)).eval()
    genotype_path = work / 'genotype.json'
    genotype_path.write_text(GENOTYPE.to_json())
    args = argparse.Namespace(model=MODEL, model_kwargs={'genotype': str(genotype_path)}, img_size=48,
                              input_size=None, crop_pct=None, mean=None, std=None, interpolation='')
    checkpoint = work / 'model_best.pth.tar'
    torch.save({'epoch': 3, 'arch': MODEL, 'args': args, 'state_dict': model.state_dict(), 'metric': 1.0}, checkpoint)
    return model, checkpoint


@pytest.fixture(scope='module')
def export_dir(work, trained):
    out = work / 'export'
    metrics = work / 'metrics.json'
    metrics.write_text(json.dumps({'top1': 12.5, 'top5': 50.0}))
    plot = work / 'search.png'
    plot.write_bytes(b'\x89PNG\r\n\x1a\n')
    publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(out), '--repo-id', 'someorg/mp035',
                  '--metrics', str(metrics), '--search-plot', str(plot)])
    return out


def test_export_layout_config_and_metadata(export_dir, trained):
    model = trained[0]
    assert sorted(p.name for p in export_dir.iterdir()) == ['README.md', 'config.json', 'model.safetensors',
                                                            'search_plot.png']
    pretrained_cfg, name, model_args = load_model_config_from_path(export_dir)  # timm's own reader
    assert name == MODEL
    assert model_args['genotype'] == GENOTYPE.to_string()
    assert model_args['num_classes'] == pretrained_cfg['num_classes'] == NUM_CLASSES
    assert tuple(pretrained_cfg['input_size']) == (3, 48, 48)  # the training img_size travels with the weights
    with safe_open(str(export_dir / 'model.safetensors'), framework='pt') as f:
        assert f.metadata()['genotype'] == GENOTYPE.to_string()
        assert set(f.keys()) == set(model.state_dict())


def test_model_card(export_dir):
    card = (export_dir / 'README.md').read_text()
    assert 'library_name: timm' in card
    assert "timm.create_model('hf-hub:someorg/mp035', pretrained=True)" in card
    model = timm.create_model(MODEL, genotype=GENOTYPE)
    for slot, op in enumerate(GENOTYPE):
        assert f'| {slot} | `{_block_name(model, slot)}` |' in card and f'`{op}` |' in card
    assert '![PMPL search](search_plot.png)' in card
    assert '| top1 | 12.5 |' in card
    assert 'Progressive Meta-Pooling Learning for Lightweight Image Classification Model' in card
    assert 'Dong, Peijie and Niu, Xin' in card  # the citation's authors


def test_local_dir_round_trip(export_dir, trained):
    loaded = timm.create_model(f'local-dir:{export_dir}', pretrained=True)
    assert loaded.genotype == GENOTYPE
    assert torch.equal(_outputs(loaded), _outputs(trained[0]))


def test_pretrained_cfg_overlay_file_reads_genotype_from_metadata(export_dir, trained):
    loaded = timm.create_model(
        MODEL, pretrained=True, num_classes=NUM_CLASSES,
        pretrained_cfg_overlay=dict(file=str(export_dir / 'model.safetensors'), num_classes=NUM_CLASSES))
    assert loaded.genotype == GENOTYPE
    assert torch.equal(_outputs(loaded), _outputs(trained[0]))
    fine_tuned = timm.create_model(  # another head: the overlay names the weights' count, timm drops their head
        MODEL, pretrained=True, num_classes=3,
        pretrained_cfg_overlay=dict(file=str(export_dir / 'model.safetensors'), num_classes=NUM_CLASSES))
    assert fine_tuned.get_classifier().out_features == 3 and fine_tuned.genotype == GENOTYPE
    with pytest.raises(ValueError, match=f"classifier has {NUM_CLASSES} classes.*declares 1000.*"
                                         f"pass num_classes={NUM_CLASSES} to timm.create_model and to "
                                         f"pretrained_cfg_overlay"):
        timm.create_model(MODEL, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(export_dir / 'model.safetensors')))


_LOAD_FROM_HUB = """
import sys, torch, timm, timm_metapool
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE
x = torch.load(sys.argv[1])
results = {}
for name in sys.argv[3:]:
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        results[name] = (model.genotype.to_string(), model(x))
torch.save(results, sys.argv[2])
"""


def test_hf_hub_offline_from_prefilled_cache(work, export_dir, trained):
    cache = work / 'hf_cache'
    fill_hub_cache(cache, 'someorg/mp035', export_dir)
    torch.save(_input(), work / 'x.pt')
    subprocess.run(
        [sys.executable, '-c', _LOAD_FROM_HUB, str(work / 'x.pt'), str(work / 'hub_out.pt'), 'hf-hub:someorg/mp035'],
        check=True, cwd=REPO_ROOT, env=subprocess_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1'))
    genotype, out = torch.load(work / 'hub_out.pt')['hf-hub:someorg/mp035']
    assert genotype == GENOTYPE.to_string() and torch.equal(out, _outputs(trained[0]))


_LOAD_SHIPPED_TAG = """
import logging, sys, json, torch, timm, timm_metapool
from timm.data import resolve_data_config
x, tag = torch.load(sys.argv[1]), sys.argv[3]
out = {'listed': timm.list_pretrained('*metapool*')}
model = timm.create_model(tag, pretrained=True).eval()
with torch.no_grad():
    out[tag] = (str(model.genotype), model(x), resolve_data_config({}, model=model), model.forward_features(x).shape[-1])
arch = timm.create_model(tag.split('.')[0])  # the untagged default: the base model's cfg, not the tag's data
out['arch'] = (arch.conv_stem.in_channels, arch.num_classes, resolve_data_config({}, model=arch)['input_size'])
try:
    timm.create_model(tag.split('.')[0], pretrained=True)
except RuntimeError as e:
    out['arch_pretrained'] = str(e)
warnings = []
logging.getLogger('timm_metapool').addHandler(logging.Handler())
logging.getLogger('timm_metapool').handlers[-1].emit = lambda record: warnings.append(record.getMessage())
out['in_chans_3'] = (timm.create_model(tag, pretrained=True, in_chans=3).conv_stem.in_channels, warnings)
torch.save(out, sys.argv[2])
"""


def test_weights_shipped_with_the_package_load_by_tag_offline(work):
    """A tag in the weights folder's manifest loads with pretrained=True and no network: genotype from the file's
    metadata, the create_model kwargs its weights need (1 channel, 10 classes, output_stride 16), and the pretrained
    cfg that timm's resolve_data_config reads; the untagged architecture keeps timm's defaults. A tag whose file is
    absent is not registered. Another in_chans than the
    weights' is built as asked, with a warning naming the flag that uses them as trained."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(MODEL, genotype=GENOTYPE, num_classes=10, in_chans=1, output_stride=16))
    export = export_for_hub(model, work / 'export_for_shipping', model_name=MODEL)
    weights = work / 'weights'
    weights.mkdir()
    shutil.copyfile(export / 'model.safetensors', weights / 'mp035_fm.safetensors')
    cfg = dict(input_size=[1, 56, 56], mean=[0.286], std=[0.353], crop_pct=1.0, interpolation='bilinear',
               num_classes=10)
    (weights / 'manifest.json').write_text(json.dumps({'tags': {
        f'{MODEL}.pmpl_test': dict(file='mp035_fm.safetensors', cfg=cfg,
                                   model_args=dict(in_chans=1, num_classes=10, output_stride=16)),
        'mobilenetv2_metapool_050.pmpl_absent': dict(file='absent.safetensors', cfg=cfg, model_args={}),
    }}))
    x = torch.randn(2, 1, 56, 56, generator=torch.Generator().manual_seed(1))
    torch.save(x, work / 'x1.pt')
    subprocess.run([sys.executable, '-c', _LOAD_SHIPPED_TAG, str(work / 'x1.pt'), str(work / 'shipped.pt'),
                    f'{MODEL}.pmpl_test'], check=True, cwd=REPO_ROOT,
                   env=subprocess_env(TIMM_METAPOOL_WEIGHTS_DIR=str(weights), HF_HUB_OFFLINE='1'))
    out = torch.load(work / 'shipped.pt', weights_only=False)
    assert out['listed'] == [f'{MODEL}.pmpl_test']
    with torch.no_grad():
        expected = model.eval()(x)
    genotype, logits, data_config, last_map = out[f'{MODEL}.pmpl_test']
    assert genotype == GENOTYPE.to_string() and last_map == 4  # 56 px / 16
    torch.testing.assert_close(logits, expected)
    assert data_config['input_size'] == (1, 56, 56) and data_config['mean'] == (0.286,)
    assert data_config['crop_pct'] == 1.0 and data_config['interpolation'] == 'bilinear'
    # The architecture without a tag keeps timm's defaults (a default tag would have made it 1 channel, 10 classes)
    # and pretrained=True on it names the tag.
    assert out['arch'] == (3, 1000, (3, 224, 224))
    assert f"name one of its tags: timm.create_model('{MODEL}.pmpl_test', pretrained=True)" in out['arch_pretrained']
    # validate.py passes in_chans=3 unless given --in-chans: built as asked, with a warning that names the fix.
    in_channels, warnings = out['in_chans_3']
    assert in_channels == 3 and len(warnings) == 1
    assert 'trained with in_chans=1 but in_chans=3 was given' in warnings[0] and '--in-chans 1' in warnings[0]


def _genotype_with(slot, op):
    ops = list(GENOTYPE)
    ops[slot] = op
    return Genotype(tuple(ops))


def test_weights_for_another_genotype_name_the_first_slot(trained):
    # Slot 3 holds 'global' weights; a genotype with a parameter-free op there cannot take them.
    wrong = _genotype_with(3, 'avg3')
    with pytest.raises(GenotypeMismatchError) as e:
        timm.create_model(MODEL, genotype=wrong, num_classes=NUM_CLASSES, pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=trained[0].state_dict(), num_classes=NUM_CLASSES),
                          pretrained_filter_fn=checkpoint_filter_fn)
    model = timm.create_model(MODEL, genotype=wrong)
    message = str(e.value)
    assert f'slot 3 ({_block_name(model, 3)})' in message
    assert "is 'global' in the weights but 'avg3' in this model" in message


def test_weights_of_another_width_are_named_as_such(export_dir):
    # Same genotype, same keys: only the shapes say the weights are MobileNetV2-0.35's, not -0.5's.
    with pytest.raises(GenotypeMismatchError, match=r"slot \d+ \(.*\) holds 'global' weights of other shapes.*"
                                                    r"another model width.*architecture"):
        timm.create_model('mobilenetv2_metapool_050', num_classes=NUM_CLASSES, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(export_dir / 'model.safetensors'),
                                                      num_classes=NUM_CLASSES))


def test_parameter_free_genotype_difference_caught_from_metadata(export_dir):
    # avg and max pooling have the same (no) weights: only the genotype in the safetensors metadata tells them apart.
    slot = next(i for i, op in enumerate(GENOTYPE) if op != 'global')
    other = next(op for op in OP_NAMES if op not in ('global', 'skip', GENOTYPE[slot]))
    wrong = _genotype_with(slot, other)
    overlay = dict(file=str(export_dir / 'model.safetensors'), num_classes=NUM_CLASSES)
    with pytest.raises(GenotypeMismatchError, match=f"slot {slot} .*{GENOTYPE[slot]!r} in the weights"):
        resolve_pretrained_genotype(MODEL, pretrained_cfg_overlay=overlay, genotype=wrong.to_string(),
                                    num_slots=NUM_SLOTS)
    with pytest.raises(GenotypeMismatchError, match=f'slot {slot}'):
        timm.create_model(MODEL, genotype=wrong, num_classes=NUM_CLASSES, pretrained=True,
                          pretrained_cfg_overlay=overlay, pretrained_filter_fn=checkpoint_filter_fn)


def test_local_dir_with_edited_config_genotype_is_refused(work, export_dir):
    edited = work / 'edited_export'
    shutil.copytree(export_dir, edited)
    config = json.loads((edited / 'config.json').read_text())
    config['model_args']['genotype'] = _genotype_with(0, 'skip').to_string()
    (edited / 'config.json').write_text(json.dumps(config))
    with pytest.raises(GenotypeMismatchError, match="slot 0.*config.json model_args.*that file's genotype disagrees"):
        timm.create_model(f'local-dir:{edited}', pretrained=True)


def test_local_dir_with_truncated_weights_is_a_clear_error(work, export_dir):
    damaged = work / 'truncated_export'
    shutil.copytree(export_dir, damaged)
    weights = damaged / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(ValueError, match='truncated or corrupted'):
        timm.create_model(f'local-dir:{damaged}', pretrained=True)


def test_local_dir_with_truncated_config_names_the_file(work, export_dir):
    damaged = work / 'truncated_config'
    shutil.copytree(export_dir, damaged)
    config = damaged / 'config.json'
    config.write_bytes(config.read_bytes()[:60])
    # timm's own error type is kept (callers that catch it still do); the message names the file and the fix.
    with pytest.raises(json.JSONDecodeError, match=f'(?s)Cannot read {config}: it is not valid JSON.*Export the folder'):
        timm.create_model(f'local-dir:{damaged}', pretrained=True)


@pytest.mark.parametrize('damage', ['truncate', 'header'])
def test_damaged_safetensors_is_a_clear_error(work, export_dir, damage):
    path = work / f'{damage}.safetensors'
    data = (export_dir / 'model.safetensors').read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == 'truncate' else b'\xff' * 8 + data[8:])
    with pytest.raises(ValueError, match='truncated or corrupted'):
        timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    out = work / f'export_{damage}'
    with pytest.raises(SystemExit, match='truncated or corrupted'):
        publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(out)])
    assert not out.exists()


def test_truncated_checkpoint_is_a_clear_error(work, trained):
    path = work / 'truncated.pth.tar'
    path.write_bytes(trained[1].read_bytes()[:1000])
    with pytest.raises(SystemExit, match='Cannot load checkpoint'):
        publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(work / 'never')])
    assert not (work / 'never').exists()


@pytest.mark.parametrize('model_name, message', [
    ('resnet18', 'Unknown architecture'),
    ('mobilenetv2_metapool_999', 'Unknown architecture'),
    ('mobilenetv2_metapool_050', 'trained as'),
])
def test_wrong_architecture(work, trained, model_name, message):
    out = work / f'arch_{model_name}'
    with pytest.raises(SystemExit, match=message):
        publish.main(['--checkpoint', str(trained[1]), '--model', model_name, '--out', str(out)])
    assert not out.exists()


def test_existing_output_dir_is_not_touched(work, trained):
    out = work / 'taken'
    out.mkdir()
    (out / 'mine.txt').write_text('keep me')
    with pytest.raises(SystemExit, match='already exists'):
        publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(out)])
    assert [p.name for p in out.iterdir()] == ['mine.txt'] and (out / 'mine.txt').read_text() == 'keep me'
    assert not [p for p in work.iterdir() if p.name.startswith('.taken.')]  # no staging folder left behind


def test_checkpoint_directory_and_non_image_plot_are_refused(work, trained):
    out = work / 'refused_inputs'
    with pytest.raises(SystemExit, match=r'is a directory; give the checkpoint file in it .*model_best\.pth\.tar'):
        publish.main(['--checkpoint', str(work), '--model', MODEL, '--out', str(out)])
    not_a_plot = work / 'plot.csv'
    not_a_plot.write_text('epoch,top1\n1,50\n')
    renamed = work / 'plot_named.png'  # an image name, but not an image's bytes
    renamed.write_text('epoch,top1\n1,50\n')
    for plot in (not_a_plot, renamed):
        with pytest.raises(SystemExit, match='is not a PNG, JPEG, GIF or SVG image'):
            publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(out), '--search-plot',
                          str(plot)])
    assert not out.exists()


def test_genotype_flag_disagreeing_with_checkpoint(work, trained):
    with pytest.raises(SystemExit, match='disagrees'):
        publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(work / 'disagree'),
                      '--genotype', _genotype_with(1, 'skip').to_string()])


@pytest.mark.parametrize('repo_id', ['my org/mp035', 'a/b/c', 'org/mp035-'])
def test_bad_repo_id_is_refused_before_anything_is_written(work, trained, repo_id):
    out = work / 'bad_repo_id'
    with pytest.raises(SystemExit, match='is not a Hugging Face repo id.*ORG/NAME'):
        publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(out), '--repo-id', repo_id])
    assert not out.exists()


def test_push_without_credentials(work, trained):
    out = work / 'push_export'
    proc = subprocess.run(
        [sys.executable, '-m', 'train_hooks.publish', '--checkpoint', str(trained[1]), '--model', MODEL,
         '--out', str(out), '--repo-id', 'someorg/mp035', '--push'],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
        env=subprocess_env(HF_HOME=str(work / 'no_login')))
    assert proc.returncode == 1
    assert 'No Hugging Face token' in proc.stderr and 'hf auth login' in proc.stderr
    assert not out.exists()


def test_publish_plain_state_dict_with_genotype_string(work, trained):
    # With the genotype entry our models' state_dicts carry, and without it (as another tool would save them).
    with_entry = trained[0].state_dict()
    without_entry = {k: v for k, v in with_entry.items() if k != GENOTYPE_STATE_KEY}
    for name, state_dict in (('plain', with_entry), ('foreign', without_entry)):
        path = work / f'{name}.pth'
        torch.save(state_dict, path)
        out = work / f'{name}_export'
        publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(out),
                      '--genotype', GENOTYPE.to_string()])
        loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
        assert loaded.genotype == GENOTYPE
        assert torch.equal(_outputs(loaded), _outputs(trained[0]))


def test_publish_search_checkpoint(work):
    # A search checkpoint: supernet weights (every candidate per slot, arch logits) plus the genotype found.
    torch.manual_seed(2)
    supernet = randomize_bn(timm.create_model(MODEL, num_classes=NUM_CLASSES), seed=2)
    genotype = Genotype.random(11, NUM_SLOTS)
    path = work / 'last.pth'
    torch.save({'epoch': 30, 'state_dict': supernet.state_dict(), 'genotype': genotype.to_dict()}, path)
    out = work / 'search_export'
    publish.main(['--checkpoint', str(path), '--model', MODEL, '--out', str(out), '--from-supernet'])
    supernet.fix_to_genotype(genotype)  # the reference: the model's own way of fixing slots
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.genotype == genotype
    assert torch.equal(_outputs(loaded), _outputs(supernet))



def test_publish_one_channel_model(work):
    """A model trained on one-channel images (train.py --input-size 1 H W): the export is checked on one-channel
    input and loads back with one input channel. The check used to feed it three channels and fail after the export
    was already in place."""
    torch.manual_seed(3)
    model = randomize_bn(timm.create_model(MODEL, genotype=GENOTYPE, num_classes=NUM_CLASSES, in_chans=1)).eval()
    args = argparse.Namespace(model=MODEL, model_kwargs={'genotype': GENOTYPE.to_string()}, img_size=None,
                              input_size=[1, 28, 28], crop_pct=None, mean=[0.5], std=[0.25], interpolation='')
    checkpoint = work / 'gray_best.pth.tar'
    torch.save({'epoch': 1, 'arch': MODEL, 'args': args, 'state_dict': model.state_dict()}, checkpoint)
    out = work / 'gray_export'
    publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(out)])
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.conv_stem.in_channels == 1 and loaded.pretrained_cfg['input_size'] == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _last_map_size(model, size=48):
    with torch.no_grad():
        return model.eval().forward_features(_input(size)).shape[-1]


def test_output_stride_travels_with_the_export(work):
    """output_stride changes what the network computes but not its weights: without it in config.json a load would
    silently rebuild the stride-32 network."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(MODEL, genotype=GENOTYPE, num_classes=NUM_CLASSES, output_stride=16))
    assert _last_map_size(model) == 3  # 48 px / 16; stride 32 gives 2
    out = export_for_hub(model, work / 'export_os16', model_name=MODEL)
    assert load_model_config_from_path(out)[2]['output_stride'] == 16
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert _last_map_size(loaded) == 3
    torch.testing.assert_close(_outputs(loaded), _outputs(model))
    # From a timm train.py checkpoint whose --model-kwargs held it, and from a state_dict with --model-kwargs.
    genotype_path = work / 'os16_genotype.json'
    genotype_path.write_text(GENOTYPE.to_json())
    args = argparse.Namespace(model=MODEL, model_kwargs={'genotype': str(genotype_path), 'output_stride': 16})
    checkpoint = work / 'os16.pth.tar'
    torch.save({'epoch': 1, 'arch': MODEL, 'args': args, 'state_dict': model.state_dict()}, checkpoint)
    plain = work / 'os16_plain.pth'
    torch.save(model.state_dict(), plain)
    for source, extra in ((checkpoint, []), (plain, ['--model-kwargs', 'output_stride=16'])):
        published = work / f'published_{source.stem}'
        publish.main(['--checkpoint', str(source), '--model', MODEL, '--out', str(published), *extra])
        assert load_model_config_from_path(published)[2]['output_stride'] == 16
        assert _last_map_size(timm.create_model(f'local-dir:{published}', pretrained=True)) == 3
    with pytest.raises(SystemExit, match='--model-kwargs takes output_stride, not drop_rate'):
        publish.main(['--checkpoint', str(plain), '--model', MODEL, '--out', str(work / 'never_os'),
                      '--model-kwargs', 'drop_rate=0.1'])
    # The checkpoint's record wins: --model-kwargs may complete it, not contradict it.
    with pytest.raises(SystemExit, match='output_stride=8 differs from the checkpoint, which records .* '
                                         'output_stride=16'):
        publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(work / 'never_os8'),
                      '--model-kwargs', 'output_stride=8'])
    assert not (work / 'never_os8').exists()
    # The weights file alone (pretrained_cfg_overlay file=) records the stride too: another one is refused.
    weights = str(out / 'model.safetensors')
    overlay = dict(file=weights, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r'trained with output_stride=16, but this model was built with '
                                         r'output_stride=32.*--model-kwargs output_stride=16'):
        timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, pretrained_cfg_overlay=overlay)
    from_file = timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, output_stride=16,
                                  pretrained_cfg_overlay=overlay)
    torch.testing.assert_close(_outputs(from_file), _outputs(model))


def test_export_keeps_a_training_model_training(work):
    """A model exported mid-training (e.g. a checkpoint callback) goes back to training mode: BN keeps updating its
    statistics after the export, as it would have without it."""
    model = timm.create_model(MODEL, genotype=GENOTYPE, num_classes=NUM_CLASSES).train()
    export_for_hub(model, work / 'mid_training_export')
    assert model.training and all(m.training for m in model.modules())
    eval_model = timm.create_model(MODEL, genotype=GENOTYPE, num_classes=NUM_CLASSES).eval()
    export_for_hub(eval_model, work / 'eval_export')
    assert not any(m.training for m in eval_model.modules())


def test_export_under_another_architecture_name_is_refused(work, trained):
    out = work / 'renamed_export'
    with pytest.raises(ValueError, match=f'built as {MODEL}, not mobilenetv2_metapool_100'):
        export_for_hub(trained[0], out, model_name='mobilenetv2_metapool_100')
    assert not out.exists()


def test_reparameterized_model_exports_its_genotype(work):
    """timm's reparameterize_model moves every fixed avgK pool into its block's projection: the exported genotype is
    still the trained one, and the export loads into a model that computes what the rewritten one does."""
    from timm.utils.model import reparameterize_model
    genotype = Genotype(tuple('avg5' if op == 'global' else op for op in GENOTYPE))  # only pools to rewrite
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(MODEL, genotype=genotype, num_classes=NUM_CLASSES)).eval()
    deployed = reparameterize_model(model)
    assert deployed.genotype == genotype
    out = export_for_hub(deployed, work / 'deployed_export')
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.genotype == genotype
    torch.testing.assert_close(_outputs(loaded), _outputs(deployed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('variant, missing', [('reparameterize_model', r'blocks\..*meta_pool\.bn\.'),
                                              ('features_only', r'conv_head\.weight')])
def test_model_whose_weights_would_not_load_is_not_exported(work, trained, variant, missing):
    """Global Context Enhancers fused for inference have no BN weights, a features_only model no head: their
    exports would not load into the model the genotype builds, so they are refused, naming the keys, and nothing is
    written."""
    from timm.utils.model import reparameterize_model
    if variant == 'reparameterize_model':
        model = reparameterize_model(trained[0])
    else:
        model = timm.create_model(MODEL, genotype=GENOTYPE, features_only=True)
    out = work / f'{variant}_export'
    with pytest.raises(ValueError, match=f"would not load .*missing: {missing}.*{variant}"):
        export_for_hub(model, out)
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(f'.{variant}_export.')]


def test_features_only_model_loads_an_export(export_dir, trained):
    """timm drops the head of pretrained weights for a features_only model; the filter must let it."""
    features = timm.create_model(f'local-dir:{export_dir}', pretrained=True, features_only=True).eval()
    reference = timm.create_model(MODEL, genotype=GENOTYPE, features_only=True).eval()
    missing, unexpected = reference.load_state_dict(trained[0].state_dict(), strict=False)
    assert not missing and set(unexpected) >= {'classifier.weight', 'classifier.bias'}
    with torch.no_grad():
        for got, want in zip(features(_input()), reference(_input())):
            assert torch.equal(got, want)


def test_channels_last_model_exports_and_keeps_its_layout(work, trained):
    model = randomize_bn(timm.create_model(MODEL, genotype=GENOTYPE, num_classes=NUM_CLASSES)).eval()
    model.to(memory_format=torch.channels_last)
    out = export_for_hub(model, work / 'channels_last_export')
    assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=1e-5, atol=1e-6)


def test_export_folder_has_the_permissions_of_a_folder_the_user_makes(work, trained):
    reference = work / 'made_by_user'
    reference.mkdir()
    (reference / 'file').write_text('mine')
    out = export_for_hub(trained[0], work / 'permissions_export')
    assert (out.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)
    for path in out.iterdir():  # the weights too (safetensors writes them 0600)
        assert (path.stat().st_mode & 0o777) == ((reference / 'file').stat().st_mode & 0o777), path.name


def test_dangling_symlink_as_out_is_refused_first(work, trained):
    link = work / 'dangling'
    link.symlink_to(work / 'nowhere')
    with pytest.raises(SystemExit, match='already exists'):
        publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(link)])
    with pytest.raises(FileExistsError, match='already exists'):
        export_for_hub(trained[0], link)
    assert link.is_symlink() and not (work / 'nowhere').exists()


def _summary_csv(path, top1_by_epoch):
    rows = ['epoch,train_loss,eval_loss,eval_top1,eval_top5']
    rows += [f'{e},1.0,1.0,{top1},90.0' for e, top1 in enumerate(top1_by_epoch)]
    path.write_text('\n'.join(rows) + '\n')
    return path


def test_card_metrics_are_those_of_the_checkpoints_epoch(work, trained):
    summary = _summary_csv(work / 'summary.csv', [10.0, 80.0, 30.0, 40.0])  # the checkpoint is epoch 3
    out = work / 'epoch_metrics_export'
    publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(out), '--metrics', str(summary)])
    card = (out / 'README.md').read_text()
    assert '| eval_top1 | 40.0 |' in card and '| epoch | 3 |' in card and '80.0' not in card
    short = _summary_csv(work / 'summary_short.csv', [10.0, 80.0])
    with pytest.raises(SystemExit, match='no row for epoch 3'):
        publish.main(['--checkpoint', str(trained[1]), '--model', MODEL, '--out', str(work / 'short_export'),
                      '--metrics', str(short)])


def test_ema_runs_summary_is_refused_for_the_non_ema_weights(work, trained):
    args = argparse.Namespace(model=MODEL, model_kwargs={'genotype': GENOTYPE.to_string()}, model_ema=True,
                              model_ema_force_cpu=False)
    state = trained[0].state_dict()
    checkpoint = work / 'ema_best.pth.tar'
    torch.save({'epoch': 1, 'arch': MODEL, 'args': args, 'state_dict': state, 'state_dict_ema': state}, checkpoint)
    summary = _summary_csv(work / 'ema_summary.csv', [10.0, 20.0])
    with pytest.raises(SystemExit, match='EMA weights.*Add --use-ema'):
        publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(work / 'ema_refused'),
                      '--metrics', str(summary)])
    out = work / 'ema_export'
    publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(out), '--metrics', str(summary),
                  '--use-ema'])
    assert '| eval_top1 | 20.0 |' in (out / 'README.md').read_text()
    # With the EMA kept on the CPU timm does not evaluate it: the summary is the trained weights', not the EMA's.
    args.model_ema_force_cpu = True
    torch.save({'epoch': 1, 'arch': MODEL, 'args': args, 'state_dict': state, 'state_dict_ema': state}, checkpoint)
    with pytest.raises(SystemExit, match="trained weights' .*Drop --use-ema"):
        publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(work / 'ema_cpu_refused'),
                      '--metrics', str(summary), '--use-ema'])


def test_genotype_file_changed_after_training_does_not_change_the_export(work):
    """train.py keeps `--model-kwargs genotype=PATH` as a path, and the file may be rewritten later (a new search in
    the same folder, a parameter-free slot changed): publish exports the genotype the weights carry."""
    genotype_path = work / 'later' / 'genotype.json'
    genotype_path.parent.mkdir()
    genotype_path.write_text(GENOTYPE.to_json())
    model = randomize_bn(timm.create_model(MODEL, genotype=GENOTYPE, num_classes=NUM_CLASSES))
    args = argparse.Namespace(model=MODEL, model_kwargs={'genotype': str(genotype_path)})
    checkpoint = work / 'later' / 'model_best.pth.tar'
    torch.save({'epoch': 0, 'arch': MODEL, 'args': args, 'state_dict': model.state_dict()}, checkpoint)
    other = _genotype_with(1, 'avg7' if GENOTYPE[1] != 'avg7' else 'max7')  # a parameter-free slot changed
    genotype_path.write_text(other.to_json())
    os.utime(genotype_path, (os.path.getmtime(checkpoint) - 10,) * 2)  # even backdated
    with pytest.raises(SystemExit, match=f"disagrees .*slot 1 is {GENOTYPE[1]!r} in the weights but {other[1]!r}"):
        publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(work / 'later_export'),
                      '--genotype', str(genotype_path)])
    publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(work / 'later_export')])
    loaded = timm.create_model(f'local-dir:{work / "later_export"}', pretrained=True)
    assert loaded.genotype == GENOTYPE and torch.equal(_outputs(loaded), _outputs(model))


def test_publish_from_another_directory_reads_the_genotype_from_the_weights(work, trained, monkeypatch):
    args = argparse.Namespace(model=MODEL, model_kwargs={'genotype': 'runs/s1/genotype.json'})
    checkpoint = work / 'relative_best.pth.tar'
    torch.save({'epoch': 0, 'arch': MODEL, 'args': args, 'state_dict': trained[0].state_dict()}, checkpoint)
    monkeypatch.chdir(work)
    publish.main(['--checkpoint', str(checkpoint), '--model', MODEL, '--out', str(work / 'relative_export')])
    assert timm.create_model(f'local-dir:{work / "relative_export"}', pretrained=True).genotype == GENOTYPE


def test_pretrained_file_that_is_a_folder_names_the_file_to_give(export_dir):
    # train.py --pretrained-path EXPORT_DIR: timm loads `file` as a weights file and would fail with FileNotFoundError.
    with pytest.raises(ValueError, match=r"is a folder: give its weights file \(.*model\.safetensors\).*local-dir:"):
        timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES,
                          pretrained_cfg_overlay=dict(file=str(export_dir), num_classes=NUM_CLASSES))
