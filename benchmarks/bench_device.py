"""Speed ratios on one device, measured side by side in one run: the supernet, the all-`global` model and the plain
Eq. 1 sum against timm's own MobileNetV2 (fwd+bwd), and batch-1 inference. For a GPU (`--device cuda`); on the CPU
`bench_speed.py` measures more.

    python benchmarks/bench_device.py --device cuda
"""
import argparse
import time
from typing import Callable, Dict

import torch
import timm

import timm_metapool  # noqa: F401
from timm_metapool import MetaPooling


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], device: torch.device, rounds: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
    return step


def plain_sum(model: torch.nn.Module) -> torch.nn.Module:
    """The supernet with every mixed op running its literal Eq. 1 sum (`MetaPooling.forward_plain`)."""
    for module in model.modules():
        if isinstance(module, MetaPooling):
            module.forward = module.forward_plain
    return model


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
        'supernet (plain Eq. 1 sum)': plain_sum(timm.create_model(args.model)),
        'all-global': timm.create_model(args.model, genotype='global'),
    }
    results = {}
    print(f'{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}), '
          f'{args.img_size} px, batch {args.batch_size}, median of {args.rounds} rounds')
    for name, model in models.items():
        model.to(device).train()
        results[f'fwd+bwd {name}'] = median_time(train_step(model, x), device, args.rounds)
    for name in ('baseline (timm)', 'all-global'):
        model = models[name].eval()
        with torch.no_grad():
            results[f'batch-1 inference {name}'] = median_time(lambda: model(x1), device, args.rounds * 5)
    base_train, base_infer = results['fwd+bwd baseline (timm)'], results['batch-1 inference baseline (timm)']
    for name, seconds in results.items():
        reference = base_infer if name.startswith('batch-1') else base_train
        print(f'{name:45s} {seconds * 1e3:9.2f} ms  {seconds / reference:5.2f}x baseline')
    return results


if __name__ == '__main__':
    main()
