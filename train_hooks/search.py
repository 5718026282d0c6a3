"""PMPL search on timm's data pipeline: `python -m train_hooks.search` / `timm-metapool-search`.

Runs Algorithm 1 (timm_metapool.pmpl) over a timm dataset, with the meta split carved from the training split, and
writes OUTPUT/genotype.json, search_log.csv, search.png, last.pth and retrain_command.txt. Works in one process or
under `torchrun` (DistributedDataParallel for the weights, alpha gradients averaged across ranks).

This module is the shell: arguments (`search_args`), data (`search_data`), torchrun (`distributed`), the run's files
(`run_files`), the per-epoch callbacks (`search_progress`) and the final report (`search_report`) each have their own
module; the loop is the library's `timm_metapool.pmpl_loop.run_pmpl`.
"""
import argparse
import contextlib
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import timm
from timm.data import resolve_data_config
from timm.scheduler import CosineLRScheduler

import timm_metapool  # noqa: F401  (registers the models)
from timm_metapool.base_weights import load_base_weights
from timm_metapool.data import BadImageError, generate_demo_dataset, split_fingerprint
from timm_metapool.decision import budget_shortfall
from timm_metapool.pmpl import PMPLConfig, PMPLSearch, zero_init_classifier
from timm_metapool.pmpl_loop import run_pmpl

from .distributed import Distributed, seed_everything
from .resume import (
    check_resumed_model, check_same_split, check_same_steps_per_epoch, load_resume_state, merge_resumed_args,
)
from .run_files import (
    CHECKPOINT_NAME, GENOTYPE_NAME, PREVIOUS_RUN_NAME, SearchProgress, SearchSetup, demo_data_dir, previous_run_restored_on_failure,
    removed_if_nothing_saved, save_checkpoint, set_aside_previous_run,
)
from .search_args import (
    build_parser, candidate_count, check_args, explicit_arg_names, input_channels, model_kwargs, pmpl_config,
    resolve_arch_lr, resolve_output,
)
from .search_data import make_datasets, make_loaders, unconverted_by_train_py
from .search_progress import SearchCallbacks
from .search_report import write_search_outputs

__all__ = ['main', 'run']


def run(args: argparse.Namespace, explicit: Optional[set] = None) -> Dict:
    """Run a search for parsed `args`; `explicit` names the options the user gave (for --resume)."""
    if args.resume:
        if not os.path.isfile(args.resume):
            raise SystemExit(f'error: --resume {args.resume!r} is not a file; point it at OUTPUT/{CHECKPOINT_NAME}.')
        resume_state = load_resume_state(args)
        changed = merge_resumed_args(args, resume_state['args'], explicit if explicit is not None else set(vars(args)))
        check_resumed_model(args, resume_state, input_channels(args))
    else:
        resume_state, changed = None, []
    resolve_output(args)
    check_args(args)
    dist_env = Distributed(args.device, timeout_s=args.dist_timeout)
    try:
        with removed_if_nothing_saved(args.output, enabled=dist_env.is_main), \
                previous_run_restored_on_failure(args.output, enabled=dist_env.is_main):
            try:
                return _run(args, dist_env, resume_state, changed)
            except (BadImageError, FloatingPointError, RuntimeError) as e:
                # Said here, before an --overwrite's earlier run is put back: "the checkpoint" is this run's.
                message = _stop_message(e, args, dist_env)
                if message is None:
                    raise
                raise SystemExit(message) from None
    finally:
        dist_env.close()


def _stop_message(error: Exception, args: argparse.Namespace, dist_env: Distributed) -> Optional[str]:
    """What a search that stops on `error` says (bad data, divergence, a rank that stopped responding) and where
    it can resume from; None for an error to raise as it is."""
    checkpoint = os.path.join(args.output, CHECKPOINT_NAME)
    saved = os.path.isfile(checkpoint)
    if isinstance(error, BadImageError):
        return f'error: {str(error).strip().splitlines()[-1]}'
    if isinstance(error, FloatingPointError):
        return f"error: {error} {f'Last good checkpoint: {checkpoint}' if saved else 'No epoch had completed.'}"
    # gloo raises a plain RuntimeError on a timeout, nccl a DistBackendError
    if dist_env.enabled and (isinstance(error, dist.DistError) or 'timed out' in str(error).lower()):
        kept = f'resume from {checkpoint}' if saved else 'no epoch had completed'
        return (f'error: rank {dist_env.rank}: another rank stopped responding for --dist-timeout '
                f'{args.dist_timeout:g} s ({type(error).__name__}); the search stops here ({kept}).')
    return None


