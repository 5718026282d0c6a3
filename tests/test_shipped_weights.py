"""The weights shipped inside the package (timm_metapool/weights/manifest.json) are the ones that were measured.

For every tag in the manifest: its file is the one `benchmarks/ship_fashion_mnist_weights.py` measured (same sha256
as its record), `timm.create_model(TAG, pretrained=True)` builds it offline in a fresh process, with the genotype of
the search it came from and the data config the measurement used. The measured top-1 itself needs Fashion-MNIST
(not in CI): `python benchmarks/ship_fashion_mnist_weights.py --check-only` re-measures it.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import subprocess_env
from timm_metapool.pretrained import SHIPPED_WEIGHTS_DIR, read_weights_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / 'benchmarks' / 'results' / 'fashion_mnist_56px'
SHIPPED = read_weights_manifest(SHIPPED_WEIGHTS_DIR)

_LOAD = """
import json, sys, torch, timm, timm_metapool
from timm.data import resolve_data_config
tag = sys.argv[1]
model = timm.create_model(tag, pretrained=True).eval()
with torch.no_grad():
    logits = model(torch.zeros(2, *model.pretrained_cfg['input_size']))
config = resolve_data_config({}, model=model)
print(json.dumps(dict(listed=tag in timm.list_pretrained(), genotype=model.genotype.to_string(),
                      logits=list(logits.shape), data_config={k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in config.items()})))
"""


def _record(tag):
    with open(RESULTS / 'shipped_weights.json') as f:
        record = json.load(f)
    assert record['tag'] == tag, f'{tag} is in the manifest but shipped_weights.json records {record["tag"]}'
    return record


@pytest.mark.parametrize('tag', sorted(SHIPPED))
def test_shipped_tag_is_the_measured_search_result_and_loads_offline(tag):
    record = _record(tag)
    with open(SHIPPED[tag]['file'], 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == record['sha256'], 'the file is not the one that was measured'
    out = subprocess.run([sys.executable, '-c', _LOAD, tag], check=True, capture_output=True, text=True,
                         cwd=REPO_ROOT, env=subprocess_env(HF_HUB_OFFLINE='1'))
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    search = record['source'].rsplit('_seed', 1)[0]  # pmpl_a_seed0 -> the search pmpl_a
    with open(RESULTS / 'searches' / search / 'genotype.json') as f:
        searched = ','.join(json.load(f)['ops'])
    assert loaded['listed'] and loaded['genotype'] == searched == record['genotype']
    assert loaded['logits'] == [2, SHIPPED[tag]['cfg']['num_classes']]
    assert loaded['data_config'] == record['data_config']
