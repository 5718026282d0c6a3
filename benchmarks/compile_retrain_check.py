"""Is a Table 3 retrain step through `torch.compile` the same computation as the eager one, and how much faster?

    python benchmarks/compile_retrain_check.py --arms skip random global coordattn

For each arm of `fashion_mnist_table3.py` (its model, channels-last, train mode, batch 128 at 56 px, one thread):
1. the output and parameter gradients of one step, eager fp32 and compiled fp32, each against the same step in fp64
   (the reference): a compiled step that is no further from fp64 than the eager one computes the same thing;
2. the median time of a full SGD step (fwd+bwd+update), eager and compiled steps interleaved round by round, and
   their ratio. Compilation itself (a few minutes per arm on one core, cached afterwards) is reported apart.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table3 import models, plan, results  # noqa: E402


def step_fn(model: torch.nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()
    return step


def errors_against_fp64(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Max |output - fp64 output| and ||grad - fp64 grad|| / ||fp64 grad|| of one train-mode step, eager and
    compiled."""
    def run(module: torch.nn.Module, forward: Callable, inputs: torch.Tensor):
        out = forward(inputs)
        F.cross_entropy(out, y).backward()
        return out.detach().double(), torch.cat([p.grad.double().flatten() for p in module.parameters()])
    reference, eager, compiled = copy.deepcopy(model).double(), copy.deepcopy(model), copy.deepcopy(model)
    out64, grad64 = run(reference, reference, x.double())
    result = {}
    variants = (('eager', eager, eager), ('compiled', compiled, torch.compile(compiled, dynamic=False)))
    for name, module, forward in variants:
        out, grad = run(module, forward, x)
        result[f'{name}_out_err'] = (out - out64).abs().max().item()
        result[f'{name}_grad_rel_err'] = ((grad - grad64).norm() / grad64.norm()).item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arms', nargs='+', default=['skip', 'global'], choices=list(plan.ARMS))
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--seed', type=int, default=1,
                        help='genotype seed for the random arm; PMPL arms need their search')
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = plan.RECIPE
    print(f'torch {torch.__version__}, one thread, batch {recipe.batch_size}, {recipe.img_size} px, channels-last',
          flush=True)
    for arm_name in args.arms:
        arm = plan.ARMS[arm_name]
        torch.manual_seed(0)
        model = models.build_model(results.resolve_genotype(arm, args.seed), arm.attention)
        model = model.to(memory_format=torch.channels_last).train()
        x = torch.randn(recipe.batch_size, 1, recipe.img_size, recipe.img_size).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (recipe.batch_size,))
        errors = errors_against_fp64(model, x[:32], y[:32])
        eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
        steps = dict(eager=step_fn(eager_model, eager_model, x, y),
                     compiled=step_fn(compiled_model, torch.compile(compiled_model, dynamic=False), x, y))
        start = time.time()
        steps['compiled']()
        compile_s = time.time() - start
        times: Dict[str, list] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.time()
                step()
                times[name].append(time.time() - start)
        eager_s, compiled_s = statistics.median(times['eager']), statistics.median(times['compiled'])
        print(f"{arm_name:10s} | vs fp64: out err eager {errors['eager_out_err']:.2e} compiled "
              f"{errors['compiled_out_err']:.2e}, grad rel err eager {errors['eager_grad_rel_err']:.2e} compiled "
              f"{errors['compiled_grad_rel_err']:.2e} | step eager {eager_s:.3f} s, compiled {compiled_s:.3f} s, "
              f"eager/compiled {eager_s / compiled_s:.2f}x | first compiled step {compile_s:.0f} s | "
              f"load avg {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == '__main__':
    main()
