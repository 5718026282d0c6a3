"""The paper's ablation (Table 3) on Fashion-MNIST, end to end with the shipped pipeline.

  apt-get install -y dataset-fashion-mnist
  python benchmarks/fashion_mnist_ablation.py --config full    # GPU

On the CPU, use benchmarks/fashion_mnist_table3.py (56 px with output_stride 16, converged, three seeds, a queue
that outlives a session; docs/results_fashion_mnist.md). The 28 px `cpu` configuration this script had is retired:
at 28 px most enhancer slots see 2x2 or 1x1 maps, where the pooling candidates coincide; its results stay in
benchmarks/results/fashion_mnist_cpu.

1. PMPL search with `train_hooks.search` on the training split (meta split carved from it), and the same search
   without progressive early stopping, for the search-cost comparison.
2. Retrain from scratch with one recipe and the same seeds: all-`skip` (MobileNetV2), all-`avg3` (Local), all-`global`
   (Global), `random:0` (Random), the searched genotype; timm's SE and CoordAttn in the same slots with --extras.
3. Top-1 on the 10k test split (mean +/- std over seeds), params, MACs, CPU batch-1 latency; a Markdown table and a
   bar plot with error bars in benchmarks/results/fashion_mnist_<config>/.
Finished runs are cached in --work-dir, so an interrupted run continues where it stopped.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
import timm
from timm.data import create_dataset, create_loader
from timm.layers.coord_attn import CoordAttn
from timm.layers.squeeze_excite import SqueezeExcite
from timm.scheduler import CosineLRScheduler

import timm_metapool  # noqa: F401
from timm_metapool.data import DatasetSplit, dataset_targets, stratified_split
from train_hooks import search as search_cli
from train_hooks.distributed import seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import count_macs, infer_step, time_interleaved  # noqa: E402
from table3.data import prepare_data  # noqa: E402  (Debian's Fashion-MNIST, unpacked for torchvision)

MEAN, STD = (0.2860,), (0.3530,)
PAPER_TOP1 = {'MobileNetV2 (all skip)': 72.3, 'Local (all avg3)': 71.6, 'Global (all global)': 74.3,
              'Random (random:0)': 73.4, 'PMPL (searched)': 74.6}

CONFIGS = {
    # GPU: width 1.0 at 32 px, the paper's search settings, the full 60k training split.
    'full': dict(model='mobilenetv2_metapool_100', img_size=32, batch=128, search_images=None, search_epochs=30,
                 search_lr=0.05, arch_lr=3e-4, retrain_images=None, retrain_epochs=60, lr=0.05, seeds=[0, 1, 2],
                 workers=8, threads=None),
}


def run_search(cfg: Dict, data_root: str, out: str, early_stop: bool, device: str) -> Dict:
    summary_path = os.path.join(out, 'genotype.json')
    if not os.path.exists(summary_path):
        argv = ['--dataset', 'torch/fashion_mnist', '--data-dir', data_root, '--model', cfg['model'],
                '--in-chans', '1', '--mean', *map(str, MEAN), '--std', *map(str, STD), '--img-size', str(cfg['img_size']),
                '--scale', '0.7', '1.0', '--color-jitter', '0', '-b', str(cfg['batch']), '--epochs',
                str(cfg['search_epochs']), '--lr', str(cfg['search_lr']), '--arch-lr', str(cfg['arch_lr']),
                '--smoothing', '0.1', '--workers', str(cfg['workers']), '--output', out, '--quiet']
        if cfg['search_images']:
            argv += ['--max-images', str(cfg['search_images'])]
        if not early_stop:
            argv.append('--no-early-stop')
        if os.path.exists(os.path.join(out, 'last.pth')):
            argv = ['--resume', os.path.join(out, 'last.pth')]
        search_cli.main(argv + ['--device', device])
    with open(summary_path) as f:
        return json.load(f)


def with_timm_attention(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """Put timm's SqueezeExcite or CoordAttn in every enhancer slot (the block's `meta_pool`), as the paper's
    baselines."""
    for block in model.enhancer_blocks():
        channels = block.conv_dw.out_channels
        block.meta_pool = SqueezeExcite(channels, rd_ratio=0.25) if layer == 'se' else CoordAttn(channels)
    return model


def build_model(cfg: Dict, spec: Dict) -> torch.nn.Module:
    model = timm.create_model(cfg['model'], genotype=spec.get('genotype', 'skip'), num_classes=10, in_chans=1)
    return with_timm_attention(model, spec['attention']) if spec.get('attention') else model


def loaders(cfg: Dict, data_root: str, seed: int):
    train = create_dataset('torch/fashion_mnist', root=data_root, split='train', is_training=True)
    test = create_dataset('torch/fashion_mnist', root=data_root, split='validation')
    if cfg['retrain_images']:
        # One fixed sample for every genotype and seed: the comparison differs only in the architecture.
        _, keep = stratified_split(dataset_targets(train), cfg['retrain_images'] / len(train), seed=1234)
        train = DatasetSplit(train, keep)
    size = (1, cfg['img_size'], cfg['img_size'])
    common = dict(input_size=size, batch_size=cfg['batch'], mean=MEAN, std=STD, num_workers=cfg['workers'],
                  use_prefetcher=False, persistent_workers=False)
    train_loader = create_loader(train, is_training=True, scale=(0.7, 1.0), color_jitter=0.0, hflip=0.5, **common)
    test_loader = create_loader(test, is_training=False, crop_pct=1.0, **common)
    return train_loader, test_loader


def retrain(cfg: Dict, spec: Dict, seed: int, data_root: str, device: torch.device) -> Dict:
    """The retrain recipe (paper Sec. 3.1 optimiser): SGD momentum 0.9, wd 4e-5, cosine, label smoothing 0.1,
    one warm-up epoch (timm's initial head gives large logits with 10 classes)."""
    seed_everything(seed)
    model = build_model(cfg, spec).to(device)
    train_loader, test_loader = loaders(cfg, data_root, seed)
    steps = len(train_loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg['lr'], momentum=0.9, weight_decay=4e-5)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg['retrain_epochs'] * steps, warmup_t=steps,
                                  warmup_lr_init=cfg['lr'] * 0.01, t_in_epochs=False)
    start = time.time()
    for epoch in range(cfg['retrain_epochs']):
        model.train()
        for step, (images, targets) in enumerate(train_loader):
            scheduler.step_update(epoch * steps + step)
            images, targets = images.to(device), targets.to(device)
            loss = F.cross_entropy(model(images), targets, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    train_time = time.time() - start
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, targets in test_loader:
            correct += int((model(images.to(device)).argmax(-1) == targets.to(device)).sum())
            total += len(targets)
    return dict(top1=100.0 * correct / total, train_time_s=train_time, final_loss=float(loss.detach()))


def size_and_latency(cfg: Dict, specs: Dict[str, Dict], rounds: int = 30) -> Dict[str, Dict]:
    """Params, MACs (`count_macs`) and CPU batch-1 latency, all models timed side by side."""
    x = torch.randn(1, 1, cfg['img_size'], cfg['img_size'])
    models, out = {}, {}
    for name, spec in specs.items():
        model = build_model(cfg, spec).eval()
        out[name] = dict(params=sum(p.numel() for p in model.parameters()), macs=count_macs(model, x))
        models[name] = model
    times = time_interleaved({n: infer_step(m, x) for n, m in models.items()}, rounds, torch.device('cpu'))
    for name in specs:
        out[name]['latency_ms'] = 1000 * statistics.median(times[name])
    return out


def write_report(cfg_name: str, cfg: Dict, results: Dict, searches: Dict, sizes: Dict, out_dir: str,
                 command: str) -> str:
    lines = [f'### Fashion-MNIST ablation (`{cfg_name}` config)', '',
             f"Model {cfg['model']} at {cfg['img_size']} px, 1 input channel. Retrain: "
             f"{cfg['retrain_images'] or 60000} training images, {cfg['retrain_epochs']} epochs, seeds "
             f"{cfg['seeds']}; top-1 on the 10,000-image test split. Command: `{command}`", '',
             '| enhancers | genotype | top-1 % (mean ± std) | per seed | params | MACs | CPU b1 latency (ms) | '
             'paper ImageNet top-1 |', '|---|---|---|---|---|---|---|---|']
    for name, runs in results.items():
        accs = [r['top1'] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        genotype = searches['genotypes'].get(name, '—')
        lines.append(
            f"| {name} | `{genotype}` | {statistics.mean(accs):.2f} ± {std:.2f} | "
            f"{', '.join(f'{a:.2f}' for a in accs)} | {sizes[name]['params'] / 1e6:.3f}M | "
            f"{sizes[name]['macs'] / 1e6:.2f}M | {sizes[name]['latency_ms']:.2f} | "
            f"{PAPER_TOP1.get(name, '—')} |")
    with_stop, without = searches['pmpl'], searches['no_early_stop']
    lines += ['', '| search | epochs run | all slots fixed at epoch | slots forced at the end | wall time (s) |',
              '|---|---|---|---|---|',
              f"| PMPL (progressive early stopping) | {with_stop['epochs_run']} | "
              f"{with_stop['all_fixed_at_epoch'] if with_stop['all_fixed_at_epoch'] is not None else 'not all'} | "
              f"{sum(with_stop['forced'])} | {with_stop['search_time_s']:.0f} |",
              f"| same search, no early stopping | {without['epochs_run']} | — | {sum(without['forced'])} | "
              f"{without['search_time_s']:.0f} |", '']
    text = '\n'.join(lines)
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write(text + '\n')
    return text


def plot(results: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(results)
    means = [statistics.mean(r['top1'] for r in results[n]) for n in names]
    stds = [statistics.stdev([r['top1'] for r in results[n]]) if len(results[n]) > 1 else 0 for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.bar(range(len(names)), means, yerr=stds, capsize=5, color='tab:blue', alpha=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(' (', '\n(') for n in names], fontsize=8)
    ax.set_ylabel('top-1 % on Fashion-MNIST test (mean ± std over seeds)')
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0, low - 2), min(100, max(m + s for m, s in zip(means, stds)) + 1))
    for i, (m, s) in enumerate(zip(means, stds)):
        ax.text(i, m + s + 0.1, f'{m:.2f}', ha='center', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checked_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    """--device, refused before any work unless it is the CPU or an available CUDA device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        parser.error(f"--device {name!r} is not a device this benchmark runs on; use 'cpu', 'cuda' or 'cuda:N'.")
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {name!r}: CUDA is not available on this machine; use --device cpu.')
    return device


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', choices=sorted(CONFIGS), default='full')
    parser.add_argument('--work-dir', default=None, help='default: runs/fashion_mnist_<config> (cached runs)')
    parser.add_argument('--extras', action='store_true', help="also timm's SE and CoordAttn in the same slots")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    device = checked_device(args.device, parser)
    cfg = CONFIGS[args.config]
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    work = args.work_dir or os.path.join('runs', f'fashion_mnist_{args.config}')
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', f'fashion_mnist_{args.config}')
    os.makedirs(work, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    data_root = prepare_data(os.path.join(work, 'data'))

    pmpl = run_search(cfg, data_root, os.path.join(work, 'search_pmpl'), early_stop=True, device=args.device)
    no_stop = run_search(cfg, data_root, os.path.join(work, 'search_no_early_stop'), early_stop=False,
                         device=args.device)

    searched = ','.join(pmpl['ops'])
    specs = {
        'MobileNetV2 (all skip)': dict(genotype='skip'),
        'Local (all avg3)': dict(genotype='avg3'),
        'Global (all global)': dict(genotype='global'),
        'Random (random:0)': dict(genotype='random:0'),
        'PMPL (searched)': dict(genotype=searched),
    }
    if args.extras:
        specs['timm SE in the slots'] = dict(attention='se')
        specs['timm CoordAttn in the slots'] = dict(attention='ca')
    num_slots = timm.create_model(cfg['model']).num_slots
    genotypes = {n: str(timm_metapool.Genotype.parse(s['genotype'], num_slots=num_slots))
                 for n, s in specs.items() if 'genotype' in s}

    results = {}
    for name, spec in specs.items():
        results[name] = []
        for seed in cfg['seeds']:
            cache = os.path.join(work, f"retrain_{name.split(' ')[0].lower()}_{len(results)}_s{seed}.json")
            if os.path.exists(cache):
                with open(cache) as f:
                    result = json.load(f)
            else:
                result = retrain(cfg, spec, seed, data_root, device)
                with open(cache, 'w') as f:
                    json.dump(result, f)
            print(f"{name} seed {seed}: top-1 {result['top1']:.2f} ({result['train_time_s']:.0f}s)", flush=True)
            results[name].append(result)

    sizes = size_and_latency(cfg, specs)
    command = f"python benchmarks/fashion_mnist_ablation.py --config {args.config}" + (' --extras' if args.extras else '')
    searches = dict(pmpl=pmpl, no_early_stop=no_stop, genotypes=genotypes)
    # Copied with the report, not before the retrains: a run that stops midway leaves the committed results whole.
    shutil.copy(os.path.join(work, 'search_pmpl', 'genotype.json'), os.path.join(out_dir, 'genotype.json'))
    if os.path.exists(os.path.join(work, 'search_pmpl', 'search.png')):
        shutil.copy(os.path.join(work, 'search_pmpl', 'search.png'), os.path.join(out_dir, 'search.png'))
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(dict(config=cfg, results=results, sizes=sizes, searches=searches, command=command), f, indent=2)
    print(write_report(args.config, cfg, results, searches, sizes, out_dir, command))
    plot(results, os.path.join(out_dir, 'accuracy.png'))


if __name__ == '__main__':
    main()
