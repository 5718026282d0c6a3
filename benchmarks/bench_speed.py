"""Speed, memory and size of Meta-Pooling against timm's MobileNetV2, as ratios measured side by side in one run.

Every ratio compares variants timed in the same run, interleaved round by round (so a burst of load from other
processes hits all of them), and is the median over rounds of the per-round ratio. Timings are fwd+bwd of
`out.sum()` in train mode unless the row says inference (eval, no_grad, batch 1). With CUDA present the same table
gets GPU columns (cuda synchronize around each timed call, peak memory from torch.cuda.max_memory_allocated).

    python benchmarks/bench_speed.py            # full run
    python benchmarks/bench_speed.py --quick    # 2 rounds instead of 5, no plain-Eq. 1 supernet rows
    python benchmarks/bench_speed.py --compile  # plus target 3 with both networks under torch.compile
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from statistics import median
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import timm
from timm.layers.coord_attn import CoordAttn
from timm.utils.model import reparameterize_model

import timm_metapool  # noqa: F401  (registers the models)
from timm_metapool.mixed_op import MetaPooling
from timm_metapool.kernels import directional_means
from timm_metapool.ops import GlobalContextEnhancer
from timm_metapool.pmpl import PMPLConfig, PMPLSearch

from measure import count_macs, infer_step, median_ratio, time_interleaved, train_step, use_plain_forward

BASELINE = 'mobilenetv2_100'
METAPOOL = 'mobilenetv2_metapool_100'
MIXED_OP_SHAPES = [(16, 96, 112, 112), (128, 96, 16, 16)]
TRAIN_SETTINGS = [(224, 16), (32, 128)]  # (resolution, batch)
FIXED_LOCAL_GENOTYPES = ['avg3', 'avg7', 'max3', 'max7']


class Row:
    """One table line: what is compared, the measured value per device, the target and whether it is met."""

    def __init__(self, name: str, target: str = '', check: Optional[Callable[[float], bool]] = None,
                 fmt: str = '{:.2f}x'):
        self.name, self.target, self.check, self.fmt = name, target, check, fmt
        self.values: Dict[str, float] = {}

    def cell(self, device: str) -> str:
        if device not in self.values:
            return '-'
        value = self.values[device]
        text = self.fmt.format(value)
        if self.check is not None:
            text += ' met' if self.check(value) else ' MISSED'
        return text


def create(name: str, device: torch.device, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).to(device)


def coord_attn_model(device: torch.device) -> nn.Module:
    """MobileNetV2 with timm's CoordAttn in the enhancer slots (the Global Context Enhancer's structure)."""
    model = create(METAPOOL, device, genotype='global')
    for block in model.enhancer_blocks():
        block.meta_pool = CoordAttn(block.conv_pwl.in_channels).to(device)
    return model


class EnhancerPart(nn.Module):
    """Runs only the first part of a Global Context Enhancer (`means`, or `gates`: the means and the gate network)
    and returns its input unchanged, so that the model's time shows what that part costs where the enhancer sits
    (in the model each part costs more than it does in a loop over one slot, where its caches stay warm)."""

    def __init__(self, enhancer: GlobalContextEnhancer, part: str):
        super().__init__()
        self.enhancer, self.part = enhancer, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part == 'means':
            directional_means(x)
        else:
            self.enhancer.gates(x)
        return x


def enhancer_part_model(part: str, device: torch.device) -> nn.Module:
    """The all-global model with every enhancer reduced to `part` (see `EnhancerPart`)."""
    model = create(METAPOOL, device, genotype='global')
    for block in model.enhancer_blocks():
        block.meta_pool = EnhancerPart(block.meta_pool, part)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def distinct_input(shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Distinct values in every (n, c) plane: a unique maximum in every pooling window, so gradients are unique."""
    n, c, h, w = shape
    ranks = torch.rand(n, c, h * w, device=device).argsort(dim=-1).float()
    return (ranks / (h * w) - 0.5).view(shape)


