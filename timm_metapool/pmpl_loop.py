"""Algorithm 1 over epochs: a PMPL search driven by a train and a meta loader until every slot is fixed (Eq. 4) or
the epoch budget ends, when the slots still open take their argmax ("forced").

`run_pmpl` is the whole outer loop; logging, learning-rate schedules and checkpoints plug in as callbacks, so the CLI
(`train_hooks.search`) and a user's own script run the same loop.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

from .pmpl import FixEvent, PMPLSearch, StepStats

__all__ = ['EpochTotals', 'SearchRun', 'cycle_batches', 'run_pmpl']

Batch = Tuple[Any, Any]


@dataclass
class EpochTotals:
    """Sums over one epoch's steps (losses weighted by batch size), for logs: `train_top1` etc. derive from them."""
    train_loss: float = 0.0
    meta_loss: float = 0.0
    train_correct: int = 0
    meta_correct: int = 0
    n: int = 0
    meta_n: int = 0
    steps: int = 0
    skipped: int = 0

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.skipped += int(stats.skipped)
        self.train_loss += stats.train_loss * stats.batch_size
        self.meta_loss += 0.0 if math.isnan(stats.meta_loss) else stats.meta_loss * stats.meta_batch_size
        self.train_correct += stats.train_correct
        self.meta_correct += stats.meta_correct
        self.n += stats.batch_size
        self.meta_n += stats.meta_batch_size


@dataclass
class SearchRun:
    """Where a `run_pmpl` call ended: epochs and steps done (counting any resumed ones) and the forced fixes."""
    epochs: int
    global_step: int
    forced: List[FixEvent] = field(default_factory=list)


# A meta loader that runs out mid-epoch restarts with its sampler's epoch advanced by this much, so that each restart
# draws a new order that no later epoch's first pass repeats.
_RESTART_EPOCH_OFFSET = 10_000


def set_sampler_epoch(loader: Iterable[Batch], epoch: int) -> None:
    """Give a distributed sampler its epoch (a new shuffle per epoch); loaders without one are left alone."""
    sampler = getattr(loader, 'sampler', None)
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)


def cycle_batches(loader: Iterable[Batch], epoch: int) -> Iterator[Batch]:
    """Meta batches for one epoch, restarting the loader (with a new sampler order) whenever it runs out."""
    while True:
        set_sampler_epoch(loader, epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError('The meta loader gave no batch: the meta split is empty, or smaller than one batch with '
                             'drop_last.')
        epoch += _RESTART_EPOCH_OFFSET


def run_pmpl(
        search: PMPLSearch,
        train_loader: Iterable[Batch],
        meta_loader: Iterable[Batch],
        epochs: int,
        *,
        start_epoch: int = 0,
        start_step: int = 0,
        prepare_batch: Optional[Callable[[Batch], Batch]] = None,
        before_step: Optional[Callable[[int], None]] = None,
        on_epoch_start: Optional[Callable[[int], None]] = None,
        on_step: Optional[Callable[[int, int, StepStats, EpochTotals], None]] = None,
        on_epoch_end: Optional[Callable[[int, int, EpochTotals], None]] = None,
        force_at_end: bool = True,
) -> SearchRun:
    """Run Algorithm 1 (`PMPLSearch.step`: Eq. 3, then Eq. 4) epoch after epoch until every slot is fixed or
    `epochs` are done, then force the open slots to their argmax.

    Each train batch is paired with the next meta batch (the meta loader restarts as needed). Callbacks:
    `prepare_batch(batch)` (device transfer), `before_step(global_step)` (an lr schedule), `on_epoch_start(epoch)`,
    `on_step(global_step, epoch, stats, totals)` after each step, and `on_epoch_end(epochs_done, global_step, totals)`
    (logging, checkpoints); `global_step` counts the steps done. `start_epoch` / `start_step` continue a resumed
    search. A fix records the steps done and the epoch (1-based, as the callbacks count them) it happened in; a forced
    one, those at the end. `force_at_end=False` leaves the open slots open when `epochs` end, for a search that a
    later call continues.
    """
    if epochs < 1 or not 0 <= start_epoch <= epochs:
        raise ValueError(f'run_pmpl needs epochs >= 1 and 0 <= start_epoch <= epochs, got epochs={epochs}, '
                         f'start_epoch={start_epoch}.')
    epoch, step = start_epoch, start_step
    while epoch < epochs and not search.done:
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        set_sampler_epoch(train_loader, epoch)
        meta_batches = cycle_batches(meta_loader, epoch)
        totals = EpochTotals()
        for train_batch in train_loader:
            meta_batch = next(meta_batches)
            if prepare_batch is not None:
                train_batch, meta_batch = prepare_batch(train_batch), prepare_batch(meta_batch)
            if before_step is not None:
                before_step(step)
            stats = search.step(train_batch, meta_batch, step=step + 1, epoch=epoch + 1)
            step += 1
            totals.add(stats)
            if on_step is not None:
                on_step(step, epoch, stats, totals)
            if search.done:
                break
        if totals.steps == 0:
            raise ValueError(f'The train loader gave no batch in epoch {epoch + 1}: the train split is empty, or '
                             f'smaller than one batch with drop_last.')
        epoch += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch, step, totals)
    forced = search.apply_early_stopping(step, epoch, force=True) if force_at_end and not search.done else []
    return SearchRun(epochs=epoch, global_step=step, forced=forced)
