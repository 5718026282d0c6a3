"""Search cost with and without progressive early stopping (Algorithm 1), measured the same way.

    OMP_NUM_THREADS=1 python benchmarks/search_cost.py      # about 80 minutes on one core

Runs Table 3's search A (`fashion_mnist_table3.SEARCHES['pmpl_a']`) and the same search with `--no-early-stop`
one after the other in this process, one torch thread each, with the same data and settings, and records for each
its wall time, steps, image passes (one fwd+bwd of a training batch and one of a meta batch per step), seconds per
step and the machine's load average. Both are run here, back to back, rather than taken from the queue, whose two
searches ran at different times under different loads. Each finished search writes its row into
`benchmarks/results/fashion_mnist_56px/search_cost.json` at once, and a finished row is not run again. The genotype
of the early-stopped run is compared with the queue's search A (same seed): the search is deterministic on one CPU
thread, so they should match.
"""
import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist_table3 as table3  # noqa: E402
from train_hooks import search as search_cli  # noqa: E402

RESULT_PATH = os.path.join(table3.RESULTS_DIR, 'search_cost.json')
NAMES = ('pmpl_a', 'pmpl_a_no_early_stop')


def measure(name: str, data_root: str, work_dir: str) -> Dict:
    config = table3.SEARCHES[name]
    out = os.path.join(work_dir, 'search_cost', name)
    shutil.rmtree(out, ignore_errors=True)
    argv = table3.search_argv(config, data_root, out)
    load_start, start = os.getloadavg()[0], time.time()
    search_cli.main(argv + ['--overwrite'])
    wall = time.time() - start
    with open(os.path.join(out, 'genotype.json')) as f:
        summary = json.load(f)
    steps = summary['steps_run']
    return dict(
        name=name, early_stop=config.early_stop, command='python -m train_hooks.search ' + ' '.join(argv),
        genotype=','.join(summary['ops']), forced=summary['forced'], epochs_run=summary['epochs_run'],
        steps=steps, image_passes_fwd_bwd=table3.search_image_passes(steps), wall_s=round(wall, 1),
        search_time_s=summary['search_time_s'], s_per_step=round(summary['search_time_s'] / steps, 4),
        environment=table3.environment(load_start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default=os.path.join(table3.REPO_DIR, 'runs', 'fashion_mnist_56px'))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_root = table3.prepare_data(os.path.join(args.work_dir, 'data'))
    results = {}
    if os.path.exists(RESULT_PATH):
        with open(RESULT_PATH) as f:
            results = json.load(f)
    for name in NAMES:
        if name in results:
            continue
        results[name] = measure(name, data_root, args.work_dir)
        table3.write_json(results, RESULT_PATH)
        print(json.dumps(results[name], indent=1), flush=True)
    with open(table3.search_genotype_path('pmpl_a')) as f:
        queue_genotype = ','.join(json.load(f)['ops'])
    print(f"same genotype as the queue's search A: {results['pmpl_a']['genotype'] == queue_genotype}")
    print('\n'.join(table3.search_cost_rows()))


if __name__ == '__main__':
    main()
