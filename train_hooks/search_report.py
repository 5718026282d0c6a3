"""The end of a search: genotype.json with the verdict, the search plot and the retrain command."""
import argparse
import json
import math
import os
import shlex
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import torch

from timm_metapool.decision import SearchVerdict, search_verdict
from timm_metapool.ops import OP_NAMES
from timm_metapool.pmpl import FixEvent, PMPLSearch

from .distributed import Distributed
from .search_args import model_kwargs
from .run_files import (
    CHECKPOINT_NAME, GENOTYPE_NAME, LOG_NAME, PLOT_NAME, RETRAIN_NAME, SearchProgress, SearchSetup, atomic_write_text,
    demo_data_dir,
)
from .search_plot import plot_search


# The paper's retrain recipe (Sec. 3.1) as timm train.py flags, everything train.py would otherwise take from its own
# defaults (a warm-up, label smoothing, colour jitter) set as the paper has it; examples/pmpl_retrain.yaml is the same.
RETRAIN_RECIPE = (
    ('--epochs', 200), ('--sched', 'cosine'), ('--opt', 'sgd'), ('--lr', 0.05), ('--momentum', 0.9),
    ('--weight-decay', 4e-5), ('--warmup-epochs', 0), ('--cooldown-epochs', 0), ('--min-lr', 0),
    ('--color-jitter', 0), ('--smoothing', 0), ('-b', 128),
)


def retrain_command(args: argparse.Namespace, genotype_path: str, num_classes: int, data_config: Dict,
                    device: torch.device) -> str:
    """timm train.py's command line for the paper's retrain recipe on the searched data (shell-quoted); off CUDA it
    names the device, since train.py defaults to cuda."""
    data = args.data_dir or demo_data_dir(args.output)
    quote = shlex.quote
    parts = [
        'python train.py', f'--data-dir {quote(data)}', f'--dataset {quote(args.dataset)}' if args.dataset else '',
        '--device-modules timm_metapool', f'--model {args.model}',
        '--model-kwargs ' + ' '.join(quote(f'{k}={v}') for k, v in dict(genotype=genotype_path,
                                                                         **model_kwargs(args)).items()),
        f'--train-split {quote(args.train_split)}' if args.train_split != 'train' else '',
        f'--num-classes {num_classes}', f"--input-size {' '.join(map(str, data_config['input_size']))}",
        # the normalisation and image mode the genotype was searched with, which train.py would not derive
        f"--mean {' '.join(map(str, args.mean))}" if args.mean else '',
        f"--std {' '.join(map(str, args.std))}" if args.std else '',
        f'--input-img-mode {quote(args.input_img_mode)}' if args.input_img_mode else '',
        ' '.join(f'{flag} {value:g}' if isinstance(value, (int, float)) else f'{flag} {value}'
                 for flag, value in RETRAIN_RECIPE),
        f'--device {device.type}' if device.type != 'cuda' else '',
    ]
    return ' '.join(p for p in parts if p)


def final_top1(log_rows: List[Dict]) -> Optional[float]:
    """The last epoch's meta-split top-1 (%), or its train top-1 when no meta batch ran (every slot already fixed)."""
    if not log_rows:
        return None
    row = log_rows[-1]
    return row['train_top1'] if math.isnan(row['meta_loss']) else row['meta_top1']


def verdict_lines(verdict: SearchVerdict, events: Sequence[FixEvent], rho: float) -> List[str]:
    """What the summary says about the genotype: how each slot was decided, and whether it is a decision at all."""
    by_eq4 = sum(not e.forced for e in events)
    lines = [f'{by_eq4} of {len(events)} slots fixed by Eq. 4 (rho {rho:g}), {len(events) - by_eq4} forced to their '
             f'argmax at the end']
    if not verdict.decided:
        lines.append('UNDECIDED: the genotype is not a decision of the search: ' + '; '.join(verdict.reasons) +
                     '. Raise --epochs (more steps), --arch-lr or --lr, lower --arch-weight-decay (it holds alpha '
                     'near |gradient| / decay; 0 lets it grow), or check the data, and search again.')
    return lines


def write_search_outputs(args: argparse.Namespace, dist_env: Distributed, search: PMPLSearch,
                         progress: SearchProgress, setup: SearchSetup) -> Dict:
    """The end of a search: OUTPUT/genotype.json (the genotype, when and how each slot was decided, the verdict and
    the run's facts), retrain_command.txt and search.png, and the summary printed. Every rank must call it (it
    gathers each rank's probabilities); the main rank writes and returns the summary, the others return {}."""
    model = search.model
    num_classes, data_config, note = setup.num_classes, setup.data_config, setup.image_mode_note
    last_top1 = final_top1(progress.log_rows)
    genotype = model.genotype
    events = sorted(search.fix_events, key=lambda e: e.slot)
    rank_probabilities = dist_env.gather([e.probabilities for e in events])
    if not dist_env.is_main:
        return {}
    events_out = [dict(asdict(e), epoch_float=e.step / setup.steps_per_epoch) for e in events]
    genotype_path = os.path.join(args.output, GENOTYPE_NAME)
    summary = genotype.to_dict(
        model=args.model, num_slots=model.num_slots, op_names=list(OP_NAMES),
        probabilities=[e.probabilities for e in events],
        fixed_step=[e.step for e in events], fixed_epoch=[e.epoch for e in events], forced=[e.forced for e in events],
        all_fixed_at_epoch=None if any(e.forced for e in events) else max(e['epoch_float'] for e in events_out),
        epochs_run=progress.epoch, steps_run=progress.global_step, search_time_s=round(progress.elapsed_s, 2),
        data=dict(data_dir=args.data_dir, dataset=args.dataset, train_split=args.train_split,
                  train_images=setup.split['train_images'], meta_images=setup.split['meta_images'],
                  num_classes=num_classes, bad_images_left_out=setup.bad_images_left_out,
                  input_size=list(data_config['input_size'])),
        seed=args.seed, world_size=dist_env.world_size, rank_probabilities=rank_probabilities, args=vars(args),
    )
    verdict = search_verdict(events, args.rho, num_classes, last_top1)
    summary.update(decided=verdict.decided, undecided_reasons=verdict.reasons, undecided_slots=verdict.undecided_slots,
                   final_top1=last_top1, arch_lr_used=search.config.arch_lr)
    atomic_write_text(json.dumps(summary, indent=2), genotype_path)
    command = retrain_command(args, genotype_path, num_classes, data_config, dist_env.device)
    atomic_write_text(command + '\n' + (f'# {note}\n' if note else ''), os.path.join(args.output, RETRAIN_NAME))
    plotted = plot_search(progress.history, events_out, OP_NAMES, model.num_slots, os.path.join(args.output, PLOT_NAME),
                          title=f'PMPL search of {args.model}')
    print(f'Genotype: {genotype}' + ('' if verdict.decided else ' (UNDECIDED)'), flush=True)
    for line in verdict_lines(verdict, events, args.rho):
        print(line, flush=True)
    print(f'Wrote {genotype_path}, {LOG_NAME}, {CHECKPOINT_NAME}, {RETRAIN_NAME}' + (f', {PLOT_NAME}' if plotted else
          ' (no plot: pip install matplotlib)') + f' in {args.output}', flush=True)
    print(f'Retrain with timm (train.py from the timm repository):\n  {command}', flush=True)
    if note:
        print(f'  ({note})', flush=True)
    return summary
