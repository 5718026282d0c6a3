"""run_pmpl, the outer loop of Algorithm 1: pairing of train and meta batches, callbacks, the budget, forcing."""
import pytest
import timm
import torch

import timm_metapool  # noqa: F401
from timm_metapool.pmpl import PMPLConfig, PMPLSearch
from timm_metapool.pmpl_loop import run_pmpl

MODEL = 'mobilenetv2_metapool_035'


def _batches(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 48, 48, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


def test_runs_the_budget_pairs_batches_and_forces_the_open_slots():
    torch.manual_seed(0)
    supernet = timm.create_model(MODEL, num_classes=3)
    search = PMPLSearch(supernet, PMPLConfig(lr=0.01, rho=1.0))  # rho 1: Eq. 4 cannot fire, the budget ends it
    train, meta = _batches(3, 0), _batches(2, 1)
    seen_meta, steps, ends = [], [], []
    original_step = search.step

    def step(train_batch, meta_batch, step=0, epoch=0):
        seen_meta.append(next(i for i, b in enumerate(meta) if b[0] is meta_batch[0]))
        return original_step(train_batch, meta_batch, step=step, epoch=epoch)

    search.step = step
    result = run_pmpl(search, train, meta, epochs=2, before_step=steps.append,
                      on_epoch_end=lambda epoch, step, totals: ends.append((epoch, step, totals.steps, totals.n)))
    assert steps == list(range(6))
    assert seen_meta == [0, 1, 0, 0, 1, 0]  # the meta loader restarts within an epoch and anew each epoch
    assert ends == [(1, 3, 3, 24), (2, 6, 3, 24)]
    assert (result.epochs, result.global_step) == (2, 6)
    assert sorted(e.slot for e in result.forced) == list(range(supernet.num_slots))
    assert all(e.forced for e in result.forced) and supernet.genotype is not None


def test_a_search_with_every_slot_fixed_takes_no_step():
    supernet = timm.create_model(MODEL, num_classes=3)
    supernet.fix_to_genotype('avg3')
    result = run_pmpl(PMPLSearch(supernet, PMPLConfig()), _batches(2, 0), _batches(2, 1), epochs=3)
    assert (result.epochs, result.global_step, result.forced) == (0, 0, [])


def test_resumed_counters_continue():
    torch.manual_seed(0)
    search = PMPLSearch(timm.create_model(MODEL, num_classes=3), PMPLConfig(lr=0.01, rho=1.0))
    steps = []
    result = run_pmpl(search, _batches(2, 0), _batches(2, 1), epochs=3, start_epoch=2, start_step=4,
                      before_step=steps.append)
    assert steps == [4, 5] and (result.epochs, result.global_step) == (3, 6)


def test_fix_events_count_steps_and_epochs_as_the_callbacks_do():
    torch.manual_seed(0)
    supernet = timm.create_model(MODEL, num_classes=3)
    search = PMPLSearch(supernet, PMPLConfig(lr=0.01, arch_lr=0.5, rho=0.3))
    logged = []
    result = run_pmpl(search, _batches(3, 0), _batches(2, 1), epochs=2,
                      on_step=lambda step, epoch, stats, totals: logged.extend((step, epoch + 1, e.slot)
                                                                             for e in stats.fixed))
    by_eq4 = [(e.step, e.epoch, e.slot) for e in search.fix_events if not e.forced]
    assert by_eq4 and by_eq4 == logged  # the steps done (1..6) and the 1-based epoch the callbacks see
    assert all(1 <= step <= 6 and epoch in (1, 2) for step, epoch, _ in by_eq4)
    assert all((e.step, e.epoch) == (6, 2) for e in result.forced)


def test_a_run_to_be_continued_leaves_its_open_slots_open():
    search = PMPLSearch(timm.create_model(MODEL, num_classes=3), PMPLConfig(lr=0.01, rho=1.0))
    result = run_pmpl(search, _batches(2, 0), _batches(2, 1), epochs=1, force_at_end=False)
    assert result.forced == [] and search.model.genotype is None
    assert len(search.model.open_slots()) == search.model.num_slots


@pytest.mark.parametrize('train, meta, epochs, start_epoch, message', [
    (2, 0, 1, 0, 'meta loader gave no batch'),
    (0, 2, 1, 0, 'train loader gave no batch in epoch 1'),
    (2, 2, 0, 0, 'epochs >= 1'),
    (2, 2, 2, 3, 'start_epoch <= epochs'),
])
def test_a_run_that_could_only_force_untrained_alpha_is_refused(train, meta, epochs, start_epoch, message):
    search = PMPLSearch(timm.create_model(MODEL, num_classes=3), PMPLConfig(lr=0.01))
    with pytest.raises(ValueError, match=message):
        run_pmpl(search, _batches(train, 0), _batches(meta, 1), epochs=epochs, start_epoch=start_epoch)
    assert search.model.genotype is None  # nothing was forced
