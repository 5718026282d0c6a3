"""Result files: where each queue entry's lives, whether it was made with the current recipe, what a retrain waits
for, and the finished runs read back."""
import dataclasses
import json
import os
import platform
import time
from typing import Dict, Optional

import torch
import timm

import timm_metapool

from .models import num_slots
from .plan import ARMS, GATE_SKIP_TOP1, RECIPE, RESULTS_DIR, SEARCHES, SEEDS, Arm, Task, search_recipe


def search_genotype_path(name: str) -> str:
    return os.path.join(RESULTS_DIR, 'searches', name, 'genotype.json')


def environment(load_start: float) -> Dict:
    return dict(host_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                timm=timm.__version__, python=platform.python_version(), load_avg_1m_start=load_start,
                load_avg_1m_end=os.getloadavg()[0], finished_at=time.strftime('%Y-%m-%d %H:%M:%S'))


def write_json(obj: Dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def result_path(task: Task) -> str:
    if task.kind == 'retrain':
        return os.path.join(RESULTS_DIR, 'runs', f'{task.run_id}.json')
    return search_genotype_path(task.name)


def is_finished(task: Task) -> bool:
    """A result file made with the current recipe (and search settings) exists; one from another recipe is rerun."""
    path = result_path(task)
    if not os.path.exists(path):
        return False
    if task.kind == 'search':
        path = os.path.join(os.path.dirname(path), 'result.json')
        if not os.path.exists(path):
            return False
    with open(path) as f:
        result = json.load(f)
    if task.kind == 'search':
        return result['config'] == dataclasses.asdict(SEARCHES[task.name]) and result['recipe'] == search_recipe()
    return result['recipe'] == json.loads(json.dumps(dataclasses.asdict(RECIPE)))


def resolve_genotype(arm: Arm, seed: int) -> Optional[str]:
    """The arm's full genotype string for `seed`, or None when its search has not finished."""
    spec = arm.genotype.format(seed=seed)
    if spec.startswith('search:'):
        name = spec.split(':', 1)[1]
        if not is_finished(Task('search', name)):
            return None
        path = search_genotype_path(name)
        with open(path) as f:
            spec = ','.join(json.load(f)['ops'])
    return timm_metapool.Genotype.parse(spec, num_slots=num_slots()).to_string()


def recipe_validated() -> Optional[bool]:
    """Whether all-`skip` seed 0 passed the gate with the current recipe (None: not finished yet)."""
    baseline = Task('retrain', 'skip', 0)
    if not is_finished(baseline):
        return None
    with open(result_path(baseline)) as f:
        return json.load(f)['top1'] >= GATE_SKIP_TOP1


def waits_for(task: Task) -> Optional[str]:
    """Why `task` cannot run yet, or None. Retrains other than all-`skip` seed 0 wait until that run shows the recipe
    passes the gate; a PMPL retrain also waits for its search."""
    if task.kind != 'retrain' or task == Task('retrain', 'skip', 0):
        return None
    validated = recipe_validated()
    if validated is None:
        return 'waiting for all-skip seed 0 (the recipe gate)'
    if not validated:
        return f'held: all-skip seed 0 ended below the gate of {GATE_SKIP_TOP1} %; fix the recipe'
    if resolve_genotype(ARMS[task.name], task.seed) is None:
        return 'waiting for its search'
    return None


def load_runs() -> Dict[str, Dict[int, Dict]]:
    """Finished retrains (made with the current recipe) by arm and seed."""
    runs: Dict[str, Dict[int, Dict]] = {name: {} for name in ARMS}
    for seed in SEEDS:
        for name in ARMS:
            task = Task('retrain', name, seed)
            if is_finished(task):
                with open(result_path(task)) as f:
                    runs[name][seed] = json.load(f)
    return runs


def load_searches() -> Dict[str, Dict]:
    out = {}
    for name in SEARCHES:
        path = os.path.join(RESULTS_DIR, 'searches', name, 'result.json')
        if is_finished(Task('search', name)):
            with open(path) as f:
                out[name] = dict(json.load(f), genotype_path=search_genotype_path(name))
    return out


def trained_genotype(runs: Dict[str, Dict[int, Dict]], name: str, seed: int) -> Optional[str]:
    """The genotype a finished run trained (recorded in its result file), else the one it will train."""
    if seed in runs[name]:
        return runs[name][seed]['genotype']
    return resolve_genotype(ARMS[name], seed)
