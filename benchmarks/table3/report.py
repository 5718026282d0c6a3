"""The generated part of docs/results_fashion_mnist.md and the bar plot, rebuilt from the result files."""
import json
import os
import statistics
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from measure import count_macs, infer_step, time_interleaved

from .models import build_model, slot_map_sizes
from .plan import (ARMS, DOC_BEGIN, DOC_END, DOC_PATH, GATE_SKIP_TOP1, ISSUE_TARGET_TOP1, RECIPE,
                   RESULTS_DIR, SEARCHES, SEEDS, build_queue)
from .results import is_finished, load_runs, load_searches, trained_genotype


def slot_fix_epochs(summary: Dict) -> List[Optional[float]]:
    """Per slot, the fractional epoch (step / steps per epoch) at which Eq. 4 fixed it, or None when it was forced to
    its argmax at the end; from the search's genotype.json, whose fix events are listed by slot."""
    with open(summary['genotype_path']) as f:
        genotype = json.load(f)
    slots = genotype.get('slots', list(range(len(genotype['fixed_step']))))
    out: List[Optional[float]] = [None] * genotype['num_slots']
    for slot, step, forced in zip(slots, genotype['fixed_step'], genotype['forced']):
        out[slot] = None if forced else step / summary['steps_per_epoch']
    return out


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return 'pending'
    std = statistics.stdev(values) if len(values) > 1 else float('nan')
    return f'{statistics.mean(values):.2f} ± {std:.2f}' if len(values) > 1 else f'{values[0]:.2f} (1 seed)'


def size_and_latency(runs: Dict[str, Dict[int, Dict]], rounds: int = 30) -> Dict[str, Dict]:
    """Params, MACs and CPU batch-1 latency (ms, median, all models timed interleaved) of every arm whose genotype is
    known; Random is measured with seed 0's genotype."""
    x = torch.randn(1, 1, RECIPE.img_size, RECIPE.img_size)
    models = {name: build_model(genotype, arm.attention).eval() for name, arm in ARMS.items()
              if (genotype := trained_genotype(runs, name, 0)) is not None}
    times = time_interleaved({n: infer_step(m, x) for n, m in models.items()}, rounds, torch.device('cpu'))
    return {name: dict(params=sum(p.numel() for p in model.parameters()), macs=count_macs(model, x),
                       latency_ms=1000 * statistics.median(times[name])) for name, model in models.items()}


def table_rows(runs: Dict[str, Dict[int, Dict]], sizes: Dict[str, Dict]) -> List[str]:
    lines = ['| enhancers | top-1 % (mean ± std) | per seed (0, 1, 2) | Δ to all-skip, paired by seed (mean; per seed) '
             '| params | MACs | CPU b1 latency (ms) | paper ImageNet top-1 |', '|---|---|---|---|---|---|---|---|']
    skip = runs['skip']
    for name, arm in ARMS.items():
        accs = [runs[name][s]['top1'] for s in SEEDS if s in runs[name]]
        per_seed = ', '.join(f"{runs[name][s]['top1']:.2f}" if s in runs[name] else 'pending' for s in SEEDS)
        diffs = [runs[name][s]['top1'] - skip[s]['top1'] for s in SEEDS if s in runs[name] and s in skip]
        delta = '—' if name == 'skip' else (
            f"{statistics.mean(diffs):+.2f}; " + ', '.join(f'{d:+.2f}' for d in diffs) if diffs else 'pending')
        size = sizes.get(name, {})
        size_cells = ' | '.join(fmt.format(size[key]) if key in size else 'pending' for key, fmt in
                                (('params', '{:,}'), ('macs', '{:,.0f}'), ('latency_ms', '{:.2f}')))
        lines.append(f"| {arm.label} | {mean_std(accs)} | {per_seed} | {delta} | {size_cells} | "
                     f"{arm.paper_top1 if arm.paper_top1 is not None else '—'} |")
    return lines


def epoch_ranges(epochs: Iterable[int]) -> str:
    """`1, 2, 3, 7` -> `1-3, 7`."""
    spans: List[List[int]] = []
    for e in epochs:
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    return ', '.join(f'{a}-{b}' if b > a else str(a) for a, b in spans)


def execution_note(runs: Dict[str, Dict[int, Dict]]) -> str:
    """Which finished runs trained eagerly (before the runner used torch.compile) and which through torch.compile."""
    eager, mixed, compiled = [], [], []
    for name in ARMS:
        for seed, run in sorted(runs[name].items()):
            flags = [bool(row.get('compiled')) for row in run['epochs']]  # rows before the flag existed: eager
            label = f'{name} seed {seed}'
            if not any(flags):
                eager.append(label)
            elif all(flags):
                compiled.append(label)
            else:
                mixed.append(f'{label} (compiled epochs {epoch_ranges(e for e, c in enumerate(flags, 1) if c)})')
    parts = [f'{title}: {", ".join(labels)}' for title, labels in
             (('eager', eager), ('partly compiled', mixed), ('torch.compile', compiled))
             if labels]
    return ('Execution (the same fp32 computation either way; see "Eager and compiled retrains" under Set-up): '
            + '; '.join(parts) + '.') if parts else ''


