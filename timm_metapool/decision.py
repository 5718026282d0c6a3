"""Whether a PMPL search can decide, and whether it did: alpha's step size against Eq. 4's margin, and the verdict.

Eq. 4 fixes a slot once pi_k - pi_m >= rho for every other candidate m. Starting from (near) equal logits, that takes a
logit gap of `eq4_logit_gap(n, rho)` between the winner and the others (ln 3 = 1.10 for the paper's rho = 0.2 and 8
candidates). Adam moves each logit by about its learning rate per step whatever the gradient's scale, so a run of T
steps can open a gap of at most about 2 * eta * T (`reachable_logit_gap`). The paper's eta = 3e-4 (Sec. 3.1) gives
ImageNet's 30 epochs of 10k steps a reach of ~180; a small dataset's ~100 steps get 0.06, and every slot ends forced
at near-uniform pi. `auto_arch_lr` scales eta to the planned steps, `budget_shortfall` says before a run when its
budget cannot reach the margin, and `search_verdict` says after it when its genotype is not a decision.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

__all__ = [
    'PAPER_ARCH_LR', 'AUTO_ARCH_LR_HEADROOM', 'AUTO_ARCH_LR_CEILING', 'eq4_logit_gap', 'reachable_logit_gap', 'auto_arch_lr',
    'budget_shortfall', 'is_near_uniform', 'is_near_chance', 'SearchVerdict', 'search_verdict',
]

PAPER_ARCH_LR = 3e-4          # eta of Sec. 3.1
AUTO_ARCH_LR_HEADROOM = 128.0  # `auto_arch_lr`: reach this many times Eq. 4's gap, for gradients that disagree
# `auto_arch_lr` never goes above this: a larger step lets Eq. 4 fix slots in the first steps, before the network has
# learned anything (docs/search.md, the demo); at 0.15 a few consistent steps still open Eq. 4's gap.
AUTO_ARCH_LR_CEILING = 0.15


def eq4_logit_gap(num_candidates: int, rho: float) -> float:
    """Smallest logit gap d at which one candidate meets Eq. 4 when the others share one logit.

    pi_k - pi_m = (e^d - 1) / (e^d + n - 1) >= rho  <=>  d >= ln((1 + rho (n - 1)) / (1 - rho)); infinite for
    rho = 1, which no softmax meets.
    """
    if num_candidates < 2:
        raise ValueError(f'Eq. 4 compares at least 2 candidates, got {num_candidates}.')
    if rho >= 1.0:
        return math.inf
    return math.log((1.0 + rho * (num_candidates - 1)) / (1.0 - rho))


def reachable_logit_gap(arch_lr: float, steps: int) -> float:
    """Largest gap Adam can open between two logits in `steps` steps of lr `arch_lr`: about 2 * lr * steps.

    An Adam step moves each logit by about lr (the update is m_hat / sqrt(v_hat), about 1 in size when every gradient
    has the same sign, less when they disagree); the winner rises and the others fall. Of all logits within lr * T
    of their start, the winner at +lr * T and every other at -lr * T has the largest Eq. 4 margin.
    """
    return 2.0 * arch_lr * steps


def auto_arch_lr(planned_steps: int, num_candidates: int, rho: float, headroom: float = AUTO_ARCH_LR_HEADROOM,
                 floor: float = PAPER_ARCH_LR, ceiling: float = AUTO_ARCH_LR_CEILING) -> float:
    """eta for `--arch-lr auto`: the paper's 3e-4, raised when the run is too short for it to reach Eq. 4.

    The raised value could reach `headroom` times Eq. 4's gap in the planned steps if every step agreed. Alpha's
    meta gradients mostly disagree from one batch to the next (a signal-to-noise ratio well below 1 per batch), so
    a slot moves at a small fraction of that pace; 128 is where, at about 230k steps (ImageNet's 30 epochs are 300k
    at batch 128), the rule gives the paper's own 3e-4, so one rule covers both ends. Runs of fewer than about 470
    steps get `ceiling` instead of the headroom: a larger step lets the first, noisy meta gradients decide slots.
    """
    gap = eq4_logit_gap(num_candidates, rho)
    if not math.isfinite(gap):
        return floor
    return min(ceiling, max(floor, headroom * gap / (2.0 * max(planned_steps, 1))))


def budget_shortfall(arch_lr: float, planned_steps: int, num_candidates: int, rho: float,
                     epochs: Optional[int] = None, auto: bool = False) -> Optional[str]:
    """Why alpha cannot reach Eq. 4's margin in the planned steps and what to raise, or None when it can; `auto`:
    `arch_lr` is what `--arch-lr auto` chose (capped at `AUTO_ARCH_LR_CEILING`)."""
    gap = eq4_logit_gap(num_candidates, rho)
    reach = reachable_logit_gap(arch_lr, planned_steps)
    if reach >= gap:
        return None
    if not math.isfinite(gap):
        return (f'rho {rho} can never be met (Eq. 4 would need pi_max = 1): every slot will be forced to its argmax '
                f'at the end. Lower --rho (the paper uses 0.2).')
    needed_lr = gap / (2.0 * planned_steps)
    advice = f'raise --arch-lr to at least {needed_lr:.3g}' + ('' if auto else ' (or use --arch-lr auto)')
    if epochs is not None:
        advice += f', or --epochs to at least {math.ceil(epochs * gap / reach)}'
    return (f'alpha cannot reach Eq. 4\'s margin: {planned_steps} steps at --arch-lr {arch_lr:g} move a logit at '
            f'most about {reach:.3g} from the others, and rho {rho} over {num_candidates} candidates needs a gap of '
            f'{gap:.3g}; every slot would be forced at the end with near-uniform pi. To let Eq. 4 decide, {advice}.')


def is_near_uniform(probabilities: Sequence[float], rho: float) -> bool:
    """Whether pi is near uniform: its largest entry less than rho / 2 above 1/n (half of Eq. 4's margin).

    An argmax taken from such a slot reflects noise in alpha, not a preference.
    """
    return max(probabilities) - 1.0 / len(probabilities) < rho / 2.0


def is_near_chance(top1: float, num_classes: int, tolerance: float = 0.1) -> bool:
    """Whether a top-1 (in %) is within `tolerance` of the way from chance (100 / classes) to 100%."""
    chance = 100.0 / num_classes
    return top1 < chance + tolerance * (100.0 - chance)


@dataclass
class SearchVerdict:
    """Whether the genotype is a decision of the search; `reasons` say why not, `undecided_slots` which slots."""
    decided: bool
    reasons: List[str] = field(default_factory=list)
    undecided_slots: List[int] = field(default_factory=list)


def search_verdict(fix_events: Sequence, rho: float, num_classes: int, top1: Optional[float]) -> SearchVerdict:
    """The verdict on a finished search from its fix events (`pmpl.FixEvent`) and its last meta-split top-1 (%).

    Undecided when a slot was forced at the end with near-uniform pi (`is_near_uniform`), or when top-1 stayed near
    chance (`is_near_chance`): alpha was then learned against a network that had not learned the task.
    """
    reasons = []
    undecided = sorted(e.slot for e in fix_events if e.forced and is_near_uniform(e.probabilities, rho))
    if undecided:
        reasons.append(f'{len(undecided)} of {len(fix_events)} slots were forced at the end with near-uniform pi '
                       f'(max pi less than rho/2 = {rho / 2:g} above uniform): slots {undecided}; their ops are noise')
    if top1 is not None and is_near_chance(top1, num_classes):
        reasons.append(f'top-1 on the meta split ended at {top1:.1f}%, near chance ({100.0 / num_classes:.1f}% for '
                       f'{num_classes} classes): alpha was learned on a network that had not learned the task')
    return SearchVerdict(decided=not reasons, reasons=reasons, undecided_slots=undecided)
