"""One search of the queue: the package's search CLI in this process, its small outputs copied into the results."""
import dataclasses
import json
import os
import shutil
import time
from typing import Dict, List

from train_hooks import search as search_cli

from .plan import MEAN, RECIPE, RESULTS_DIR, SEARCHES, STD, SearchConfig, Task, search_recipe
from .results import environment, write_json


def search_argv(config: SearchConfig, data_root: str, out: str) -> List[str]:
    argv = ['--dataset', 'torch/fashion_mnist', '--data-dir', data_root, '--model', RECIPE.model, '--in-chans', '1',
            '--mean', *map(str, MEAN), '--std', *map(str, STD), '--img-size', str(RECIPE.img_size),
            '--output-stride', str(RECIPE.output_stride), '--scale', *map(str, RECIPE.scale), '--color-jitter', '0',
            '-b', str(RECIPE.batch_size),
            '--epochs', str(config.epochs), '--lr', str(config.lr), '--arch-lr', str(config.arch_lr),
            '--arch-weight-decay', str(config.arch_weight_decay),
            '--rho', str(config.rho), '--meta-fraction', str(config.meta_fraction), '--smoothing',
            str(RECIPE.smoothing), '--seed', str(config.seed), '--workers', str(RECIPE.workers), '--output', out,
            '--head-init', config.head_init, '--quiet', '--device', 'cpu']
    return argv + ([] if config.early_stop else ['--no-early-stop'])


def search_image_passes(steps: int) -> int:
    """Images through fwd+bwd in `steps` search steps: Algorithm 1 passes a train batch and a meta batch per step."""
    return steps * RECIPE.batch_size * 2


def discard_stale_search(out: str, config: SearchConfig) -> None:
    """Remove a search output dir made with other settings, so it is neither resumed nor reused."""
    stamp = out + '.config.json'
    wanted = dict(search=dataclasses.asdict(config), recipe=search_recipe())
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == json.loads(json.dumps(wanted)):
                return
    if os.path.isdir(out):
        shutil.rmtree(out)
    write_json(wanted, stamp)


def run_search(task: Task, data_root: str, work_dir: str) -> Dict:
    """`train_hooks.search` in this process (resumed from its last.pth when one is there); its genotype.json,
    search.png and search_log.csv are copied into the results, with a result.json on cost."""
    config = SEARCHES[task.name]
    out = os.path.join(work_dir, 'searches', task.name)
    argv = search_argv(config, data_root, out)
    resume = os.path.join(out, 'last.pth')
    discard_stale_search(out, config)
    load_start, start = os.getloadavg()[0], time.time()
    if os.path.exists(os.path.join(out, 'genotype.json')):
        pass
    elif os.path.exists(resume):
        search_cli.main(['--resume', resume])
    else:
        search_cli.main(argv + ['--overwrite'])
    with open(os.path.join(out, 'genotype.json')) as f:
        summary = json.load(f)
    data = summary['data']
    steps = summary['steps_run']
    return dict(
        kind='search', name=task.name, config=dataclasses.asdict(config), recipe=search_recipe(),
        command='python -m train_hooks.search ' + ' '.join(argv), genotype=','.join(summary['ops']),
        epochs_run=summary['epochs_run'],
        steps_run=steps, steps_per_epoch=data['train_images'] // RECIPE.batch_size,  # the last partial batch is dropped
        train_images=data['train_images'], meta_images=data['meta_images'],
        image_passes=dict(fwd_bwd=search_image_passes(steps)), search_time_s=summary['search_time_s'],
        wall_time_this_process_s=round(time.time() - start, 1), all_fixed_at_epoch=summary['all_fixed_at_epoch'],
        fixed_epoch=[e for e in summary['fixed_epoch']], forced=summary['forced'],
        environment=environment(load_start), work_dir=out,
    )


def publish_search(task: Task, result: Dict) -> List[str]:
    """Copy the search's small outputs into the results; returns the paths written."""
    dst = os.path.join(RESULTS_DIR, 'searches', task.name)
    os.makedirs(dst, exist_ok=True)
    write_json(result, os.path.join(dst, 'result.json'))
    written = [os.path.join(dst, 'result.json')]
    for name in ('search.png', 'search_log.csv', 'genotype.json'):  # genotype.json last: it marks the search done
        src = os.path.join(result['work_dir'], name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(dst, name + '.tmp'))  # another runner may be reading it
            os.replace(os.path.join(dst, name + '.tmp'), os.path.join(dst, name))
            written.append(os.path.join(dst, name))
    return written