def bench_mixed_op(rows: Dict[str, Row], dev: str, device: torch.device, rounds: int) -> None:
    """Target 1: fused vs plain MetaPooling fwd+bwd (input and alpha gradients), plus their agreement."""
    for shape in MIXED_OP_SHAPES:
        torch.manual_seed(0)
        mp = MetaPooling(shape[1]).to(device)
        with torch.no_grad():
            mp.arch_alpha.normal_()
        x = distinct_input(shape, device).requires_grad_(True)
        results = {}

        def run(forward, key=None):
            def step():
                x.grad, mp.arch_alpha.grad = None, None
                out = forward(x)
                out.sum().backward()
                if key is not None:
                    results[key] = (out.detach(), x.grad, mp.arch_alpha.grad)
            return step

        run(mp.forward_plain, 'plain')()
        run(mp.forward, 'fused')()
        err = max(rel_err(f, p) for f, p in zip(results['fused'], results['plain']))
        times = time_interleaved({'plain': run(mp.forward_plain), 'fused': run(mp.forward)}, rounds, device)
        key = 'x'.join(map(str, shape))
        rows[f'mix_{key}'].values[dev] = median_ratio(times, 'plain', 'fused')
        rows[f'mix_err_{key}'].values[dev] = err
        del results, x


def bench_models(rows: Dict[str, Row], dev: str, device: torch.device, rounds: int, quick: bool) -> None:
    """Targets 2 and 3: supernet and all-global model fwd+bwd against the baseline."""
    for res, batch in TRAIN_SETTINGS:
        x = torch.randn(batch, 3, res, res, device=device)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        frozen = create(METAPOOL, device)
        for alpha in frozen.arch_parameters():
            alpha.requires_grad_(False)
        fns = {
            'base': train_step(create(BASELINE, device), x),
            'supernet': train_step(create(METAPOOL, device), x),
            'supernet_frozen': train_step(frozen, x),
            'global': train_step(create(METAPOOL, device, genotype='global'), x),
            # all in channels-last (timm train.py --channels-last), where the baseline is faster too
            'base_cl': train_step(create(BASELINE, device).to(memory_format=torch.channels_last), x_cl),
            'supernet_cl': train_step(create(METAPOOL, device).to(memory_format=torch.channels_last), x_cl),
            'global_cl': train_step(
                create(METAPOOL, device, genotype='global').to(memory_format=torch.channels_last), x_cl),
        }
        if not quick:
            fns['supernet_plain'] = train_step(use_plain_forward(create(METAPOOL, device)), x)
        times = time_interleaved(fns, rounds, device)
        rows[f'super_{res}'].values[dev] = median_ratio(times, 'supernet', 'base')
        rows[f'super_frozen_{res}'].values[dev] = median_ratio(times, 'supernet_frozen', 'base')
        rows[f'super_cl_{res}'].values[dev] = median_ratio(times, 'supernet_cl', 'base_cl')
        rows[f'global_{res}'].values[dev] = median_ratio(times, 'global', 'base')
        rows[f'global_cl_{res}'].values[dev] = median_ratio(times, 'global_cl', 'base_cl')
        rows[f'base_cl_{res}'].values[dev] = median_ratio(times, 'base', 'base_cl')
        if 'supernet_plain' in times:
            rows[f'super_plain_{res}'].values[dev] = median_ratio(times, 'supernet_plain', 'base')
        del fns


def bench_fixed_local(rows: Dict[str, Row], dev: str, device: torch.device, rounds: int) -> None:
    """Fixed pooling slots (a searched genotype's `maxK` / `avgK`) fwd+bwd at 32 px b128 against the baseline, as
    the package runs them and as PyTorch's pooling modules (`forward_plain`)."""
    x = torch.randn(128, 3, 32, 32, device=device)
    fns = {'base': train_step(create(BASELINE, device), x)}
    for genotype in FIXED_LOCAL_GENOTYPES:
        fns[genotype] = train_step(create(METAPOOL, device, genotype=genotype), x)
        fns[genotype + '_plain'] = train_step(use_plain_forward(create(METAPOOL, device, genotype=genotype)), x)
    times = time_interleaved(fns, rounds, device)
    for genotype in FIXED_LOCAL_GENOTYPES:
        rows[f'fixed_{genotype}'].values[dev] = median_ratio(times, genotype, 'base')
        rows[f'fixed_plain_{genotype}'].values[dev] = median_ratio(times, genotype + '_plain', 'base')


