"""PMPL (Algorithm 1, Eq. 3, Eq. 4) against hand computations and independent re-implementations of each step."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import timm

from timm_metapool import OP_NAMES
from timm_metapool.pmpl import (
    InvalidSetting, PMPLConfig, PMPLSearch, confident_argmax, fix_confident_slots, zero_init_classifier,
)


def softmax_by_hand(alpha):
    exps = [math.exp(a) for a in alpha]
    return [e / sum(exps) for e in exps]


def alpha_with_margin(k: int, margin: float, n: int = len(OP_NAMES)):
    """Logits whose softmax puts pi_k exactly `margin` above every other (equal) probability."""
    # pi_k = (1 + (n-1) m) / n ... solve e^d / (e^d + n - 1) - 1 / (e^d + n - 1) = margin for d
    d = math.log((1 + margin * (n - 1)) / (1 - margin))
    alpha = [0.0] * n
    alpha[k] = d
    return alpha


@pytest.mark.parametrize('k', [0, 3, 6])
def test_eq4_fix_and_no_fix_around_the_threshold(k):
    rho = 0.2
    above = alpha_with_margin(k, 0.21)
    below = alpha_with_margin(k, 0.19)
    pi_above, pi_below = softmax_by_hand(above), softmax_by_hand(below)
    assert min(pi_above[k] - p for m, p in enumerate(pi_above) if m != k) == pytest.approx(0.21)
    assert min(pi_below[k] - p for m, p in enumerate(pi_below) if m != k) == pytest.approx(0.19)
    assert confident_argmax(torch.tensor(pi_above), rho) == k
    assert confident_argmax(torch.tensor(pi_below), rho) is None


def test_eq4_uses_the_runner_up_not_the_mean():
    # pi_k leads the mean by far but the runner-up by only 0.1: Eq. 4 takes the min over all m != k.
    pi = torch.tensor([0.05, 0.45, 0.35, 0.05, 0.025, 0.025, 0.025, 0.025])
    assert confident_argmax(pi, 0.2) is None
    assert confident_argmax(pi, 0.1 - 1e-6) == 1


def test_eq4_ties_never_fix():
    pi = torch.tensor([0.4, 0.4, 0.2 / 6, 0.2 / 6, 0.2 / 6, 0.2 / 6, 0.2 / 6, 0.2 / 6])
    assert confident_argmax(pi, 1e-6) is None


def test_fix_confident_slots_picks_the_argmax_of_each_slot():
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
    plan = {0: (5, 0.3), 1: (2, 0.1), 2: (7, 0.25), 5: (1, 0.5)}  # slot: (argmax, margin)
    with torch.no_grad():
        for i, slot in enumerate(model.enhancer_slots()):
            k, margin = plan.get(i, (i % len(OP_NAMES), 0.0))
            slot.arch_alpha.copy_(torch.tensor(alpha_with_margin(k, margin)))
    events = fix_confident_slots(model, rho=0.2, step=7, epoch=1)
    assert [(e.slot, e.op_name) for e in events] == [(0, OP_NAMES[5]), (2, OP_NAMES[7]), (5, OP_NAMES[1])]
    assert [model.derive_genotype()[i] for i in (0, 2, 5)] == [OP_NAMES[5], OP_NAMES[7], OP_NAMES[1]]
    assert model.open_slots() == [i for i in range(model.num_slots) if i not in (0, 2, 5)]
    assert all(e.step == 7 and e.epoch == 1 and not e.forced for e in events)
    forced = fix_confident_slots(model, rho=0.2, force=True)
    assert model.genotype is not None and all(e.forced for e in forced)
    assert model.genotype[1] == OP_NAMES[2]  # forced slots take their argmax too


def _batch(seed, n=8, size=64, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _search(first_order=False, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.05)
    return PMPLSearch(model, PMPLConfig(lr=0.01, first_order=first_order))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('first_order', [False, True])
def test_alpha_gradient_is_taken_at_the_virtual_step_and_theta_is_restored(first_order):
    search = _search(first_order)
    model = search.model
    # Plain SGD with lr 1 on alpha so the applied gradient can be read back from the change in alpha.
    search.arch_optimizer = torch.optim.SGD(model.arch_parameters(), lr=1.0)
    train, meta = _batch(1), _batch(2)

    reference = copy.deepcopy(model)
    search.weight_gradient(*train)
    before = _state(model)
    g = {n: p.grad.detach().clone() for n, p in model.named_weight_parameters() if p.grad is not None}
    alpha_before = [a.detach().clone() for a in model.arch_parameters()]
    search.update_alpha(*meta)

    after = _state(model)
    for key in before:
        if not key.endswith('arch_alpha'):
            assert torch.equal(before[key], after[key]), f'{key} not restored exactly'
    applied = [b - a.detach() for a, b in zip(model.arch_parameters(), alpha_before)]

    # Independent: theta' = theta - zeta * g on a copy (g itself is checked in the next test), then autograd of the
    # meta loss with respect to alpha at theta'.
    reference.load_state_dict(before)
    reference.train()
    with torch.no_grad():
        if not first_order:
            for name, p in reference.named_weight_parameters():
                if name in g:
                    p.add_(g[name], alpha=-0.01)
    ref_alphas = [a.requires_grad_(True) for a in reference.arch_parameters()]
    expected = torch.autograd.grad(F.cross_entropy(reference(meta[0]), meta[1]), ref_alphas)
    for got, want in zip(applied, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(w.abs().sum() > 0 for w in expected)
    if not first_order:  # the virtual step matters: the gradient at theta itself is measurably different
        reference.load_state_dict(before)
        at_theta = torch.autograd.grad(F.cross_entropy(reference(meta[0]), meta[1]), ref_alphas)
        assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(at_theta, expected)) > 1e-2


def test_weight_update_uses_the_train_gradient_only():
    search = _search()
    model = search.model
    reference = copy.deepcopy(model)
    train, meta = _batch(3), _batch(4)
    search.step(train, meta)

    reference.train()
    weights = [p for n, p in reference.named_parameters() if not n.endswith('arch_alpha')]
    for a in reference.arch_parameters():
        a.requires_grad_(False)
    sgd = torch.optim.SGD(weights, lr=0.01, momentum=0.9, weight_decay=4e-5)
    F.cross_entropy(reference(train[0]), train[1]).backward()
    sgd.step()
    ours = dict(model.named_weight_parameters())
    for name, p in reference.named_weight_parameters():
        torch.testing.assert_close(ours[name], p, rtol=1e-5, atol=1e-7)
    # BN running statistics moved by the train batch only (the meta pass is undone).
    theirs = dict(reference.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, theirs[name])


def test_fixing_removes_work_from_network_and_optimizers():
    search = _search()
    model = search.model
    with torch.no_grad():
        for slot in model.enhancer_slots()[:3]:
            slot.arch_alpha.copy_(torch.tensor(alpha_with_margin(1, 0.5)))
    events = search.apply_early_stopping(step=0, epoch=0)
    assert [e.slot for e in events] == [0, 1, 2] and all(e.op_name == 'global' for e in events)
    live = {id(p) for p in model.parameters()}
    in_sgd = [p for g in search.weight_optimizer.param_groups for p in g['params']]
    in_adam = [p for g in search.arch_optimizer.param_groups for p in g['params']]
    assert {id(p) for p in in_sgd} == {id(p) for p in model.weight_parameters()} and {id(p) for p in in_sgd} <= live
    assert len(in_adam) == model.num_slots - 3
    search.step(_batch(5), _batch(6))  # keeps running on the smaller network


def test_non_finite_loss_stops_with_a_clear_error():
    search = _search()
    images, targets = _batch(7)
    images[0, 0, 0, 0] = float('nan')
    before = {n: p.detach().clone() for n, p in search.model.named_parameters()}
    with pytest.raises(FloatingPointError, match='train loss is nan'):
        search.step((images, targets), _batch(8))
    for name, p in search.model.named_parameters():  # no update was applied
        assert torch.equal(p, before[name]), name


def test_float16_overflow_skips_the_whole_iteration():
    """float16 AMP: an iteration whose scaled weight gradient overflows changes no weight and no alpha (a virtual
    step along a non-finite g would poison the meta pass) and the GradScaler lowers its scale; the next iteration,
    at the lower scale, updates both."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 100, backoff_factor=2.0 ** -100)  # 2^100 overflows
    search = PMPLSearch(model, PMPLConfig(lr=0.01), grad_scaler=scaler,
                        autocast=lambda: torch.autocast('cpu', dtype=torch.float16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = search.step(_batch(1), _batch(2))
    assert stats.skipped and math.isnan(stats.meta_loss) and stats.meta_batch_size == 0
    assert scaler.get_scale() == 1.0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    stats = search.step(_batch(3), _batch(4))
    assert not stats.skipped and math.isfinite(stats.meta_loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith('arch_alpha') for n in changed) and any(not n.endswith('arch_alpha') for n in changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_init_classifier_starts_the_search_at_uniform_class_probabilities():
    """The first step's train loss is ln C exactly (every logit 0), where timm's classifier init is far from it."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
    timm_init_loss = PMPLSearch(copy.deepcopy(model), PMPLConfig(lr=0.01)).step(_batch(1), _batch(2)).train_loss
    zero_init_classifier(model)
    stats = PMPLSearch(model, PMPLConfig(lr=0.01)).step(_batch(1), _batch(2))
    assert stats.train_loss == pytest.approx(math.log(4), abs=1e-6)
    assert abs(timm_init_loss - math.log(4)) > 0.5
    assert model.get_classifier().weight.abs().sum() > 0  # the classifier then learns from the first step
    with pytest.raises(TypeError, match='num_classes=0 has none'):
        zero_init_classifier(timm.create_model('mobilenetv2_metapool_035', num_classes=0))


def test_search_refuses_a_model_without_enhancer_slots():
    with pytest.raises(TypeError, match="Meta-Pooling model.*mobilenetv2_metapool_.*got EfficientNet"):
        PMPLSearch(timm.create_model('mobilenetv2_100'), PMPLConfig())


def test_config_rejects_out_of_range_settings():
    with pytest.raises(ValueError, match=r'rho must be in \(0, 1\]'):
        PMPLConfig(rho=0.0)
    with pytest.raises(ValueError, match='rho'):
        PMPLConfig(rho=1.5)
    # Before the optimizers exist: torch.optim would only refuse these once a run had loaded its data.
    for name, value in (('lr', 0.0), ('arch_lr', float('nan')), ('momentum', 1.0), ('momentum', -0.1),
                        ('weight_decay', -1e-5), ('arch_weight_decay', -1.0)):
        with pytest.raises(InvalidSetting, match=f'^{name} must be') as info:
            PMPLConfig(**{name: value})
        assert info.value.name == name
    PMPLConfig(momentum=0.0, weight_decay=0.0, arch_weight_decay=0.0, rho=1.0)
    # Types and infinities, which comparisons let through or fail on with a bare TypeError.
    for name, value, rule in (('lr', '0.1', 'a finite number'), ('lr', None, 'a finite number'),
                              ('lr', True, 'a finite number'), ('weight_decay', float('inf'), 'a finite number'),
                              ('arch_lr', float('inf'), 'a finite number'), ('first_order', 'no', 'True or False')):
        with pytest.raises(InvalidSetting, match=f'^{name} must be {rule}, got {value!r}'):
            PMPLConfig(**{name: value})
    with pytest.raises(TypeError, match='settings as a PMPLConfig .* got dict'):
        PMPLSearch(timm.create_model('mobilenetv2_metapool_035'), dict(lr=0.1))


def test_slot_fixed_by_its_metapooling_before_the_search_ends_in_the_genotype():
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
    model.enhancer_slots()[5].fix(OP_NAMES.index('global'))
    search = PMPLSearch(model, PMPLConfig(lr=0.01))
    assert [(e.slot, e.op_name) for e in search.fix_events] == [(5, 'global')]
    search.step(_batch(1), _batch(2))
    search.apply_early_stopping(1, 0, force=True)
    assert search.done and model.genotype is not None and model.genotype[5] == 'global'
    fresh = timm.create_model('mobilenetv2_metapool_035', num_classes=4, genotype=model.genotype)
    fresh.load_state_dict(model.state_dict())  # strict: the keys of the genotype's model


def test_resume_on_a_model_with_the_same_slot_fixed_beforehand():
    def prefixed_search(op_name):
        torch.manual_seed(0)
        model = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
        model.enhancer_slots()[5].fix(OP_NAMES.index(op_name))
        return PMPLSearch(model, PMPLConfig(lr=0.01))

    search = prefixed_search('global')
    search.step(_batch(1), _batch(2))
    saved, weights = copy.deepcopy(search.state_dict()), _state(search.model)
    resumed = prefixed_search('global')
    resumed.load_state_dict(saved, weights)
    assert [(e.slot, e.op_name) for e in resumed.fix_events] == [(5, 'global')]
    assert all(torch.equal(v, _state(resumed.model)[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="slot 5 fixed to 'global'.*fixed to 'avg3'"):
        prefixed_search('avg3').load_state_dict(saved, weights)


def test_resume_with_the_same_settings_keeps_the_schedules_position():
    """apply_config after a resume leaves the lr where the schedule had it: PyTorch's schedulers step from it."""
    def scheduled_search(seed):
        search = _search(seed=seed)
        return search, torch.optim.lr_scheduler.CosineAnnealingLR(search.weight_optimizer, T_max=8)

    search, scheduler = scheduled_search(0)
    for step in range(3):
        search.step(_batch(step), _batch(step + 10))
        scheduler.step()
    saved, weights, saved_scheduler = copy.deepcopy(search.state_dict()), _state(search.model), scheduler.state_dict()
    resumed, resumed_scheduler = scheduled_search(1)
    resumed.load_state_dict(saved, weights)
    resumed_scheduler.load_state_dict(saved_scheduler)
    assert resumed.apply_config(search.config) == []
    lrs, resumed_lrs = [], []
    for s, sched, out in ((search, scheduler, lrs), (resumed, resumed_scheduler, resumed_lrs)):
        for _ in range(3):
            out.append(s.lr)
            sched.step()
    assert lrs[0] < search.config.lr and resumed_lrs == lrs
    # A new lr continues the same point of the new schedule.
    again, again_scheduler = scheduled_search(1)
    again.load_state_dict(saved, weights)
    again_scheduler.load_state_dict(saved_scheduler)
    halved = dataclasses.replace(search.config, lr=search.config.lr / 2)
    assert again.apply_config(halved) == [f'lr {search.config.lr} -> {halved.lr}']
    assert again.lr == pytest.approx(lrs[0] / 2)


def test_resume_keeps_the_optimizer_objects_and_continues_exactly():
    """A scheduler built on the weight optimizer before the resume keeps driving the one the search uses."""
    search = _search()
    with torch.no_grad():
        search.model.enhancer_slots()[2].arch_alpha.copy_(torch.tensor(alpha_with_margin(3, 0.5)))
    search.step(_batch(1), _batch(2))
    saved, weights = copy.deepcopy(search.state_dict()), _state(search.model)  # as if through torch.save

    resumed = _search(seed=1)
    optimizer = resumed.weight_optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    resumed.load_state_dict(saved, weights)
    assert resumed.weight_optimizer is optimizer and scheduler.optimizer is resumed.weight_optimizer
    for group in resumed.weight_optimizer.param_groups:
        group['lr'] = search.lr  # the saved lr, as the CLI's scheduler sets it each step
    for s in (search, resumed):
        s.step(_batch(3), _batch(4))
    after, after_resumed = _state(search.model), _state(resumed.model)
    assert after.keys() == after_resumed.keys() and all(torch.equal(after[k], after_resumed[k]) for k in after)
