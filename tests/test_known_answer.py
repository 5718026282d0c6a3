"""A known-answer test of the PMPL search (Algorithm 1): a task whose right enhancer is known by construction.

The task: tell sparse bright spikes (class 1: three isolated unit spikes) from the same mass spread evenly over the
image (class 0). The network is one Meta-Pooling slot over all eight candidates, then global average pooling and a
linear classifier, so a candidate's only way to help is to make the pooled feature differ between the classes:

* `skip`, `avg3`, `avg5`, `avg7` are linear and keep the image's mean: they cannot tell the classes apart at all;
* `global` rescales the map by gates in (0, 1): its feature differs by less than the mass itself;
* `maxK` turns each spike into a KxK square and leaves the even field as it is: a difference of (K^2 - 1) times the
  mass, 8x, 24x and 48x for max3, max5, max7.

So the meta loss falls fastest along max7, and PMPL must fix the slot to `max7` by Eq. 4 (pi_max7 - pi_m >= rho for
every other m), mid-search, not by forcing at the end.

What it guards: the sign of the alpha step of Eq. 3 (alpha descending the meta loss: ascending it drives the slot to
the linear candidates, which cannot solve the task), and the fixing rule of Algorithm 1 (the slot takes the argmax of
pi: a rule that fixes another index, as a public implementation that always fixed candidate 1 did, fixes `global`).
Both were checked by breaking the code on purpose: each makes this test fail. Seeded and deterministic; the margins
involved are orders of magnitude above float rounding.
"""
from typing import List, Tuple

import torch
from torch import nn

from timm_metapool import OP_NAMES, MetaPooling, MetaPoolingMixin
from timm_metapool.pmpl import PMPLConfig, PMPLSearch

CHANNELS, SIZE, SPIKES = 4, 24, 3


class SpikeProbe(MetaPoolingMixin, nn.Module):
    """One enhancer slot, global average pooling and a linear classifier: the smallest network with the search API."""

    def __init__(self):
        nn.Module.__init__(self)
        self.slot = MetaPooling(CHANNELS, OP_NAMES)
        self.head = nn.Linear(CHANNELS, 2)

    def enhancer_blocks(self) -> List[nn.Module]:
        return [self]

    def enhancer_slots(self) -> List[nn.Module]:
        return [self.slot]

    def fix_slot(self, index: int, op_name: str) -> nn.Module:
        self.slot = self.slot.fix(self.slot.op_names.index(op_name))
        return self.slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.slot(x).mean((2, 3)))


def spike_batch(generator: torch.Generator, n: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Half spikes (class 1), half the same mass spread evenly (class 0), with a little noise."""
    targets = torch.arange(n) % 2
    images = torch.full((n, 1, SIZE, SIZE), SPIKES / SIZE ** 2)
    for i in range(n):
        if targets[i]:
            images[i] = 0.0
            cells = torch.randperm(4, generator=generator)[:SPIKES]  # one spike per 12x12 quadrant, 3 of the 4
            for cell in cells.tolist():
                y, x = torch.randint(4, 8, (2,), generator=generator).tolist()
                images[i, 0, 12 * (cell // 2) + y, 12 * (cell % 2) + x] = 1.0
    images = images.expand(n, CHANNELS, SIZE, SIZE) + 0.01 * torch.randn(n, CHANNELS, SIZE, SIZE, generator=generator)
    return images, targets


def run_search(steps: int = 150, seed: int = 0) -> Tuple[PMPLSearch, list]:
    torch.manual_seed(seed)
    model = SpikeProbe()
    search = PMPLSearch(model, PMPLConfig(lr=0.05, arch_lr=0.05))
    generator = torch.Generator().manual_seed(seed)
    events = []
    for step in range(steps):
        stats = search.step(spike_batch(generator), spike_batch(generator), step=step)
        events.extend(stats.fixed)
        if search.done:
            break
    return search, events


def test_pmpl_fixes_the_slot_to_the_known_answer_by_eq4():
    search, events = run_search()
    assert len(events) == 1, f'Eq. 4 never fixed the slot in the budget; pi = {search.model.slot_probabilities()}'
    event = events[0]
    pi = torch.tensor(event.probabilities)
    assert event.op_name == 'max7' and not event.forced, (event.op_name, pi)
    k = OP_NAMES.index('max7')
    assert float(pi[k] - torch.cat([pi[:k], pi[k + 1:]]).max()) >= 0.2  # Eq. 4 held when it was fixed
    assert event.step < 150 - 1
    images, targets = spike_batch(torch.Generator().manual_seed(123), 64)
    search.model.eval()
    with torch.no_grad():
        accuracy = float((search.model(images).argmax(-1) == targets).float().mean())
    assert accuracy == 1.0  # the fixed network solves the task