def _run(args: argparse.Namespace, dist_env: Distributed, resume_state: Optional[Dict], changed: List[str]) -> Dict:
    log = (lambda *a: print(*a, flush=True)) if dist_env.is_main else (lambda *a: None)
    _prepare_output(args, dist_env, resume_state is not None, log)
    train_set, meta_set, found_classes, stored_mode = make_datasets(args, dist_env)
    split = dict(fingerprint=split_fingerprint(train_set, meta_set, root=args.data_dir), train_images=len(train_set),
                 meta_images=len(meta_set))
    if resume_state is not None:
        check_same_split(args, resume_state, split)
    num_classes = args.num_classes or found_classes
    if num_classes < found_classes:
        raise SystemExit(f'error: --num-classes {num_classes} is fewer than the {found_classes} classes of the '
                         f'training split; leave it out to use the dataset\'s count.')
    model = _build_model(args, num_classes, fresh_start=resume_state is None, log=log)
    data_config = resolve_data_config(vars(args), model=model)
    model.to(dist_env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, meta_loader = make_loaders(args, train_set, meta_set, data_config, dist_env)
    setup = SearchSetup(
        num_classes=num_classes, split=split, steps_per_epoch=len(train_loader), world_size=dist_env.world_size,
        data_config=data_config, bad_images_left_out=getattr(train_set, 'bad_images_left_out', 0),
        image_mode_note=unconverted_by_train_py(args, stored_mode, data_config['input_size']) or '')
    if resume_state is not None:
        _check_epoch_length(args, resume_state, setup, log)
    total_steps = args.epochs * setup.steps_per_epoch
    arch_lr, arch_lr_note = resolve_arch_lr(args, model, total_steps)
    config = pmpl_config(args, arch_lr)
    search = _build_search(args, model, config, dist_env)
    progress = SearchProgress()
    if resume_state is not None:
        progress = _restore(search, resume_state, args, log)
        changes = changed + search.apply_config(config)  # the optimizers' own settings, put into them
        genotype_path = os.path.join(args.output, GENOTYPE_NAME)
        if search.done and os.path.isfile(genotype_path):
            log(f'The run being resumed had finished (every slot fixed): no step is left to run, and its outputs in '
                f'{args.output} stay as they are' + (' (the settings given anew do not apply).' if changes else '.'))
            return _read_json(genotype_path) if dist_env.is_main else {}
        for change in changes:
            log(f'Resume with a new setting: {change}')
    # Built after a resume: fixing slots and resuming may replace the optimizer, the schedule depends only on the step.
    scheduler = CosineLRScheduler(search.weight_optimizer, t_initial=total_steps, lr_min=0.0, t_in_epochs=False)

    log(f'PMPL search: {args.model}, {model.num_slots} slots, {len(train_set)} train / {len(meta_set)} meta images, '
        f'{num_classes} classes, input {data_config["input_size"]}, {dist_env.world_size} process(es) on '
        f'{dist_env.device}')
    log(arch_lr_note)
    shortfall = None if args.no_early_stop else budget_shortfall(
        arch_lr, total_steps, candidate_count(model), args.rho, epochs=args.epochs, auto=args.arch_lr == 'auto')
    if shortfall:
        log(f'warning: {shortfall}')
    if setup.image_mode_note:
        log(setup.image_mode_note)

    callbacks = SearchCallbacks(args, dist_env, search, progress, setup, log=log)
    result = run_pmpl(search, train_loader, meta_loader, args.epochs, start_epoch=progress.epoch,
                      start_step=progress.global_step, prepare_batch=callbacks.prepare_batch,
                      before_step=scheduler.step_update, on_epoch_start=callbacks.on_epoch_start,
                      on_step=callbacks.on_step, on_epoch_end=callbacks.on_epoch_end)
    progress.epoch, progress.global_step = result.epochs, result.global_step
    for event in result.forced:
        log(f'  slot {event.slot} forced to its argmax {event.op_name} (pi={max(event.probabilities):.3f})')
    if result.forced and dist_env.is_main:
        save_checkpoint(args, search, progress, setup)
    return write_search_outputs(args, dist_env, search, progress, setup)


def _check_epoch_length(args: argparse.Namespace, state: Dict, setup: SearchSetup, log: Callable[..., None]) -> None:
    """The resumed run's steps per epoch are this run's (refused otherwise); another process count is named."""
    check_same_steps_per_epoch(args, state, setup.steps_per_epoch, setup.world_size)
    ran_on = state.get('world_size', setup.world_size)
    if ran_on != setup.world_size:
        log(f'warning: the run being resumed ran on {ran_on} process(es), this one on {setup.world_size}: the same '
            f'steps per epoch, but each process\'s batch (BatchNorm\'s statistics) and the sample order differ, so it '
            f'continues differently from a run that never stopped.')


def _prepare_output(args: argparse.Namespace, dist_env: Distributed, resuming: bool, log: Callable[..., None]) -> None:
    """Make the output folder (setting an earlier run's files aside with --overwrite) and, without --data-dir, the
    embedded demo dataset inside it."""
    if dist_env.is_main:
        os.makedirs(args.output, exist_ok=True)
        if args.overwrite and not resuming:
            moved = set_aside_previous_run(args.output)
            if moved:
                log(f"--overwrite: the earlier run's {', '.join(moved)} moved to "
                    f"{os.path.join(args.output, PREVIOUS_RUN_NAME)}, deleted once this run saves its first "
                    f"checkpoint (put back if it stops before)")
    if args.data_dir is None:
        args.data_dir = demo_data_dir(args.output)
        if dist_env.is_main and not os.path.isdir(args.data_dir):
            log(f'No --data-dir: generating the embedded demo dataset in {args.data_dir}')
            generate_demo_dataset(args.data_dir)
        if dist_env.enabled:
            dist.barrier()
        args.img_size = args.img_size or 32


def _build_model(args: argparse.Namespace, num_classes: int, fresh_start: bool, log: Callable[..., None]):
    """The supernet of --model, with --init-weights' shared layers and a zero classifier (--head-init zero) on a
    fresh start; a resumed search restores its own weights afterwards."""
    seed_everything(args.seed)
    model = timm.create_model(args.model, num_classes=num_classes, in_chans=input_channels(args),
                              drop_path_rate=args.drop_path, **model_kwargs(args))
    if not fresh_start:
        return model
    left_initialised = None  # with --init-weights: the keys the base weights did not cover
    if args.init_weights:
        try:
            left_initialised = load_base_weights(model, args.init_weights)
        except (OSError, ValueError) as e:
            raise SystemExit(f'error: --init-weights: {e}')
        log(f'Shared layers loaded from {args.init_weights}; {len(left_initialised)} tensors keep their '
            f'initialisation (the enhancer slots\' own, and a classifier of another class count).')
    classifier_weight = f"{model.pretrained_cfg.get('classifier')}.weight"
    if args.head_init == 'zero' and (left_initialised is None or classifier_weight in left_initialised):
        zero_init_classifier(model)
    return model


def _build_search(args: argparse.Namespace, model: torch.nn.Module, config: PMPLConfig,
                  dist_env: Distributed) -> PMPLSearch:
    """Algorithm 1's driver for `model`, with --amp's autocast and (float16) loss scaling and torchrun's DDP."""
    amp_dtype = getattr(torch, args.amp_dtype)
    autocast = (lambda: torch.autocast(dist_env.device.type, dtype=amp_dtype)) if args.amp else contextlib.nullcontext
    scaler = torch.amp.GradScaler(dist_env.device.type) if args.amp and amp_dtype == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    return PMPLSearch(model, config, loss_fn=loss_fn, wrap=dist_env.wrap, autocast=autocast, grad_scaler=scaler)


def _restore(search: PMPLSearch, state: Dict, args: argparse.Namespace, log: Callable[..., None]) -> SearchProgress:
    """Put a --resume checkpoint's slots, weights and optimizer states into `search`, and return how far that run
    had got."""
    model = search.model
    if state['num_slots'] != model.num_slots:
        raise SystemExit(f"error: {args.resume!r} has {state['num_slots']} slots, {args.model} has "
                         f'{model.num_slots}; it was made by another version of the model.')
    search.load_state_dict(state['search'], state['state_dict'])
    progress = SearchProgress.from_checkpoint(state)
    if progress.epoch > args.epochs and not search.done:
        raise SystemExit(f'error: --epochs {args.epochs} is fewer than the {progress.epoch} epochs the run being '
                         f'resumed has done; give --epochs {progress.epoch} or more to continue it.')
    log(f'Resumed {args.resume}: epoch {progress.epoch}, {model.num_fixed_slots}/{model.num_slots} slots fixed')
    return progress


def _read_json(path: str) -> Dict:
    with open(path, 'r', encoding='utf-8') as f:
        return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`timm-metapool-search`: parse the command line and run the search."""
    args = build_parser().parse_args(argv)
    run(args, explicit_arg_names(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
