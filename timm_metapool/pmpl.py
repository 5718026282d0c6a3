"""Progressive Meta-Pooling Learning (PMPL), paper Sec. 2.2 and Algorithm 1.

One iteration (`PMPLSearch.step`):
  1. g = grad_theta L_tr(theta, alpha) on a train batch;
  2. theta' = theta - zeta * g;  alpha <- Adam(alpha, grad_alpha L_mt(theta', alpha)) on a meta batch  (Eq. 3);
     theta (and BN statistics) restored exactly;
  3. theta <- SGD(theta, g)  (momentum, weight decay, cosine lr);
  4. progressive early stopping (Eq. 4): every open slot whose softmax(alpha) has a margin >= rho is fixed to its
     argmax, its alpha frozen and its other candidates removed from the network.

With float16 AMP (a GradScaler) an iteration whose scaled weight gradient overflowed is skipped whole, as AMP skips
any such step: g is not finite, so neither the virtual step nor the SGD step can be taken.
"""
import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .mixed_op import MetaPooling
from .search_space import MetaPoolingMixin
from .ops import op_name_of
from .pmpl_setup import InvalidSetting, PMPLConfig, build_optimizers, zero_init_classifier

__all__ = [
    'PMPLConfig', 'InvalidSetting', 'FixEvent', 'StepStats', 'PMPLSearch', 'confident_argmax', 'fix_confident_slots',
    'prune_optimizer', 'build_optimizers', 'zero_init_classifier',
]


def confident_argmax(probabilities: torch.Tensor, rho: float) -> Optional[int]:
    """Eq. 4: k = argmax pi if pi_k - pi_m >= rho for every m != k, else None.

    Algorithm 1's pseudo-code, read literally, also compares k with itself (a margin of 0, never >= rho); this is
    Eq. 4 as the text states it, over the other candidates only.
    """
    k = int(torch.argmax(probabilities))
    others = torch.cat([probabilities[:k], probabilities[k + 1:]])
    margin = probabilities[k] - others.max()
    return k if float(margin) >= rho else None


@dataclass
class FixEvent:
    """A slot fixed by Eq. 4 (or forced to its argmax when the search ran out of epochs)."""
    slot: int
    op_name: str
    step: int
    epoch: int
    probabilities: List[float]
    forced: bool = False


def fix_confident_slots(
        model: MetaPoolingMixin,
        rho: float,
        step: int = 0,
        epoch: int = 0,
        force: bool = False,
) -> List[FixEvent]:
    """Fix every open slot that meets Eq. 4 (every open slot if `force`) to argmax(softmax(alpha))."""
    events = []
    slots = model.enhancer_slots()  # fixing slot i replaces only slots[i]
    for slot in model.open_slots():
        pi = slots[slot].probabilities().detach()
        k = int(torch.argmax(pi)) if force else confident_argmax(pi, rho)
        if k is None:
            continue
        op_name = slots[slot].op_names[k]
        model.fix_slot(slot, op_name)
        events.append(FixEvent(slot, op_name, step, epoch, pi.tolist(), forced=force))
    return events


def prune_optimizer(optimizer: torch.optim.Optimizer, keep: Iterable[nn.Parameter]) -> None:
    """Drop parameters (and their optimizer state) that left the model, keeping state of the rest."""
    keep_ids = {id(p) for p in keep}
    for group in optimizer.param_groups:
        for p in group['params']:
            if id(p) not in keep_ids:
                optimizer.state.pop(p, None)
        group['params'] = [p for p in group['params'] if id(p) in keep_ids]


@dataclass
class StepStats:
    """What one `PMPLSearch.step` did: its losses and correct counts on the train and meta batches, and the slots
    Eq. 4 fixed after it."""
    train_loss: float
    meta_loss: float
    train_correct: int
    meta_correct: int
    batch_size: int
    meta_batch_size: int
    fixed: List[FixEvent] = field(default_factory=list)
    skipped: bool = False  # float16 AMP overflow: nothing was updated and the GradScaler lowered its scale


