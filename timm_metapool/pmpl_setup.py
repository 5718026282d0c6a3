"""Where a PMPL search starts: its settings (paper Sec. 3.1), its two optimizers and its classifier.

`pmpl.PMPLSearch` builds on these; they are re-exported there (`from timm_metapool.pmpl import PMPLConfig`).
"""
import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from .search_space import MetaPoolingMixin

__all__ = ['PMPLConfig', 'InvalidSetting', 'build_optimizers', 'zero_init_classifier']


@dataclass
class PMPLConfig:
    """Defaults are the paper's (Sec. 3.1)."""
    lr: float = 0.05                 # zeta: SGD lr of the weights, also the virtual-step size
    momentum: float = 0.9
    weight_decay: float = 4e-5
    arch_lr: float = 3e-4            # eta: Adam lr of alpha
    arch_weight_decay: float = 1e-3
    rho: float = 0.2                 # Eq. 4 threshold
    # True: DARTS first-order, the alpha gradient at theta (no virtual step). False: the paper's Eq. 3, which it
    # calls first-order MAML, the alpha gradient at theta' = theta - zeta g.
    first_order: bool = False
    early_stop: bool = True          # False: never fix mid-search (for the ablation of progressive stopping)

    def __post_init__(self):
        # Checked here, not when the optimizers are built, so that a bad setting stops a run before any work.
        for name in ('lr', 'momentum', 'weight_decay', 'arch_lr', 'arch_weight_decay', 'rho'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidSetting(name, 'a finite number', repr(value))
        for name in ('first_order', 'early_stop'):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSetting(name, 'True or False', repr(getattr(self, name)))
        ranges = (
            ('lr', self.lr > 0, 'positive'),
            ('arch_lr', self.arch_lr > 0, 'positive'),
            ('momentum', 0.0 <= self.momentum < 1.0, 'in [0, 1)'),
            ('weight_decay', self.weight_decay >= 0, 'at least 0'),
            ('arch_weight_decay', self.arch_weight_decay >= 0, 'at least 0'),
            ('rho', 0.0 < self.rho <= 1.0, 'in (0, 1] (a margin between probabilities)'),
        )
        for name, in_range, rule in ranges:
            if not in_range:
                raise InvalidSetting(name, rule, getattr(self, name))


class InvalidSetting(ValueError):
    """A `PMPLConfig` field out of its range; `name`, `rule` and `value` let a CLI name its own flag."""

    def __init__(self, name: str, rule: str, value):
        super().__init__(f'{name} must be {rule}, got {value}.')
        self.name, self.rule, self.value = name, rule, value


def zero_init_classifier(model: nn.Module) -> None:
    """Start the classifier at zero, so that the search starts from uniform class probabilities (loss ln C).

    timm draws classifier weights from U(+-1/sqrt(num_classes)), scaled for ImageNet's 1000 classes; with a few
    classes and train-mode BatchNorm the first logits reach several units, the first meta gradients reflect a
    saturated softmax rather than the task, and Eq. 4 fixes slots on that noise in the first steps.
    """
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f'zero_init_classifier needs a Linear classifier, got {type(classifier).__name__} '
                        f'(num_classes=0 has none to start).')
    with torch.no_grad():
        classifier.weight.zero_()
        if classifier.bias is not None:
            classifier.bias.zero_()


def build_optimizers(model: MetaPoolingMixin, config: PMPLConfig) -> Tuple[torch.optim.SGD, torch.optim.Adam]:
    """SGD for the weights theta and Adam for alpha: two separate parameter groups (Sec. 3.1)."""
    weight_optimizer = torch.optim.SGD(
        model.weight_parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    # A group dict, because a finished search has no alpha left and optimizers refuse a bare empty list.
    arch_optimizer = torch.optim.Adam(
        [{'params': model.arch_parameters()}], lr=config.arch_lr, weight_decay=config.arch_weight_decay)
    return weight_optimizer, arch_optimizer
