"""A search's progress as it runs: the callbacks `run_pmpl` calls (progress bar, fix events, the probability history,
one log row and one checkpoint per epoch)."""
import argparse
import os
import time
from dataclasses import asdict
from typing import Callable, Dict, Optional, Tuple

import torch

from timm_metapool.ops import OP_NAMES
from timm_metapool.pmpl import PMPLSearch, StepStats
from timm_metapool.pmpl_loop import EpochTotals

from .distributed import Distributed, check_ranks_agree, seed_everything
from .run_files import (
    LOG_NAME, SearchProgress, SearchSetup, discard_previous_run, save_checkpoint, write_log_csv,
)

__all__ = ['SearchCallbacks', 'epoch_row']

# Per-epoch seeds are spaced by a prime larger than any world size, so no (epoch, rank) pair shares a seed.
_EPOCH_SEED_STRIDE = 1_000_003


def epoch_row(epoch: int, step: int, lr: float, sums: Dict[str, float], model: torch.nn.Module, epoch_time: float,
              elapsed: float) -> Dict:
    """One row of search_log.csv: the epoch's mean losses and top-1 from summed `EpochTotals`, the slots fixed so
    far, timings, and every slot's probabilities (`pi_<slot>_<op>`, NaN once the slot is fixed)."""
    row = dict(
        epoch=epoch, step=step, lr=round(lr, 8),
        train_loss=sums['train_loss'] / max(sums['n'], 1), train_top1=100.0 * sums['train_correct'] / max(sums['n'], 1),
        meta_loss=sums['meta_loss'] / max(sums['meta_n'], 1) if sums['meta_n'] else float('nan'),
        meta_top1=100.0 * sums['meta_correct'] / max(sums['meta_n'], 1),
        slots_fixed=model.num_fixed_slots, epoch_time_s=round(epoch_time, 3), elapsed_s=round(elapsed, 3),
    )
    for slot, probabilities in enumerate(model.slot_probability_lists()):
        for name, value in zip(OP_NAMES, probabilities or [float('nan')] * len(OP_NAMES)):
            row[f'pi_{slot}_{name}'] = value
    return row


class SearchCallbacks:
    """The CLI's callbacks for `timm_metapool.pmpl_loop.run_pmpl`; they record into `progress` and, on the main
    rank, print and save the checkpoint and log after every epoch."""

    def __init__(
            self,
            args: argparse.Namespace,
            dist_env: Distributed,
            search: PMPLSearch,
            progress: SearchProgress,
            setup: SearchSetup,
            log: Callable[..., None] = print,
    ):
        self.args, self.dist_env, self.search = args, dist_env, search
        self.model = search.model
        self.progress, self.setup, self.log = progress, setup, log
        self._bar = None
        self._epoch_start = 0.0

    def prepare_batch(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """A loader batch on the search's device (channels-last images with --channels-last)."""
        images, targets = (t.to(self.dist_env.device, non_blocking=True) for t in batch)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch_start = time.time()
        seed_everything(self.args.seed + _EPOCH_SEED_STRIDE * epoch + self.dist_env.rank)
        if not self.args.quiet and self.dist_env.is_main:
            from tqdm import tqdm
            self._bar = tqdm(total=self.setup.steps_per_epoch, desc=f'epoch {epoch + 1}/{self.args.epochs}',
                             leave=False, dynamic_ncols=True)

    def on_step(self, step: int, epoch: int, stats: StepStats, totals: EpochTotals) -> None:
        if stats.fixed or step % self.args.history_interval == 0:
            self._record_probabilities(step)
        for event in stats.fixed:
            self.log(f'  step {step}: slot {event.slot} fixed to {event.op_name} (pi={max(event.probabilities):.3f})')
        if self._bar is not None:
            self._bar.set_postfix_str(f'loss {totals.train_loss / totals.n:.3f} '
                                      f'fixed {self.model.num_fixed_slots}/{self.model.num_slots}')
            self._bar.update(1)

    def on_epoch_end(self, epoch: int, step: int, totals: EpochTotals) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        epoch_time = time.time() - self._epoch_start
        progress = self.progress
        progress.epoch, progress.global_step = epoch, step
        progress.elapsed_s += epoch_time
        check_ranks_agree(self.model, self.dist_env, epoch)
        # The log's losses and top-1 cover every rank's shard, not the main rank's alone.
        sums = self.dist_env.sum_over_ranks(
            asdict(totals), ('train_loss', 'meta_loss', 'train_correct', 'meta_correct', 'n', 'meta_n'))
        row = epoch_row(epoch, step, self.search.lr, sums, self.model, epoch_time, progress.elapsed_s)
        progress.log_rows.append(row)
        self._record_probabilities(step)
        self.log(f"epoch {epoch}/{self.args.epochs}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | "
                 f"meta loss {row['meta_loss']:.4f} top1 {row['meta_top1']:.2f} | fixed {row['slots_fixed']}/"
                 f"{self.model.num_slots} | {row['epoch_time_s']:.1f}s" + self._overflow_note(sums['skipped']))
        if self.dist_env.is_main:
            # The checkpoint first: it holds the log rows too, so the CSV never runs ahead of what a resume restores.
            save_checkpoint(self.args, self.search, progress, self.setup)
            discard_previous_run(self.args.output)  # --overwrite's earlier run: this run now has a checkpoint
            write_log_csv(progress.log_rows, os.path.join(self.args.output, LOG_NAME))

    def _record_probabilities(self, step: int) -> None:
        self.progress.history.append({'epoch': step / self.setup.steps_per_epoch,
                                      'probabilities': self.model.slot_probability_lists()})

    @staticmethod
    def _overflow_note(skipped: Optional[float]) -> str:
        if not skipped:
            return ''
        return f' | {skipped} steps skipped (float16 overflow; the GradScaler lowered its scale)'