def bench_inference(rows: Dict[str, Row], dev: str, device: torch.device, rounds: int) -> None:
    """Targets 3 (batch-1 latency of the all-global model, as trained and with its BN folded by timm's
    `reparameterize_model`) and 4 (deploy rewrite of an all-avg3 model)."""
    x = torch.randn(1, 3, 224, 224, device=device)
    avg3 = create(METAPOOL, device, genotype='avg3').eval()
    deployed = reparameterize_model(avg3)
    with torch.no_grad():
        err = rel_err(deployed(x), avg3(x))
    fns = {
        'base': infer_step(create(BASELINE, device).eval(), x),
        'global': infer_step(create(METAPOOL, device, genotype='global').eval(), x),
        'global_deployed': infer_step(reparameterize_model(create(METAPOOL, device, genotype='global').eval()), x),
        'coordattn': infer_step(coord_attn_model(device).eval(), x),
        'global_means': infer_step(enhancer_part_model('means', device).eval(), x),
        'global_gates': infer_step(enhancer_part_model('gates', device).eval(), x),
        'avg3': infer_step(avg3, x),
        'avg3_deployed': infer_step(deployed, x),
    }
    times = time_interleaved(fns, rounds * 10, device)  # batch 1 is quick and noisier: more rounds
    rows['infer_global'].values[dev] = median_ratio(times, 'global', 'base')
    rows['infer_global_deployed'].values[dev] = median_ratio(times, 'global_deployed', 'base')
    rows['infer_vs_ca'].values[dev] = median_ratio(times, 'global', 'coordattn')
    rows['infer_means'].values[dev] = median_ratio(times, 'global_means', 'base')
    rows['infer_gates'].values[dev] = median_ratio(times, 'global_gates', 'base')
    rows['deploy_before'].values[dev] = median(times['avg3']) * 1e3
    rows['deploy_after'].values[dev] = median(times['avg3_deployed']) * 1e3
    rows['deploy_ratio'].values[dev] = median_ratio(times, 'avg3', 'avg3_deployed')
    rows['deploy_err'].values[dev] = err


def bench_compiled(rows: Dict[str, Row], dev: str, device: torch.device, rounds: int) -> None:
    """Target 3 with both networks under `torch.compile` (inductor; on CPU it needs a C++ compiler). The enhancer
    then hands the compiler its plain definitions, whose means and gate product it fuses into few kernels."""
    for res, batch in TRAIN_SETTINGS:
        x = torch.randn(batch, 3, res, res, device=device)
        times = time_interleaved({  # the warm-up call of each compiles it
            'base': train_step(torch.compile(create(BASELINE, device)), x),
            'global': train_step(torch.compile(create(METAPOOL, device, genotype='global')), x),
        }, rounds, device)
        rows[f'global_compiled_{res}'].values[dev] = median_ratio(times, 'global', 'base')
    x = torch.randn(1, 3, 224, 224, device=device)
    times = time_interleaved({
        'base': infer_step(torch.compile(create(BASELINE, device).eval()), x),
        'global': infer_step(torch.compile(create(METAPOOL, device, genotype='global').eval()), x),
    }, rounds * 10, device)
    rows['infer_global_compiled'].values[dev] = median_ratio(times, 'global', 'base')


def bench_search_iteration(rows: Dict[str, Row], dev: str, device: torch.device, rounds: int) -> None:
    """Target 5: a PMPL iteration once every slot is fixed vs the fixed model's two-pass iteration (32 px, 128)."""
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 1000, (128,), device=device)
    searched = create(METAPOOL, device)
    genotype = searched.fix_to_genotype('global')  # as Eq. 4 would, slot by slot through fix_slot
    search = PMPLSearch(searched, PMPLConfig())
    fixed = create(METAPOOL, device, genotype=genotype)
    fixed_search = PMPLSearch(fixed, PMPLConfig())
    optimizer = torch.optim.SGD(fixed.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def two_pass():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(fixed(x), y).backward()
        loss_fn(fixed(x), y).backward()
        optimizer.step()

    times = time_interleaved({
        'search': lambda: search.step((x, y), (x, y)),
        'fixed_two_pass': two_pass,
        'fixed_search': lambda: fixed_search.step((x, y), (x, y)),
    }, rounds, device)
    rows['search_vs_two_pass'].values[dev] = median_ratio(times, 'search', 'fixed_two_pass')
    rows['search_vs_fixed_step'].values[dev] = median_ratio(times, 'search', 'fixed_search')


def peak_memory_child(variant: str, res: int, batch: int, device_name: str) -> float:
    """Peak extra memory (MiB) of one supernet fwd+bwd, measured in a fresh process (CPU: RSS high-water mark)."""
    device = torch.device(device_name)
    model = create(METAPOOL, device)
    if variant == 'plain':
        use_plain_forward(model)
    x = torch.randn(batch, 3, res, res, device=device)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, x)()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    before = _proc_status_mib('VmRSS')
    train_step(model, x)()
    return _proc_status_mib('VmHWM') - before  # high-water mark of this process's own address space