def _all_reduce_mean(tensors: List[torch.Tensor]) -> None:
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class PMPLSearch:
    """Holds the supernet, its two optimizers and Algorithm 1's state; `step` runs one iteration.

    `wrap` turns the model into the module used for the weight pass (DistributedDataParallel under torchrun); it is
    called again whenever slots are fixed, since fixing removes parameters from the network.
    """

    def __init__(
            self,
            model: MetaPoolingMixin,
            config: PMPLConfig,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.CrossEntropyLoss(),
            wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
            autocast: Callable[[], ContextManager] = contextlib.nullcontext,
            grad_scaler: Optional[torch.amp.GradScaler] = None,
    ):
        if not isinstance(model, MetaPoolingMixin):
            raise TypeError(f'PMPLSearch searches a Meta-Pooling model (timm.create_model(\'mobilenetv2_metapool_*\') '
                            f'after `import timm_metapool`); got {type(model).__name__}.')
        if not isinstance(config, PMPLConfig):
            raise TypeError(f'PMPLSearch takes its settings as a PMPLConfig (e.g. PMPLConfig(lr=0.01)), got '
                            f'{type(config).__name__}.')
        self.model = model
        model.trained_by_pmpl = True  # its train() need not warn that plain training is not PMPL
        self.config = config
        self.loss_fn = loss_fn
        self._wrap = wrap
        self.autocast = autocast
        self.grad_scaler = grad_scaler
        # A slot fixed by MetaPooling.fix beforehand becomes its bare op, recorded as fixed at step 0: the finished
        # model then has its genotype (and that genotype's state_dict keys), and a resume replays the fix.
        self.fix_events: List[FixEvent] = [
            FixEvent(i, slot.chosen, 0, 0, slot.probabilities().detach().tolist())
            for i, slot in enumerate(model.enhancer_slots()) if isinstance(slot, MetaPooling) and slot.is_fixed]
        for event in self.fix_events:
            model.fix_slot(event.slot, event.op_name)
        self.weight_optimizer, self.arch_optimizer = build_optimizers(model, config)
        self._freeze_alpha()  # alpha gets gradients only in the meta pass, so the weight pass never syncs them
        self.train_module = wrap(model)

    @property
    def lr(self) -> float:
        return self.weight_optimizer.param_groups[0]['lr']

    @property
    def done(self) -> bool:
        return not self.model.open_slots()

    def _freeze_alpha(self) -> None:
        for alpha in self.model.arch_parameters():
            alpha.requires_grad_(False)

    def step(self, train_batch: Tuple[torch.Tensor, torch.Tensor], meta_batch: Tuple[torch.Tensor, torch.Tensor],
             step: int = 0, epoch: int = 0) -> StepStats:
        """Algorithm 1, one iteration; `step` and `epoch` are recorded in the fix events it makes (`run_pmpl` passes
        the steps done, this one included, and the 1-based epoch)."""
        train_loss, train_correct = self.weight_gradient(*train_batch)            # g = grad_theta L_tr
        if self.weight_gradient_overflowed():
            self.update_weights()  # the GradScaler skips the SGD step and lowers its scale
            return StepStats(train_loss, float('nan'), train_correct, 0, len(train_batch[1]), 0, skipped=True)
        meta_loss, meta_correct = self.update_alpha(*meta_batch)                   # Eq. 3 outer step
        self.update_weights()                                                      # theta <- theta - zeta g
        fixed = self.apply_early_stopping(step, epoch) if self.config.early_stop else []  # Eq. 4
        return StepStats(train_loss, meta_loss, train_correct, meta_correct, len(train_batch[1]),
                         len(meta_batch[1]), fixed)

    def weight_gradient(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[float, int]:
        """Fill `.grad` of the weights with g = grad_theta L_tr(theta, alpha) (synchronised across ranks by DDP)."""
        self.model.train()
        self.weight_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.train_module(images)
            loss = self.loss_fn(logits, targets)
        _check_finite(loss, 'train')
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.weight_optimizer)  # the virtual step needs the true g
        else:
            loss.backward()
        return float(loss.detach()), int((logits.detach().argmax(-1) == targets).sum())

    def weight_gradient_overflowed(self) -> bool:
        """Whether float16 AMP's scaled backward overflowed, leaving g not finite (never without a GradScaler)."""
        if self.grad_scaler is None:
            return False
        grads = [p.grad for p in self.model.weight_parameters() if p.grad is not None]
        return not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def update_alpha(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[float, int]:
        """Eq. 3: an Adam step on alpha with grad_alpha L_mt(theta', alpha) on a meta batch, at the virtual weights
        theta' = theta - zeta * g; theta and the BN statistics are as before afterwards."""
        alphas = self.model.arch_parameters()
        if not alphas:
            return float('nan'), 0
        with self._at_virtual_step():
            for alpha in alphas:
                alpha.requires_grad_(True)
            with self.autocast():
                logits = self.model(images)
                loss = self.loss_fn(logits, targets)
            _check_finite(loss, 'meta')
            # Under float16 AMP the meta loss is scaled like the train loss, so small gradients do not underflow.
            grads = torch.autograd.grad(loss if self.grad_scaler is None else self.grad_scaler.scale(loss), alphas)
        self._step_alpha(alphas, grads)
        return float(loss.detach()), int((logits.detach().argmax(-1) == targets).sum())

    @contextlib.contextmanager
    def _at_virtual_step(self) -> Iterator[None]:
        """Move the weights to theta' = theta - zeta * g for the meta pass (not with `first_order`, which takes the
        alpha gradient at theta), then put theta, the BN statistics the pass moved and alpha's frozen state back."""
        weights = [] if self.config.first_order else [p for p in self.model.weight_parameters() if p.grad is not None]
        saved_weights = [p.detach().clone() for p in weights]
        saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        try:
            if weights:
                with torch.no_grad():
                    torch._foreach_add_(weights, [p.grad for p in weights], alpha=-self.lr)
            yield
        finally:
            self._freeze_alpha()
            with torch.no_grad():
                for p, saved in zip(weights, saved_weights):
                    p.copy_(saved)
                for b, saved in zip(self.model.buffers(), saved_buffers):
                    b.copy_(saved)

    def _step_alpha(self, alphas: List[nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
        """Adam on alpha with `grads`, averaged over the ranks first (every rank takes the same step, hence makes the
        same Eq. 4 decisions); through the GradScaler with float16, which skips the step on an overflow."""
        grads = [g.float() for g in grads]
        _all_reduce_mean(grads)
        if self.grad_scaler is None and not all(torch.isfinite(g).all() for g in grads):
            cause = ('the weights have diverged; lower the weights\' lr (PMPLConfig.lr, --lr) or raise the batch '
                     'size' if self.config.first_order else
                     'the virtual step theta - zeta * g overflowed the network, or the weights have diverged; lower '
                     'the weights\' lr zeta (PMPLConfig.lr, --lr), raise the batch size, or use first_order '
                     '(--first-order)')
            raise FloatingPointError(f'The gradient of alpha is not finite: {cause}. The last good checkpoint (if '
                                     f'any) is kept untouched.')
        for alpha, g in zip(alphas, grads):
            alpha.grad = g.to(alpha.dtype)
        if self.grad_scaler is None:
            self.arch_optimizer.step()
        else:  # unscales; an overflow skips this Adam step and lowers the scale at the iteration's `update`
            self.grad_scaler.step(self.arch_optimizer)
        self.arch_optimizer.zero_grad(set_to_none=True)

    def update_weights(self) -> None:
        """The SGD step on theta with the gradient `weight_gradient` left (through the GradScaler with float16)."""
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.weight_optimizer)
            self.grad_scaler.update()
        else:
            self.weight_optimizer.step()

    def apply_early_stopping(self, step: int, epoch: int, force: bool = False) -> List[FixEvent]:
        """Eq. 4 on every open slot; fixed slots leave both optimizers and the weight-pass wrapper is rebuilt."""
        events = fix_confident_slots(self.model, self.config.rho, step=step, epoch=epoch, force=force)
        if events:
            self.fix_events.extend(events)
            self._prune_optimizers()
            self.train_module = self._wrap(self.model)
        return events

    def _prune_optimizers(self) -> None:
        """Drop the parameters that fixed slots removed from both optimizers, in place (the same objects stay)."""
        prune_optimizer(self.weight_optimizer, self.model.weight_parameters())
        prune_optimizer(self.arch_optimizer, self.model.arch_parameters())

    def state_dict(self) -> Dict:
        """Optimizer and fixing state; the model's own state_dict is saved beside it."""
        return {
            'weight_optimizer': self.weight_optimizer.state_dict(),
            'arch_optimizer': self.arch_optimizer.state_dict(),
            'fix_events': [asdict(e) for e in self.fix_events],
            'grad_scaler': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
        }

    def load_state_dict(self, state: Dict, model_state_dict: Dict[str, torch.Tensor]) -> None:
        """Re-apply the recorded fixes to a fresh supernet, then load weights, alpha and optimizer state.

        The optimizers stay the same objects (pruned as the fixes remove parameters), so a learning-rate scheduler
        built on `weight_optimizer` before the resume keeps driving it.
        """
        self.fix_events = [FixEvent(**e) for e in state['fix_events']]
        for event in self.fix_events:
            if not 0 <= event.slot < self.model.num_slots:
                raise ValueError(f'The search state fixes slot {event.slot}, but this model has {self.model.num_slots} '
                                 f'slots: it belongs to another model.')
            slot = self.model.enhancer_slots()[event.slot]
            if isinstance(slot, MetaPooling):
                self.model.fix_slot(event.slot, event.op_name)
            elif op_name_of(slot) != event.op_name:  # fixed before the search (MetaPooling.fix): the same op only
                raise ValueError(f'The checkpoint has slot {event.slot} fixed to {event.op_name!r}, but this model has '
                                 f'it fixed to {op_name_of(slot)!r}: resume on the supernet the search started from.')
        self.model.load_state_dict(model_state_dict)
        self._prune_optimizers()
        self.weight_optimizer.load_state_dict(state['weight_optimizer'])
        self.arch_optimizer.load_state_dict(state['arch_optimizer'])
        if self.grad_scaler is not None and state.get('grad_scaler'):
            self.grad_scaler.load_state_dict(state['grad_scaler'])
        self._freeze_alpha()
        self.train_module = self._wrap(self.model)

    def apply_config(self, config: PMPLConfig) -> List[str]:
        """Make `config` the settings in force, optimizers included: after `load_state_dict` they hold the saved
        run's lr, momentum and weight decays (the weight lr as the scheduler's base, `initial_lr`). Returns one
        'name old -> new' line per setting that changed."""
        weight_group, arch_group = self.weight_optimizer.param_groups[0], self.arch_optimizer.param_groups[0]
        in_force = dict(lr=weight_group.get('initial_lr', weight_group['lr']), momentum=weight_group['momentum'],
                        weight_decay=weight_group['weight_decay'], arch_lr=arch_group['lr'],
                        arch_weight_decay=arch_group['weight_decay'], rho=self.config.rho)
        changes = [f'{name} {old} -> {getattr(config, name)}' for name, old in in_force.items()
                   if old != getattr(config, name)]
        for group in self.weight_optimizer.param_groups:
            group.update(momentum=config.momentum, weight_decay=config.weight_decay)
            if in_force['lr'] != config.lr:
                # The restored lr is a point on the old schedule: rescaled, a scheduler that steps from it (PyTorch's
                # own) goes on from the same point of the new one.
                group['lr'] *= config.lr / in_force['lr']
                if 'initial_lr' in group:
                    group['initial_lr'] = config.lr
        for group in self.arch_optimizer.param_groups:
            group.update(lr=config.arch_lr, weight_decay=config.arch_weight_decay)
        self.config = config
        return changes


def _check_finite(loss: torch.Tensor, which: str) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(
            f'The {which} loss is {float(loss.detach())}: training diverged. Lower the weights\' or alpha\'s lr '
            f'(PMPLConfig.lr / arch_lr, --lr / --arch-lr), or disable AMP. '
            f'The last good checkpoint (if any) is kept untouched.')
