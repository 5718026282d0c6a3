"""The launcher runs timm-style scripts with the plugin registered; `--model-kwargs genotype=...` string forms."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from timm.utils import ParseKwargs

import timm_metapool  # noqa: F401
from timm_metapool import Genotype
from train_hooks import launch

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_SLOTS = 16  # mobilenetv2_metapool_035

# A stand-in for timm's validate.py / benchmark.py: same --model / --model-kwargs parsing, one create_model call.
SCRIPT = '''
import argparse, json, sys
import timm
from timm.utils import ParseKwargs

parser = argparse.ArgumentParser()
parser.add_argument('--model', required=True)
parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
parser.add_argument('--out', required=True)
parser.add_argument('--exit-code', type=int, default=0)
args = parser.parse_args()
model = timm.create_model(args.model, **args.model_kwargs)
with open(args.out, 'w') as f:
    json.dump({'name': __name__, 'argv0': sys.argv[0], 'genotype': model.genotype.to_string()}, f)
sys.exit(args.exit_code)
'''


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / 'tiny_validate.py'
    path.write_text(SCRIPT)
    return path


@pytest.fixture()
def genotype_file(tmp_path):
    genotype = Genotype.random(3, NUM_SLOTS)
    path = tmp_path / 'genotype.json'
    path.write_text(genotype.to_json(note='written by the test'))
    return path, genotype


def _env():
    return {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}


def test_launcher_registers_plugin_and_runs_script_as_main(tmp_path, script, genotype_file):
    path, genotype = genotype_file
    out = tmp_path / 'result.json'
    script_args = [str(script), '--model', 'mobilenetv2_metapool_035', '--model-kwargs', f'genotype={path}',
                   '--out', str(out)]
    # The bare script cannot see the architecture: timm_metapool is never imported by it.
    bare = subprocess.run([sys.executable, *script_args], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert bare.returncode != 0 and 'Unknown model (mobilenetv2_metapool_035)' in bare.stderr
    subprocess.run([sys.executable, '-m', 'train_hooks.launch', *script_args], check=True, cwd=REPO_ROOT, env=_env())
    result = json.loads(out.read_text())
    assert result == {'name': '__main__', 'argv0': str(script), 'genotype': genotype.to_string()}


def test_launcher_in_process_restores_argv_and_passes_exit_code(tmp_path, script):
    argv_before, path_before = list(sys.argv), list(sys.path)
    out = tmp_path / 'result.json'
    with pytest.raises(SystemExit) as e:
        launch.main([str(script), '--model', 'mobilenetv2_metapool_035', '--model-kwargs', 'genotype=global',
                     '--out', str(out), '--exit-code', '3'])
    assert e.value.code == 3
    assert json.loads(out.read_text())['genotype'] == Genotype.uniform('global', NUM_SLOTS).to_string()
    assert sys.argv == argv_before and sys.path == path_before


def test_launcher_missing_script_and_usage(tmp_path, capsys):
    with pytest.raises(SystemExit, match='not found'):
        launch.main([str(tmp_path / 'validate.py'), '--model', 'x'])
    with pytest.raises(SystemExit, match="first argument must be the script to run .* got the option '--model'"):
        launch.main(['--model', 'x'])
    with pytest.raises(SystemExit, match=f"{tmp_path}' is a folder; give the script inside it"):
        launch.main([str(tmp_path), '--model', 'x'])
    assert launch.main(['--help']) == 0
    assert 'SCRIPT' in capsys.readouterr().out
    assert launch.main([]) == 2


def _string_forms(genotype_file):
    path, genotype = genotype_file
    skip_global = Genotype(tuple('skip' if i % 2 else 'global' for i in range(NUM_SLOTS)))
    return [
        (f'genotype={path}', genotype),
        (f'genotype={skip_global.to_string()}', skip_global),
        ('genotype=avg3', Genotype.uniform('avg3', NUM_SLOTS)),
        ('genotype=random:7', Genotype.random(7, NUM_SLOTS)),
        (f'genotype={list(skip_global)}', skip_global),  # a Python list literal: ParseKwargs evaluates it
    ]


def test_model_kwargs_string_forms(genotype_file):
    # timm's own --model-kwargs parser: values that are not Python literals arrive as plain strings.
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    for form, expected in _string_forms(genotype_file):
        kwargs = parser.parse_args(['--model-kwargs', form]).model_kwargs
        model = timm.create_model('mobilenetv2_metapool_035', **kwargs)
        assert model.genotype == expected, form
