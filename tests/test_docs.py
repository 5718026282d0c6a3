"""Every Python snippet of the README, docs/ and examples/ runs as written, in a fresh interpreter, offline.

The files the snippets name are made first, the way a user gets them: the demo's `runs/demo/genotype.json`, the
export folders they load (the package's own `export_for_hub`) and the same export as each published repo they name,
in a prefilled huggingface_hub cache (`HF_HUB_OFFLINE=1`). A snippet that stops running, or whose
own checks fail, fails its test here.
"""
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

import pytest
import timm

import timm_metapool  # noqa: F401  (registers the models)
from _helpers import fill_hub_cache, subprocess_env
from timm_metapool import Genotype
from timm_metapool.hub import export_for_hub

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / 'README.md', *sorted(REPO_ROOT.glob('docs/*.md')), *sorted(REPO_ROOT.glob('examples/*.md'))]
# What the snippets load: export folders (`local-dir:`) and published repos (`hf-hub:`), as the docs name them.
EXPORTS = ('exports/mnv2-metapool-mydata', 'exports/mnv2-metapool-walk')
HUB_REPOS = ('ORG/NAME', 'me/mnv2-metapool-walk')
FENCE = re.compile(r'^[ \t]*```python[ \t]*\n(.*?)^[ \t]*```', re.MULTILINE | re.DOTALL)


def python_snippets(path: Path) -> List[Tuple[str, str]]:
    """(`file#n`, code) of every fenced ```python block in `path`, dedented (blocks inside list items are indented)."""
    blocks = FENCE.findall(path.read_text())
    return [(f'{path.relative_to(REPO_ROOT)}#{n}', textwrap.dedent(code)) for n, code in enumerate(blocks, 1)]


SNIPPETS = [snippet for path in DOCS for snippet in python_snippets(path)]


@pytest.fixture(scope='module')
def user_dir(tmp_path_factory) -> Path:
    """A working directory with the files the snippets name, and a Hub cache holding the repos they name."""
    work = tmp_path_factory.mktemp('docs')
    genotype = Genotype.parse('random:3', num_slots=16)
    (work / 'runs' / 'demo').mkdir(parents=True)
    (work / 'runs' / 'demo' / 'genotype.json').write_text(genotype.to_json())
    model = timm.create_model('mobilenetv2_metapool_100', genotype=genotype, num_classes=10).eval()
    export = export_for_hub(model, work / 'export', model_name='mobilenetv2_metapool_100')
    for folder in EXPORTS:
        shutil.copytree(export, work / folder)
    for repo_id in HUB_REPOS:
        fill_hub_cache(work / 'hf_cache', repo_id, export)
    return work


def test_the_docs_have_snippets():
    names = [name for name, _ in SNIPPETS]
    assert 'README.md#1' in names and any(name.startswith('docs/') for name in names), names


@pytest.mark.parametrize('name,code', SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_snippet_runs(user_dir, name, code):
    env = subprocess_env(HF_HUB_CACHE=str(user_dir / 'hf_cache'), HF_HUB_OFFLINE='1')
    run = subprocess.run([sys.executable, '-c', code], cwd=user_dir, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f'{name} failed:\n{code}\n--- stderr ---\n{run.stderr[-3000:]}'
