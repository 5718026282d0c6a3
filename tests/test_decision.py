"""Whether a search can reach Eq. 4 (alpha's step against its margin) and the verdict on a finished search."""
import math

import pytest
import torch

from timm_metapool.decision import (
    AUTO_ARCH_LR_CEILING, AUTO_ARCH_LR_HEADROOM, PAPER_ARCH_LR, auto_arch_lr, budget_shortfall, eq4_logit_gap,
    is_near_chance, is_near_uniform, reachable_logit_gap, search_verdict)
from timm_metapool.pmpl import FixEvent, confident_argmax


def adam_on_a_consistent_gradient(arch_lr: float, steps: int, n: int = 8, k: int = 3) -> torch.Tensor:
    """softmax(alpha) after `steps` Adam steps (PMPL's optimizer and weight decay) whose every gradient favours k."""
    alpha = torch.nn.Parameter(torch.zeros(n))
    optimizer = torch.optim.Adam([alpha], lr=arch_lr, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        (-torch.log_softmax(alpha, 0)[k]).backward()
        optimizer.step()
    return torch.softmax(alpha.detach(), 0)


@pytest.mark.parametrize('n,rho', [(8, 0.2), (8, 0.05), (3, 0.5)])
def test_eq4_logit_gap_is_where_eq4_starts_to_hold(n, rho):
    gap = eq4_logit_gap(n, rho)
    for d, holds in ((gap * 1.001, True), (gap * 0.999, False)):
        pi = torch.softmax(torch.tensor([d] + [0.0] * (n - 1), dtype=torch.float64), 0)
        assert (confident_argmax(pi, rho) == 0) is holds
    assert eq4_logit_gap(8, 0.2) == pytest.approx(math.log(3))
    assert eq4_logit_gap(8, 1.0) == math.inf


def test_adam_cannot_pass_the_reachable_gap_and_auto_reaches_eq4():
    steps, gap = 90, eq4_logit_gap(8, 0.2)
    short_lr = 0.9 * gap / (2 * steps)  # reachable_logit_gap 10% short of the margin
    assert reachable_logit_gap(short_lr, steps) < gap
    assert confident_argmax(adam_on_a_consistent_gradient(short_lr, steps), 0.2) is None  # even with no noise at all
    assert confident_argmax(adam_on_a_consistent_gradient(PAPER_ARCH_LR, steps), 0.2) is None
    auto = auto_arch_lr(steps, 8, 0.2)
    assert auto > PAPER_ARCH_LR and reachable_logit_gap(auto, steps) >= 10 * gap
    assert confident_argmax(adam_on_a_consistent_gradient(auto, steps // 4), 0.2) == 3  # a quarter of the budget


def test_auto_reaches_headroom_times_the_gap_up_to_its_ceiling():
    gap = eq4_logit_gap(8, 0.2)
    for steps in (1000, 5000, 100_000):  # long enough to stay under the ceiling
        auto = auto_arch_lr(steps, 8, 0.2)
        assert auto < AUTO_ARCH_LR_CEILING
        assert reachable_logit_gap(auto, steps) == pytest.approx(AUTO_ARCH_LR_HEADROOM * gap)
    for steps in (4, 9, 90, 400):  # too short: the ceiling, which still opens Eq. 4's gap with every step agreeing
        assert auto_arch_lr(steps, 8, 0.2) == AUTO_ARCH_LR_CEILING
        assert confident_argmax(adam_on_a_consistent_gradient(AUTO_ARCH_LR_CEILING, steps), 0.2) == 3


def test_auto_keeps_the_papers_value_for_long_runs():
    assert auto_arch_lr(30 * 10_009, 8, 0.2) == PAPER_ARCH_LR  # ImageNet's 30 epochs at batch 128
    assert auto_arch_lr(1000, 8, 0.2) > auto_arch_lr(2000, 8, 0.2) > PAPER_ARCH_LR  # scales with 1 / steps


def test_budget_shortfall_names_what_to_raise_and_its_values_suffice():
    message = budget_shortfall(PAPER_ARCH_LR, 90, 8, 0.2, epochs=15)
    assert message is not None and 'cannot reach' in message
    raised_lr = float(message.split('--arch-lr to at least ')[1].split()[0])
    raised_epochs = int(message.split('--epochs to at least ')[1].rstrip('.'))
    assert budget_shortfall(raised_lr * 1.001, 90, 8, 0.2) is None
    assert budget_shortfall(PAPER_ARCH_LR, 90 * raised_epochs // 15, 8, 0.2) is None
    assert budget_shortfall(0.05, 90, 8, 0.2) is None
    assert 'can never be met' in budget_shortfall(1.0, 1000, 8, 1.0)


def test_near_uniform_and_near_chance():
    assert is_near_uniform([0.126] + [0.874 / 7] * 7, rho=0.2)
    assert not is_near_uniform([0.3] + [0.1] * 7, rho=0.2)
    assert is_near_chance(11.7, num_classes=10) and not is_near_chance(80.0, num_classes=10)
    assert is_near_chance(0.15, num_classes=1000) and not is_near_chance(40.0, num_classes=1000)


def _event(slot, pi, forced):
    return FixEvent(slot, 'skip', step=10, epoch=1, probabilities=pi, forced=forced)


def test_verdict_marks_noise_as_undecided_and_keeps_a_decision():
    uniform, clear = [0.125] * 8, [0.5] + [0.5 / 7] * 7
    decided = search_verdict([_event(0, clear, False), _event(1, clear, True)], rho=0.2, num_classes=6, top1=85.0)
    assert decided.decided and decided.reasons == [] and decided.undecided_slots == []
    forced = search_verdict([_event(0, clear, False), _event(1, uniform, True), _event(2, uniform, True)], rho=0.2,
                            num_classes=6, top1=85.0)
    assert not forced.decided and forced.undecided_slots == [1, 2] and 'near-uniform' in forced.reasons[0]
    chance = search_verdict([_event(0, clear, False)], rho=0.2, num_classes=10, top1=11.7)
    assert not chance.decided and chance.undecided_slots == [] and 'near chance' in chance.reasons[0]
    # A slot fixed by Eq. 4 is a decision whatever its pi looked like to a looser rule.
    assert search_verdict([_event(0, uniform, False)], rho=0.2, num_classes=6, top1=None).decided