def _proc_status_mib(field: str) -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 2 ** 10  # reported in kB
    raise RuntimeError(f'{field} not in /proc/self/status')


def bench_peak_memory(rows: Dict[str, Row], dev: str, device: torch.device) -> None:
    """Target 6: peak memory of supernet fwd+bwd, fused against plain, each in its own process."""
    for res, batch in TRAIN_SETTINGS:
        peaks = {}
        for variant in ('fused', 'plain'):
            out = subprocess.run(
                [sys.executable, __file__, '--peak-memory-child', variant, str(res), str(batch), str(device)],
                check=True, capture_output=True, text=True)
            peaks[variant] = float(out.stdout.strip().splitlines()[-1])
        rows[f'mem_fused_{res}'].values[dev] = peaks['fused']
        rows[f'mem_plain_{res}'].values[dev] = peaks['plain']


def size_rows(rows: Dict[str, Row]) -> None:
    """Params and MACs at 224 px."""
    x = torch.randn(1, 3, 224, 224)
    for key, model in (('base', create(BASELINE, torch.device('cpu'))),
                       ('global', create(METAPOOL, torch.device('cpu'), genotype='global'))):
        rows[f'params_{key}'].values['cpu'] = sum(p.numel() for p in model.parameters()) / 1e6
        rows[f'macs_{key}'].values['cpu'] = count_macs(model, x) / 1e6


def build_rows() -> Dict[str, Row]:
    at_least = lambda t: (lambda v: v >= t)  # noqa: E731
    at_most = lambda t: (lambda v: v <= t)  # noqa: E731
    rows = {}
    for shape in MIXED_OP_SHAPES:
        key = 'x'.join(map(str, shape))
        rows[f'mix_{key}'] = Row(f'1. mixed op fwd+bwd {tuple(shape)}: plain / fused', '>= 2.5x', at_least(2.5))
        rows[f'mix_err_{key}'] = Row(f'1. mixed op {tuple(shape)}: max rel. error (out, dx, dalpha)', '<= 1e-5',
                                     at_most(1e-5), '{:.1e}')
    for res, batch in TRAIN_SETTINGS:
        rows[f'super_{res}'] = Row(f'2. supernet fwd+bwd {res}px b{batch} / baseline',
                                   '<= 2.5x' if res == 224 else '<= 2.0x', at_most(2.5 if res == 224 else 2.0))
        rows[f'super_plain_{res}'] = Row(f'   (supernet with plain Eq. 1 sum {res}px b{batch} / baseline)')
        rows[f'super_frozen_{res}'] = Row(f'   (supernet, alpha frozen as in PMPL weight pass, {res}px / baseline)')
        rows[f'super_cl_{res}'] = Row(f'   (supernet / baseline, both channels-last, {res}px)')
    rows['global_32'] = Row('3. all-global fwd+bwd 32px b128 / baseline', '<= 1.3x', at_most(1.3))
    rows['global_224'] = Row('3. all-global fwd+bwd 224px b16 / baseline', '<= 1.15x', at_most(1.15))
    for res, batch in TRAIN_SETTINGS:
        rows[f'global_cl_{res}'] = Row(f'   (all-global / baseline, both channels-last, {res}px)')
    for res, batch in TRAIN_SETTINGS:
        rows[f'base_cl_{res}'] = Row(f'   (baseline NCHW / baseline channels-last, fwd+bwd {res}px b{batch})')
    rows['infer_global'] = Row('3. all-global inference 224px b1 / baseline', '<= 1.15x', at_most(1.15))
    rows['infer_global_deployed'] = Row('3. all-global inference 224px b1 / baseline, after reparameterize_model',
                                        '<= 1.15x', at_most(1.15))
    rows['infer_vs_ca'] = Row('3. all-global inference 224px b1 / timm CoordAttn', '<= 1.0x', at_most(1.0))
    rows['infer_means'] = Row('   (all-global inference b1, enhancers cut to their means / baseline)')
    rows['infer_gates'] = Row('   (same, enhancers cut to means and gate network / baseline)')
    rows['global_compiled_32'] = Row('3. all-global fwd+bwd 32px b128 / baseline, both torch.compile', '<= 1.3x',
                                     at_most(1.3))
    rows['global_compiled_224'] = Row('3. all-global fwd+bwd 224px b16 / baseline, both torch.compile', '<= 1.15x',
                                      at_most(1.15))
    rows['infer_global_compiled'] = Row('3. all-global inference 224px b1 / baseline, both torch.compile',
                                        '<= 1.15x', at_most(1.15))
    for genotype in FIXED_LOCAL_GENOTYPES:
        rows[f'fixed_{genotype}'] = Row(f'   (all-{genotype} fixed model fwd+bwd 32px b128 / baseline)')
        rows[f'fixed_plain_{genotype}'] = Row('   (same, slots as PyTorch pooling modules / baseline)')
    rows['deploy_before'] = Row('4. all-avg3 inference 224px b1, as trained (ms)', fmt='{:.1f}')
    rows['deploy_after'] = Row('4. all-avg3 inference 224px b1, reparameterized (ms)', fmt='{:.1f}')
    rows['deploy_ratio'] = Row('4. all-avg3 before / after reparameterize_model', '> 1x', at_least(1.0))
    rows['deploy_err'] = Row('4. all-avg3 reparameterized: max rel. output error', '<= 1e-5', at_most(1e-5),
                             '{:.1e}')
    rows['search_vs_two_pass'] = Row('5. PMPL step, all slots fixed / fixed model two-pass iteration',
                                     '<= 1.05x', at_most(1.05))
    rows['search_vs_fixed_step'] = Row('5. PMPL step, all slots fixed / PMPL step on genotype-built model')
    for res, batch in TRAIN_SETTINGS:
        rows[f'mem_plain_{res}'] = Row(f'6. supernet fwd+bwd {res}px b{batch} peak memory, plain (MiB)', fmt='{:.0f}')
        rows[f'mem_fused_{res}'] = Row(f'6. supernet fwd+bwd {res}px b{batch} peak memory, fused (MiB)', fmt='{:.0f}')
    rows['params_base'] = Row('params, timm mobilenetv2_100 (M) [paper: 3.50]', fmt='{:.3f}')
    rows['macs_base'] = Row('MACs 224px, timm mobilenetv2_100 (M) [paper: 300]', fmt='{:.0f}')
    rows['params_global'] = Row('params, all-global Meta-Pooling (M) [paper: 3.91]', fmt='{:.3f}')
    rows['macs_global'] = Row('MACs 224px, all-global Meta-Pooling (M) [paper: 320]', fmt='{:.0f}')
    return rows


