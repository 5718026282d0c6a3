"""PMPL search on timm's data pipeline: `python -m train_hooks.search` / `timm-metapool-search`.

Runs Algorithm 1 (timm_metapool.pmpl) over a timm dataset, with the meta split carved from the training split, and
writes OUTPUT/genotype.json, search_log.csv, search.png, last.pth and retrain_command.txt. Works in one process or
under `torchrun` (DistributedDataParallel for the weights, alpha gradients averaged across ranks).

This module is the shell: arguments (`search_args`), data (`search_data`), torchrun (`distributed`), the run's files
(`run_files`) and the final report (`search_report`) each have their own module; the loop is the library's
`timm_metapool.pmpl_loop.run_pmpl`.
"""
import argparse
import contextlib
import os
import sys
import time
from dataclasses import asdict
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import timm
from timm.data import resolve_data_config
from timm.scheduler import CosineLRScheduler

import timm_metapool  # noqa: F401  (registers the models)
from timm_metapool.base_weights import load_base_weights
from timm_metapool.data import BadImageError, generate_demo_dataset, split_fingerprint
from timm_metapool.decision import budget_shortfall
from timm_metapool.pmpl import PMPLSearch, zero_init_classifier
from timm_metapool.pmpl_loop import EpochTotals, run_pmpl

from .distributed import Distributed, check_ranks_agree, seed_everything
from .run_files import (
    CHECKPOINT_NAME, LOG_NAME, check_resumed_model, check_same_split, clear_previous_run, load_resume_state,
    merge_resumed_args, removed_if_nothing_saved, save_checkpoint, write_log_csv,
)
from .search_args import (
    build_parser, candidate_count, check_args, explicit_arg_names, input_channels, model_kwargs, pmpl_config,
    resolve_arch_lr,
)
from .search_data import make_datasets, make_loaders, unconverted_by_train_py
from .search_report import progress_bar, epoch_row, final_top1, finish

__all__ = ['main', 'run']


def run(args: argparse.Namespace, explicit: Optional[set] = None) -> Dict:
    """Run a search for parsed `args`; `explicit` names the options the user gave (for --resume)."""
    if args.resume:
        if not os.path.isfile(args.resume):
            raise SystemExit(f'error: --resume {args.resume!r} is not a file; point it at OUTPUT/{CHECKPOINT_NAME}.')
        resume_state = load_resume_state(args)
        merge_resumed_args(args, resume_state['args'], explicit if explicit is not None else set(vars(args)))
        check_resumed_model(args, resume_state, input_channels(args))
    else:
        resume_state = None
    check_args(args)
    dist_env = Distributed(args.device, timeout_s=args.dist_timeout)
    checkpoint = os.path.join(args.output, CHECKPOINT_NAME)
    try:
        with removed_if_nothing_saved(args.output, enabled=dist_env.is_main):
            return _run(args, dist_env, resume_state)
    except BadImageError as e:
        raise SystemExit(f'error: {str(e).strip().splitlines()[-1]}') from None
    except FloatingPointError as e:
        kept = f'Last good checkpoint: {checkpoint}' if os.path.isfile(checkpoint) else 'No epoch had completed.'
        raise SystemExit(f'error: {e} {kept}')
    except RuntimeError as e:  # gloo raises a plain RuntimeError on a timeout, nccl a DistBackendError
        if not (dist_env.enabled and (isinstance(e, dist.DistError) or 'timed out' in str(e).lower())):
            raise
        kept = f'resume from {checkpoint}' if os.path.isfile(checkpoint) else 'no epoch had completed'
        raise SystemExit(f'error: rank {dist_env.rank}: another rank stopped responding for --dist-timeout '
                         f'{args.dist_timeout:g} s ({type(e).__name__}); the search stops here ({kept}).') from None
    finally:
        dist_env.close()


