"""torchrun for the search: process group (with a timeout), seeds, and the check that every rank holds the same
search."""
import datetime
import os
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist



def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Distributed:
    """torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK); a single process otherwise."""

    def __init__(self, device: Optional[str], timeout_s: float = 300.0):
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        use_cuda = (device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
        if use_cuda and not torch.cuda.is_available():
            raise SystemExit('error: --device cuda asked for, but CUDA is not available.')
        self.device = torch.device(f'cuda:{local_rank}' if use_cuda and self.world_size > 1 else
                                   (device or ('cuda' if use_cuda else 'cpu')))
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.enabled:
            # A rank that stops responding ends the others' waits after timeout_s, instead of blocking them forever.
            dist.init_process_group(backend='nccl' if use_cuda else 'gloo',
                                    timeout=datetime.timedelta(seconds=timeout_s))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order (`[obj]` in one process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_over_ranks(self, values: Dict[str, float], keys: Sequence[str]) -> Dict[str, float]:
        """`values` with the entries named in `keys` summed over every rank (each rank sees its own shard)."""
        if not self.enabled:
            return values
        totals = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return {**values, **dict(zip(keys, totals.tolist()))}

    def close(self) -> None:
        if self.enabled:
            dist.destroy_process_group()


def check_ranks_agree(model: torch.nn.Module, dist_env: Distributed, epoch: int) -> None:
    """Every rank must hold the same alpha and the same fixed slots; anything else is a bug worth stopping for."""
    if not dist_env.enabled:
        return
    mine = (tuple(model.derive_genotype()), tuple(model.open_slots()), model.slot_probability_lists())
    everyone = dist_env.gather(mine)
    if any(other != everyone[0] for other in everyone):
        raise RuntimeError(f'Ranks disagree on alpha or fixed slots after epoch {epoch}: '
                           f'{[o[0] for o in everyone]}. Stopping; the last checkpoint is from before this epoch.')