def genotype_rows(runs: Dict[str, Dict[int, Dict]]) -> List[str]:
    lines = ['| arm | seed | genotype (slot 0 ... 15) |', '|---|---|---|']
    for name in ('pmpl_a', 'pmpl_b', 'random'):
        for seed in SEEDS if name == 'random' else (0,):
            genotype = trained_genotype(runs, name, seed)
            lines.append(f"| {ARMS[name].label} | {seed if name == 'random' else 'all'} | "
                         f"{'`' + genotype + '`' if genotype else 'pending'} |")
    a, b = trained_genotype(runs, 'pmpl_a', 0), trained_genotype(runs, 'pmpl_b', 0)
    if a and b:
        shared = [i for i, (x, y) in enumerate(zip(a.split(','), b.split(','))) if x == y]
        lines += ['', f'Searches A and B agree on {len(shared)} of 16 slots ({", ".join(map(str, shared)) or "none"}).']
    return lines


def search_rows(searches: Dict[str, Dict]) -> List[str]:
    lines = ['| search | seed | early stopping | epochs run | steps | slots fixed by Eq. 4 / forced | all fixed at '
             'epoch | image passes (fwd+bwd) | wall time (s) | load avg (start → end) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for name, config in SEARCHES.items():
        s = searches.get(name)
        if s is None:
            lines.append(f'| {name} | {config.seed} | {config.early_stop} | pending |  |  |  |  |  |  |')
            continue
        forced = sum(s['forced'])
        env = s['environment']
        fixed_at = s['all_fixed_at_epoch']
        lines.append(f"| {name} | {config.seed} | {config.early_stop} | {s['epochs_run']} | {s['steps_run']} | "
                     f"{len(s['forced']) - forced} / {forced} | {f'{fixed_at:.2f}' if fixed_at else '—'} | "
                     f"{s['image_passes']['fwd_bwd']:,} | {s['search_time_s']:.0f} | "
                     f"{env['load_avg_1m_start']:.1f} → {env['load_avg_1m_end']:.1f} |")
    lines += ['', 'Epoch (fractional, steps / steps per epoch) at which Eq. 4 fixed each slot; `forced` = argmax at '
              'the end:', '', '| search | ' + ' | '.join(f's{i}' for i in range(16)) + ' |',
              '|---|' + '---|' * 16]
    for name, s in searches.items():
        if SEARCHES[name].early_stop:
            cells = ['forced' if e is None else f'{e:.2f}' for e in slot_fix_epochs(s)]
            lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def search_cost_rows() -> List[str]:
    """The two searches of `benchmarks/search_cost.py`, run back to back in one process (empty until it has run)."""
    path = os.path.join(RESULTS_DIR, 'search_cost.json')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        cost = json.load(f)
    lines = ['Measured the same way (`benchmarks/search_cost.py`: the two searches back to back in one process, one '
             'thread, the other core running one retrain throughout; '
             '[search_cost.json](../benchmarks/results/fashion_mnist_56px/search_cost.json)):', '',
             '| search | early stopping | steps | slots fixed by Eq. 4 | image passes (fwd+bwd) | wall time (s) | '
             's per step | load avg (start → end) |', '|---|---|---|---|---|---|---|---|']
    for name in ('pmpl_a', 'pmpl_a_no_early_stop'):
        if name not in cost:
            lines.append(f'| {name} | {SEARCHES[name].early_stop} | pending |  |  |  |  |  |')
            continue
        c, env = cost[name], cost[name]['environment']
        lines.append(f"| {name} | {c['early_stop']} | {c['steps']} | {len(c['forced']) - sum(c['forced'])} / "
                     f"{len(c['forced'])} | {c['image_passes_fwd_bwd']:,} | {c['wall_s']:.0f} | "
                     f"{c['s_per_step']:.3f} | {env['load_avg_1m_start']:.1f} → {env['load_avg_1m_end']:.1f} |")
    if len(cost) == 2:
        a, b = cost['pmpl_a'], cost['pmpl_a_no_early_stop']
        passes = b['image_passes_fwd_bwd'] / a['image_passes_fwd_bwd']
        lines += ['', f"Without early stopping the search costs {passes:.2f}x the image passes and "
                  f"{b['wall_s'] / a['wall_s']:.2f}x the wall time; a step costs "
                  f"{b['s_per_step'] / a['s_per_step']:.2f}x as much on average, since a fixed slot runs one "
                  f"candidate instead of eight and no longer updates its alpha."]
    return lines + ['']


def curve_rows(runs: Dict[str, Dict[int, Dict]]) -> List[str]:
    """Test top-1 per epoch, seed 0 of each arm (the convergence check)."""
    epochs = RECIPE.epochs
    lines = ['| arm (seed 0) | ' + ' | '.join(str(e) for e in range(1, epochs + 1)) + ' |', '|---|' + '---|' * epochs]
    for name, arm in ARMS.items():
        if 0 in runs[name]:
            curve = [f"{row['test_top1']:.1f}" for row in runs[name][0]['epochs']]
            lines.append(f'| {arm.label} | ' + ' | '.join(curve) + ' |')
    return lines


def plot(runs: Dict[str, Dict[int, Dict]], path: str) -> bool:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [n for n in ARMS if runs[n]]
    if not names:
        return False
    accs = [[r['top1'] for r in runs[n].values()] for n in names]
    means = [statistics.mean(a) for a in accs]
    stds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4.2))
    ax.bar(range(len(names)), means, yerr=stds, capsize=5, color='tab:blue', alpha=0.8)
    for i, a in enumerate(accs):
        ax.plot([i] * len(a), a, 'k.', markersize=4)
        ax.text(i, means[i] + stds[i] + 0.05, f'{means[i]:.2f}\n(n={len(a)})', ha='center', fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([ARMS[n].label.replace(' (', '\n(').replace(' in the', '\nin the') for n in names], fontsize=7)
    ax.set_ylabel('top-1 % on the test split (mean ± std)')
    ax.set_title(f'Fashion-MNIST, {RECIPE.model} at {RECIPE.img_size} px, {RECIPE.epochs} epochs', fontsize=9)
    ax.set_ylim(max(0.0, min(m - s for m, s in zip(means, stds)) - 1.0),
                min(100.0, max(m + s for m, s in zip(means, stds)) + 0.6))
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=110)
    plt.close(fig)
    os.replace(path + '.tmp.png', path)
    return True


