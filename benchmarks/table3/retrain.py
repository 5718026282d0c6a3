"""One retrain of the queue: an arm and seed trained from scratch with the recipe, resumable per epoch."""
import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

from train_hooks.distributed import seed_everything

from .data import make_loaders, memory_format
from .models import build_model
from .plan import ARMS, COMMAND, RECIPE, RESULTS_DIR, SHIPPED_RUN, TEST_IMAGES, Task
from .results import environment, resolve_genotype


def evaluate(model: torch.nn.Module, loader) -> Tuple[float, float]:
    """Top-1 (%) and mean cross-entropy on `loader`."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for images, targets in loader:
            logits = model(memory_format(images))
            loss_sum += float(F.cross_entropy(logits, targets, reduction='sum'))
            correct += int((logits.argmax(-1) == targets).sum())
            total += len(targets)
    return 100.0 * correct / total, loss_sum / total


def train_epoch(model, loader, optimizer, scheduler, epoch: int) -> Dict[str, float]:
    model.train()
    steps = len(loader)
    loss_sum, correct, total = 0.0, 0, 0
    for step, (images, targets) in enumerate(loader):
        scheduler.step_update(epoch * steps + step)
        logits = model(memory_format(images))
        loss = F.cross_entropy(logits, targets, label_smoothing=RECIPE.smoothing)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f'train loss is {value} at epoch {epoch + 1}, step {step}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += value * len(targets)
        correct += int((logits.detach().argmax(-1) == targets).sum())
        total += len(targets)
    return dict(train_loss=loss_sum / total, train_top1=100.0 * correct / total, lr=optimizer.param_groups[0]['lr'])


def retrain(task: Task, data_root: str, work_dir: str, compile_model: bool = True) -> Tuple[torch.nn.Module, Dict]:
    """Train `task`'s arm from scratch with RECIPE, resuming from its per-epoch checkpoint in `work_dir`; returns the
    trained model and the result record.

    With `compile_model` the steps run through `torch.compile` (static shapes): the same fp32 computation, fused, so
    the recipe is unchanged; each epoch row records whether it was compiled."""
    arm = ARMS[task.name]
    genotype = resolve_genotype(arm, task.seed)
    seed_everything(task.seed)
    model = build_model(genotype, arm.attention)
    if RECIPE.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model, dynamic=False) if compile_model else model  # `model` keeps the plain state_dict keys
    train_loader, test_loader = make_loaders(data_root)
    steps = len(train_loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum,
                                weight_decay=RECIPE.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=RECIPE.epochs * steps, warmup_t=RECIPE.warmup_epochs * steps,
                                  warmup_lr_init=RECIPE.lr * 0.01, lr_min=0.0, t_in_epochs=False)
    checkpoint = os.path.join(work_dir, 'checkpoints', f'{task.run_id}.pth')
    state = dict(epoch=0, history=[], train_time_s=0.0, eval_time_s=0.0)
    if os.path.exists(checkpoint):
        saved = torch.load(checkpoint, map_location='cpu', weights_only=False)
        if saved['recipe'] == dataclasses.asdict(RECIPE) and saved['genotype'] == genotype:
            model.load_state_dict(saved['model'])
            optimizer.load_state_dict(saved['optimizer'])
            state = saved['state']
            print(f'  resumed {task.run_id} after epoch {state["epoch"]}', flush=True)
    load_start = os.getloadavg()[0]
    while state['epoch'] < RECIPE.epochs:
        epoch = state['epoch']
        seed_everything(task.seed * 1000 + epoch)  # shuffling and augmentation of an epoch survive a resume
        epoch_start = time.time()
        row = train_epoch(net, train_loader, optimizer, scheduler, epoch)
        eval_start = time.time()
        row['test_top1'], row['test_loss'] = evaluate(net, test_loader)
        state['train_time_s'] += eval_start - epoch_start
        state['eval_time_s'] += time.time() - eval_start
        row.update(epoch=epoch + 1, train_time_s=round(eval_start - epoch_start, 1),
                   eval_time_s=round(time.time() - eval_start, 1), load_avg_1m=os.getloadavg()[0],
                   elapsed_s=round(state['train_time_s'] + state['eval_time_s'], 1), compiled=compile_model)
        state['history'].append(row)
        state['epoch'] = epoch + 1
        print(f"  {task.run_id} epoch {epoch + 1}/{RECIPE.epochs}: train loss {row['train_loss']:.4f} top1 "
              f"{row['train_top1']:.2f} | test top1 {row['test_top1']:.2f} | lr {row['lr']:.4f} | "
              f"{row['elapsed_s']:.0f}s so far", flush=True)
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        torch.save(dict(recipe=dataclasses.asdict(RECIPE), genotype=genotype, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), state=state), checkpoint + '.tmp')
        os.replace(checkpoint + '.tmp', checkpoint)
    final = state['history'][-1]
    return model, dict(
        kind='retrain', arm=arm.name, label=arm.label, seed=task.seed, genotype=genotype, attention=arm.attention,
        recipe=dataclasses.asdict(RECIPE), command=f'{COMMAND}  (queue entry {task.run_id})',
        top1=final['test_top1'], epochs=state['history'],
        train_time_s=round(state['train_time_s'], 1), eval_time_s=round(state['eval_time_s'], 1),
        image_passes=dict(train_fwd_bwd=RECIPE.epochs * steps * RECIPE.batch_size,
                          test_fwd=RECIPE.epochs * TEST_IMAGES),
        environment=environment(load_start), checkpoint=checkpoint,
    )


def shipped_run_weights() -> str:
    return os.path.join(RESULTS_DIR, 'weights', f'{SHIPPED_RUN[0]}_seed{SHIPPED_RUN[1]}.safetensors')


def export_shipped_run(model: torch.nn.Module) -> str:
    """The final weights of the run that ships as the pretrained tag, exported with the package's `export_for_hub`
    (genotype and checksum in the metadata) into the results, so that they are committed with the run: the
    checkpoint in the work dir does not outlive the machine. `ship_fashion_mnist_weights.py` registers them."""
    from timm_metapool.hub import export_for_hub
    out = shipped_run_weights()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        export = export_for_hub(model.eval(), os.path.join(tmp, 'export'), model_name=RECIPE.model)
        shutil.copyfile(export / 'model.safetensors', out + '.tmp')
    os.replace(out + '.tmp', out)
    return out