def _run(args: argparse.Namespace, dist_env: Distributed, resume_state: Optional[Dict]) -> Dict:
    log = (lambda *a: print(*a, flush=True)) if dist_env.is_main else (lambda *a: None)
    if dist_env.is_main:
        os.makedirs(args.output, exist_ok=True)
        if args.overwrite and resume_state is None:
            removed = clear_previous_run(args.output)
            if removed:
                log(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {args.output}")
    if args.data_dir is None:
        args.data_dir = os.path.join(args.output, 'demo_data')
        if dist_env.is_main and not os.path.isdir(args.data_dir):
            log(f'No --data-dir: generating the embedded demo dataset in {args.data_dir}')
            generate_demo_dataset(args.data_dir)
        if dist_env.enabled:
            dist.barrier()
        args.img_size = args.img_size or 32

    train_set, meta_set, found_classes, stored_mode = make_datasets(args, dist_env)
    split = dict(fingerprint=split_fingerprint(train_set, meta_set, root=args.data_dir), train_images=len(train_set),
                 meta_images=len(meta_set))
    if resume_state is not None:
        check_same_split(args, resume_state, split)
    num_classes = args.num_classes or found_classes
    if num_classes < found_classes:
        raise SystemExit(f'error: --num-classes {num_classes} is fewer than the {found_classes} classes of the training '
                         f'split; leave it out to use the dataset\'s count.')
    seed_everything(args.seed)
    model = timm.create_model(args.model, num_classes=num_classes, in_chans=input_channels(args),
                              drop_path_rate=args.drop_path, **model_kwargs(args))
    fresh = None  # every tensor as initialised, or (--init-weights) the keys the base weights left so
    if args.init_weights and resume_state is None:  # a resumed search restores its own weights
        try:
            fresh = load_base_weights(model, args.init_weights)
        except (OSError, ValueError) as e:
            raise SystemExit(f'error: --init-weights: {e}')
        log(f'Shared layers loaded from {args.init_weights}; {len(fresh)} tensors keep their initialisation (the '
            f'enhancer slots\' own, and a classifier of another class count).')
    classifier_weight = f"{model.pretrained_cfg.get('classifier')}.weight"
    if resume_state is None and args.head_init == 'zero' and (fresh is None or classifier_weight in fresh):
        zero_init_classifier(model)
    data_config = resolve_data_config(vars(args), model=model)
    model.to(dist_env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, meta_loader = make_loaders(args, train_set, meta_set, data_config, dist_env)

    steps_per_epoch = len(train_loader)
    arch_lr, arch_lr_note = resolve_arch_lr(args, model, args.epochs * steps_per_epoch)
    config = pmpl_config(args, arch_lr)
    amp_dtype = getattr(torch, args.amp_dtype)
    autocast = (lambda: torch.autocast(dist_env.device.type, dtype=amp_dtype)) if args.amp else contextlib.nullcontext
    scaler = torch.amp.GradScaler(dist_env.device.type) if args.amp and amp_dtype == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    search = PMPLSearch(model, config, loss_fn=loss_fn, wrap=dist_env.wrap, autocast=autocast, grad_scaler=scaler)

    start_epoch, global_step, log_rows, history, elapsed = 0, 0, [], [], 0.0
    if resume_state is not None:
        state = resume_state
        if state['num_slots'] != model.num_slots:
            raise SystemExit(f"error: {args.resume!r} has {state['num_slots']} slots, {args.model} has "
                             f'{model.num_slots}; it was made by another version of the model.')
        search.load_state_dict(state['search'], state['state_dict'])
        for change in search.apply_config(config):
            log(f'Resume with a new setting: {change}')
        start_epoch, global_step = state['epoch'], state['global_step']
        log_rows, history, elapsed = state['log_rows'], state['history'], state['elapsed_s']
        log(f'Resumed {args.resume}: epoch {start_epoch}, {model.num_slots - len(model.open_slots())}/'
            f'{model.num_slots} slots fixed')
    # Built after a resume: fixing slots and resuming may replace the optimizer, the schedule depends only on the step.
    scheduler = CosineLRScheduler(search.weight_optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=0.0,
                                  t_in_epochs=False)

    log(f'PMPL search: {args.model}, {model.num_slots} slots, {len(train_set)} train / {len(meta_set)} meta images, '
        f'{num_classes} classes, input {data_config["input_size"]}, {dist_env.world_size} process(es) on '
        f'{dist_env.device}')
    log(arch_lr_note)
    shortfall = None if args.no_early_stop else budget_shortfall(
        arch_lr, args.epochs * steps_per_epoch, candidate_count(model), args.rho, epochs=args.epochs)
    if shortfall:
        log(f'warning: {shortfall}')
    note = unconverted_by_train_py(args, stored_mode, data_config['input_size'])
    if note:
        log(note)
    bar, epoch_start = None, 0.0

    def on_epoch_start(epoch: int) -> None:
        nonlocal bar, epoch_start
        epoch_start = time.time()
        seed_everything(args.seed + 1_000_003 * epoch + dist_env.rank)
        bar = None if args.quiet or not dist_env.is_main else progress_bar(steps_per_epoch, epoch, args.epochs)

    def prepare_batch(batch):
        images, targets = (t.to(dist_env.device, non_blocking=True) for t in batch)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def on_step(step: int, epoch: int, stats, totals: EpochTotals) -> None:
        if stats.fixed or step % args.history_interval == 0:
            history.append({'epoch': step / steps_per_epoch, 'probabilities': model.slot_probability_lists()})
        for event in stats.fixed:
            log(f'  step {step}: slot {event.slot} fixed to {event.op_name} (pi={max(event.probabilities):.3f})')
        if bar is not None:
            bar.set_postfix_str(f'loss {totals.train_loss / totals.n:.3f} '
                                f'fixed {model.num_slots - len(model.open_slots())}/{model.num_slots}')
            bar.update(1)

    def on_epoch_end(epoch: int, step: int, totals: EpochTotals) -> None:
        nonlocal elapsed
        if bar is not None:
            bar.close()
        elapsed += time.time() - epoch_start
        check_ranks_agree(model, dist_env, epoch)
        # The log's losses and top-1 cover every rank's shard, not the main rank's alone.
        sums = dist_env.sum_over_ranks(
            asdict(totals), ('train_loss', 'meta_loss', 'train_correct', 'meta_correct', 'n', 'meta_n'))
        row = epoch_row(epoch, step, search.lr, sums, model, time.time() - epoch_start, elapsed)
        log_rows.append(row)
        history.append({'epoch': step / steps_per_epoch, 'probabilities': model.slot_probability_lists()})
        log(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | meta loss "
            f"{row['meta_loss']:.4f} top1 {row['meta_top1']:.2f} | fixed {row['slots_fixed']}/{model.num_slots} | "
            f"{row['epoch_time_s']:.1f}s" + (f" | {sums['skipped']} steps skipped (float16 overflow; the GradScaler "
                                             f"lowered its scale)" if sums['skipped'] else ''))
        if dist_env.is_main:
            # The checkpoint first: it holds the log rows too, so the CSV never runs ahead of what a resume restores.
            save_checkpoint(args, search, model, epoch, step, log_rows, history, elapsed, num_classes, split)
            write_log_csv(log_rows, os.path.join(args.output, LOG_NAME))

    result = run_pmpl(search, train_loader, meta_loader, args.epochs, start_epoch=start_epoch, start_step=global_step,
                      prepare_batch=prepare_batch, before_step=scheduler.step_update, on_epoch_start=on_epoch_start,
                      on_step=on_step, on_epoch_end=on_epoch_end)
    epoch, global_step = result.epochs, result.global_step
    for event in result.forced:
        log(f'  slot {event.slot} forced to its argmax {event.op_name} (pi={max(event.probabilities):.3f})')
    if result.forced and dist_env.is_main:
        save_checkpoint(args, search, model, epoch, global_step, log_rows, history, elapsed, num_classes, split)
    return finish(args, dist_env, search, model, num_classes, data_config, epoch, global_step, steps_per_epoch,
                  history, elapsed, train_set, meta_set, note, last_top1=final_top1(log_rows))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run(args, explicit_arg_names(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
