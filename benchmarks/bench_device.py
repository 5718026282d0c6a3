"""Speed ratios on one device, measured side by side in one run: the supernet, the all-`global` model and the plain
Eq. 1 sum against timm's own MobileNetV2 (fwd+bwd), and batch-1 inference; all timed in interleaved rounds, each
ratio the median of the per-round ratios. For a GPU (`--device cuda`); on the CPU `bench_speed.py` measures more.

    python benchmarks/bench_device.py --device cuda
"""
import argparse
from statistics import median
from typing import Dict

import torch
import timm

import timm_metapool  # noqa: F401  (registers the models)

from measure import infer_step, median_ratio, time_interleaved, train_step, use_plain_forward


def main() -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--model', default='mobilenetv2_metapool_100')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    base_name = args.model.replace('_metapool', '')
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x1 = x[:1].clone()
    models = {
        'baseline (timm)': timm.create_model(base_name),
        'supernet (fused)': timm.create_model(args.model),
        'supernet (plain Eq. 1 sum)': use_plain_forward(timm.create_model(args.model)),
        'all-global': timm.create_model(args.model, genotype='global'),
    }
    print(f'{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}), '
          f'{args.img_size} px, batch {args.batch_size}, {args.rounds} interleaved rounds (x5 at batch 1)')
    for model in models.values():
        model.to(device).train()
    times = time_interleaved({f'fwd+bwd {n}': train_step(m, x) for n, m in models.items()}, args.rounds, device)
    inference = {n: models[n].eval() for n in ('baseline (timm)', 'all-global')}
    times.update(time_interleaved({f'batch-1 inference {n}': infer_step(m, x1) for n, m in inference.items()},
                                  args.rounds * 5, device))
    results = {name: median(seconds) for name, seconds in times.items()}
    for name, seconds in results.items():
        reference = 'batch-1 inference baseline (timm)' if name.startswith('batch-1') else 'fwd+bwd baseline (timm)'
        print(f'{name:45s} {seconds * 1e3:9.2f} ms  {median_ratio(times, name, reference):5.2f}x baseline')
    return results


if __name__ == '__main__':
    main()