def generated_report(with_latency: bool = True) -> str:
    runs, searches = load_runs(), load_searches()
    sizes = size_and_latency(runs) if with_latency else {}
    queue = build_queue()
    done = sum(is_finished(t) for t in queue)
    skip_accs = [r['top1'] for r in runs['skip'].values()]
    target = ('pending' if not skip_accs else
              f"{'met' if min(skip_accs) >= ISSUE_TARGET_TOP1 else 'NOT met'} (all-skip per seed: "
              f"{', '.join(f'{a:.2f}' for a in skip_accs)}; the gate that holds retrains is {GATE_SKIP_TOP1} %)")
    plotted = plot(runs, os.path.join(RESULTS_DIR, 'accuracy.png'))
    slot_maps = ', '.join(f'{h}x{w}' for h, w in slot_map_sizes(build_model(None, None)))
    lines = [DOC_BEGIN, '', f'Rebuilt from the result files on {time.strftime("%Y-%m-%d %H:%M")}: **{done} of '
             f'{len(queue)} queue entries finished**; `pending` marks runs not finished yet. Issue 21\'s target '
             f'(all-skip >= {ISSUE_TARGET_TOP1:.0f} % on the test split): {target}. Map each slot sees at '
             f'{RECIPE.img_size} px (supernet): {slot_maps}.',
             '',
             '### Top-1 on the 10,000-image test split', ''] + table_rows(runs, sizes)
    note = execution_note(runs)
    lines += ['', note] if note else []
    lines += ['', 'Params, MACs and latency: batch 1, 1 x 56 x 56, one thread, all models timed interleaved in the '
              'same process (median of 30 rounds; the machine is shared, so compare the column, not the absolute '
              'values); Random is measured with `random:0`.', '']
    if plotted:
        lines += ['![Fashion-MNIST top-1 per arm](../benchmarks/results/fashion_mnist_56px/accuracy.png)', '']
    lines += ['### Genotypes', ''] + genotype_rows(runs)
    lines += ['', '### Searches', ''] + search_rows(searches) + [''] + search_cost_rows()
    for name in searches:
        lines.append(f'![{name}](../benchmarks/results/fashion_mnist_56px/searches/{name}/search.png)')
    lines += ['', '### Test top-1 per epoch (seed 0)', ''] + curve_rows(runs) + ['', DOC_END]
    return '\n'.join(lines)


def write_report(with_latency: bool = True) -> str:
    """Replace the generated part of the doc (between its markers), keeping what is written around it."""
    generated = generated_report(with_latency)
    if os.path.exists(DOC_PATH):
        with open(DOC_PATH) as f:
            text = f.read()
        if DOC_BEGIN in text and DOC_END in text:
            head, rest = text.split(DOC_BEGIN, 1)
            text = head + generated + rest.split(DOC_END, 1)[1]
        else:
            text = text.rstrip('\n') + '\n\n' + generated + '\n'
    else:
        os.makedirs(os.path.dirname(DOC_PATH), exist_ok=True)
        text = '# Table 3 on Fashion-MNIST (56 px)\n\n' + generated + '\n'
    with open(DOC_PATH + '.tmp', 'w') as f:  # two runners may rebuild it at once
        f.write(text)
    os.replace(DOC_PATH + '.tmp', DOC_PATH)
    return DOC_PATH
