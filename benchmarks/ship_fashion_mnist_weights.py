"""Ship a Table 3 retrain as the package's pretrained tag `mobilenetv2_metapool_035.pmpl_fashion_mnist`.

    python benchmarks/ship_fashion_mnist_weights.py                  # PMPL (search A), seed 0: chosen before any test
                                                                     # number of a PMPL retrain existed
    python benchmarks/ship_fashion_mnist_weights.py --check-only     # re-measure the shipped tag on the test split

Takes the weights that the Table 3 runner exported with the package's own `export_for_hub` when that retrain
finished (benchmarks/results/fashion_mnist_56px/weights/, committed with the run: genotype and checksum in the
safetensors metadata), copies them into `timm_metapool/weights/` and registers the tag in its `manifest.json`
with the create_model kwargs the weights need (1 channel, 10 classes, `output_stride=16`) and the pretrained cfg of
the recipe's test transform. Then, in a fresh process with no network, it loads the tag with
`timm.create_model(TAG, pretrained=True)`, builds the transform with timm's `resolve_data_config({}, model=m)` +
`create_transform`, runs it on the raw test images from Debian's package and checks that top-1 equals the
retrain's last-epoch test top-1. The outcome is written to benchmarks/results/fashion_mnist_56px/shipped_weights.json.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table3 import plan, results, retrain  # noqa: E402
from timm_metapool.pretrained import (  # noqa: E402
    SHIPPED_WEIGHTS_DIR, WEIGHTS_MANIFEST, read_safetensors_genotype)

ARCH = plan.RECIPE.model
TAG = f'{ARCH}.pmpl_fashion_mnist'
FILE = f'{ARCH}_pmpl_fashion_mnist.safetensors'
SHIPPED_ARM, SHIPPED_SEED = plan.SHIPPED_RUN
RECORD = os.path.join(plan.RESULTS_DIR, 'shipped_weights.json')
LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
MODEL_ARGS = dict(in_chans=1, num_classes=10, output_stride=plan.RECIPE.output_stride)
CFG = dict(input_size=[1, plan.RECIPE.img_size, plan.RECIPE.img_size], mean=list(plan.MEAN),
           std=list(plan.STD), crop_pct=1.0, interpolation='bilinear', num_classes=10, label_names=list(LABELS),
           license='apache-2.0', description='Fashion-MNIST, PMPL search A retrained (docs/results_fashion_mnist.md)')

# Run in a fresh process, so that the package reads the manifest as a user's install would, with no network.
_MEASURE = r'''
import gzip, json, sys
import numpy as np, torch, timm, timm_metapool
from PIL import Image
from timm.data import resolve_data_config, create_transform
tag, images_gz, labels_gz = sys.argv[1:4]
assert tag in timm.list_pretrained(tag.split('.')[0] + '*'), timm.list_pretrained()
model = timm.create_model(tag, pretrained=True).eval()
config = resolve_data_config({}, model=model)
transform = create_transform(**config)
with gzip.open(images_gz) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
with gzip.open(labels_gz) as f:
    labels = torch.from_numpy(np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64))
correct = 0
with torch.no_grad():
    for start in range(0, len(images), 500):
        batch = torch.stack([transform(Image.fromarray(a, mode='L')) for a in images[start:start + 500]])
        correct += int((model(batch).argmax(-1) == labels[start:start + 500]).sum())
print(json.dumps(dict(top1=100.0 * correct / len(images), images=len(images), genotype=model.genotype.to_string(),
                      data_config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})))
'''


def finished_retrain(arm: str, seed: int) -> Dict:
    """The runner's result of a retrain finished with the current recipe and the weights it exported into the
    results (`table3.retrain.export_shipped_run`), or a SystemExit that says what is missing."""
    task = plan.Task('retrain', arm, seed)
    if not results.is_finished(task):
        raise SystemExit(f'error: {task.run_id} has no result made with the current recipe; let the Table 3 runner '
                         f'finish it first (python benchmarks/fashion_mnist_table3.py --status).')
    with open(results.result_path(task)) as f:
        result = json.load(f)
    weights = retrain.shipped_run_weights()
    if not os.path.isfile(weights):
        raise SystemExit(f'error: {weights} not found: the runner exports it when {task.run_id} finishes; rerun '
                         f'that entry (python benchmarks/fashion_mnist_table3.py --only {task.run_id}).')
    exported = read_safetensors_genotype(weights)
    if exported != result['genotype']:
        raise SystemExit(f'error: {weights} holds genotype {exported}, but {task.run_id} trained '
                         f'{result["genotype"]}; rerun the entry.')
    return dict(result=result, weights=weights)


def register(finished: Dict, weights_dir: str) -> str:
    """Copy the exported weights into `weights_dir` and register TAG in its manifest."""
    os.makedirs(weights_dir, exist_ok=True)
    shutil.copyfile(finished['weights'], os.path.join(weights_dir, FILE + '.tmp'))
    os.replace(os.path.join(weights_dir, FILE + '.tmp'), os.path.join(weights_dir, FILE))
    manifest_path = os.path.join(weights_dir, WEIGHTS_MANIFEST)
    manifest = {'tags': {}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest['tags'][TAG] = dict(file=FILE, model_args=MODEL_ARGS, cfg=CFG)
    results.write_json(manifest, manifest_path)
    return os.path.join(weights_dir, FILE)


def measure_shipped(weights_dir: str) -> Dict:
    """Top-1 of TAG on the raw test images through timm's own data config and transform, in a fresh process."""
    env = dict(os.environ, TIMM_METAPOOL_WEIGHTS_DIR=weights_dir, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-c', _MEASURE, TAG,
                          os.path.join(plan.DEBIAN_DIR, 't10k-images-idx3-ubyte.gz'),
                          os.path.join(plan.DEBIAN_DIR, 't10k-labels-idx1-ubyte.gz')],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sha256(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--weights-dir', default=SHIPPED_WEIGHTS_DIR, help='where the tag is registered')
    parser.add_argument('--check-only', action='store_true', help='only re-measure the tag already shipped')
    args = parser.parse_args()
    task = plan.Task('retrain', SHIPPED_ARM, SHIPPED_SEED)
    with open(results.result_path(task)) as f:
        runner_top1 = json.load(f)['top1']
    if not args.check_only:
        print(f'registered {register(finished_retrain(SHIPPED_ARM, SHIPPED_SEED), args.weights_dir)}')
    measured = measure_shipped(args.weights_dir)
    record = dict(tag=TAG, file=FILE, sha256=sha256(os.path.join(args.weights_dir, FILE)), source=task.run_id,
                  runner_test_top1=runner_top1, shipped_test_top1=measured['top1'], genotype=measured['genotype'],
                  data_config=measured['data_config'], test_images=measured['images'],
                  command='python benchmarks/ship_fashion_mnist_weights.py')
    print(json.dumps(record, indent=1))
    if args.weights_dir == SHIPPED_WEIGHTS_DIR:
        results.write_json(record, RECORD)
    if abs(measured['top1'] - runner_top1) > 0.05:  # 5 of 10,000 images: a channels-last rounding flip, no more
        raise SystemExit(f'error: the shipped tag gives {measured["top1"]:.2f} % but the retrain ended at '
                         f'{runner_top1:.2f} %; the export or the pretrained cfg does not match the recipe.')


if __name__ == '__main__':
    main()
