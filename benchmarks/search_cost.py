"""Search cost with and without progressive early stopping (Algorithm 1), measured the same way.

    OMP_NUM_THREADS=1 python benchmarks/search_cost.py      # about 80 minutes on one core

Runs Table 3's search A (`table3.plan.SEARCHES['pmpl_a']`) and the same search with `--no-early-stop`
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
from table3 import data, plan, report, results, search  # noqa: E402
from train_hooks import search as search_cli  # noqa: E402

RESULT_PATH = os.path.join(plan.RESULTS_DIR, 'search_cost.json')
NAMES = ('pmpl_a', 'pmpl_a_no_early_stop')


def measure(name: str, data_root: str, work_dir: str) -> Dict:
    config = plan.SEARCHES[name]
    out = os.path.join(work_dir, 'search_cost', name)
    shutil.rmtree(out, ignore_errors=True)
    argv = search.search_argv(config, data_root, out)
    load_start, start = os.getloadavg()[0], time.time()
    search_cli.main(argv + ['--overwrite'])
    wall = time.time() - start
    with open(os.path.join(out, 'genotype.json')) as f:
        summary = json.load(f)
    steps = summary['steps_run']
    return dict(
        name=name, early_stop=config.early_stop, command='python -m train_hooks.search ' + ' '.join(argv),
        genotype=','.join(summary['ops']), forced=summary['forced'], epochs_run=summary['epochs_run'],
        steps=steps, image_passes_fwd_bwd=search.search_image_passes(steps), wall_s=round(wall, 1),
        search_time_s=summary['search_time_s'], s_per_step=round(summary['search_time_s'] / steps, 4),
        environment=results.environment(load_start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default=os.path.join(plan.REPO_DIR, 'runs', 'fashion_mnist_56px'))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_root = data.prepare_data(os.path.join(args.work_dir, 'data'))
    rows = {}
    if os.path.exists(RESULT_PATH):
        with open(RESULT_PATH) as f:
            rows = json.load(f)
    for name in NAMES:
        if name in rows:
            continue
        rows[name] = measure(name, data_root, args.work_dir)
        results.write_json(rows, RESULT_PATH)
        print(json.dumps(rows[name], indent=1), flush=True)
    with open(results.search_genotype_path('pmpl_a')) as f:
        queue_genotype = ','.join(json.load(f)['ops'])
    print(f"same genotype as the queue's search A: {rows['pmpl_a']['genotype'] == queue_genotype}")
    print('\n'.join(report.search_cost_rows()))


if __name__ == '__main__':
    main()