def print_table(rows: Dict[str, Row], devices: List[str]) -> None:
    header = ['measure', 'target'] + devices
    lines = [[r.name, r.target] + [r.cell(d) for d in devices] for r in rows.values() if r.values]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = '| ' + ' | '.join(f'{{:{w}}}' for w in widths) + ' |'
    print(fmt.format(*header))
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for line in lines:
        print(fmt.format(*line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='2 rounds, skip the plain-sum supernet rows')
    parser.add_argument('--rounds', type=int, default=None, help='timed rounds per comparison (default 5, quick 2)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--compile', action='store_true',
                        help='add the target-3 rows with both networks under torch.compile (minutes of compiling)')
    parser.add_argument('--peak-memory-child', nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_child:
        variant, res, batch, device = args.peak_memory_child
        print(peak_memory_child(variant, int(res), int(batch), device))
        return

    rounds = args.rounds or (2 if args.quick else 5)
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    rows = build_rows()
    print(f'# torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, {torch.get_num_threads()} torch threads'
          + (f', {torch.cuda.get_device_name()}' if 'cuda' in devices else '')
          + f'; {rounds} rounds, median of per-round ratios', flush=True)
    size_rows(rows)
    for dev in devices:
        device = torch.device(dev)
        for stage in (lambda: bench_mixed_op(rows, dev, device, rounds),
                      lambda: bench_models(rows, dev, device, rounds, args.quick),
                      lambda: bench_fixed_local(rows, dev, device, rounds),
                      lambda: bench_inference(rows, dev, device, rounds),
                      lambda: bench_compiled(rows, dev, device, rounds) if args.compile else None,
                      lambda: bench_search_iteration(rows, dev, device, rounds),
                      lambda: bench_peak_memory(rows, dev, device)):
            start = time.perf_counter()
            stage()
            print(f'# {dev}: stage done in {time.perf_counter() - start:.0f}s', file=sys.stderr, flush=True)
    print_table(rows, devices)
    print(json.dumps({k: r.values for k, r in rows.items() if r.values}))


if __name__ == '__main__':
    main()
