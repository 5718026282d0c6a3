"""Measuring helpers shared by the benchmarks: side-by-side timing (interleaved rounds, median of per-round
ratios), train and inference steps, the plain-definition forward and a MAC count."""
import copy
import time
from statistics import median
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each fn: one warm-up each, then `rounds` rounds calling every fn once, rotating order."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    """Median over rounds of time[num] / time[den] (both measured in the same round)."""
    return median(a / b for a, b in zip(times[num], times[den]))


def train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return step


def infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            model(x)
    return step


def use_plain_forward(model: nn.Module) -> nn.Module:
    """Route every module that has a `forward_plain` through it: the literal Eq. 1 sum of MetaPooling, PyTorch's own
    pooling for fixed `maxK` / `avgK` slots, Sec. 2.1 without the GEMM fast paths for the Global Context Enhancer.
    This is the straightforward implementation the fast paths are measured against."""
    for m in model.modules():
        if hasattr(m, 'forward_plain'):
            m.forward = m.forward_plain
    return model


def count_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs of one forward (torch's flop counter: convs and matmuls only, FLOPs / 2), counted on a copy of `model`
    that runs every module's plain definition: the fast paths' GEMMs with constant 0/1 matrices (means, broadcasts)
    and box-kernel convs (average pooling) are not model arithmetic."""
    plain = use_plain_forward(copy.deepcopy(model).eval())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        plain(x)
    return counter.get_total_flops() / 2
