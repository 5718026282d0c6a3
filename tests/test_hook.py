"""add_meta_pooling and the families registered through it, against timm's own models (paper Sec. 2.1, Eq. 1)."""
import copy

import pytest
import safetensors.torch
import torch
import timm
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite, UniversalInvertedResidual
from timm.utils.model import reparameterize_model

from timm_metapool import Genotype, MetaPooling, MetaPoolingMixin, add_meta_pooling
from timm_metapool.base_weights import load_base_weights
from timm_metapool.data import DEMO_CLASSES, generate_demo_dataset
from timm_metapool.deploy import ProjectionAvgPool
from timm_metapool.families import METAPOOL_FAMILIES
from timm_metapool.hub import export_for_hub
from timm_metapool.integrity import GENOTYPE_STATE_KEY, GenotypeMismatchError
from timm_metapool.pmpl import PMPLConfig, PMPLSearch
from train_hooks.search import main

# One width of MobileNetV2 (test_models.py covers the others) and every other family.
FAMILIES = ['mobilenetv2_metapool_035'] + [n for n in METAPOOL_FAMILIES if not n.startswith('mobilenetv2_')]
WITH_SE = ['mobilenetv3_large_metapool_100', 'mobilenetv3_small_metapool_100', 'efficientnet_b0_metapool']
NUM_CLASSES = 5


def _x(batch: int = 2, size: int = 32, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN affine and statistics, so a block whose layers ran in another order would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _base(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(METAPOOL_FAMILIES[name], num_classes=NUM_CLASSES, **kwargs)


def test_families_are_registered_under_one_scheme():
    names = timm.list_models('*metapool*')
    assert set(METAPOOL_FAMILIES) == set(names)
    for name, base in METAPOOL_FAMILIES.items():
        assert timm.is_model(base)
        width = base.rsplit('_', 1)[-1]
        expected = base.replace(f'_{width}', f'_metapool_{width}') if width[:3].isdigit() else f'{base}_metapool'
        assert name == expected


@pytest.mark.parametrize('name', FAMILIES)
def test_all_skip_is_the_timm_model(name):
    base = _randomize_bn(_base(name)).eval()
    ours = timm.create_model(name, genotype='skip', num_classes=NUM_CLASSES).eval()
    assert [k for k in ours.state_dict() if k != GENOTYPE_STATE_KEY] == list(base.state_dict())
    ours.load_state_dict(base.state_dict(), strict=True)  # timm's weights load exactly
    x = _x()
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
    blocks = [m for m in base.modules() if type(m) in (InvertedResidual, UniversalInvertedResidual)]
    with_dw = [b for b in blocks if not isinstance(getattr(b, 'dw_mid', None), torch.nn.Identity)]
    assert ours.num_slots == len(with_dw) > 0


@pytest.mark.parametrize('name', FAMILIES)
def test_enhancer_runs_after_depthwise_conv_and_before_the_blocks_own_se(name):
    model = timm.create_model(name, genotype='global', num_classes=NUM_CLASSES).eval()
    base = _base(name)
    base_blocks = [m for m in base.modules() if type(m) in (InvertedResidual, UniversalInvertedResidual)]
    for block, base_block in zip(model.enhancer_blocks(), [b for b in base_blocks if not isinstance(
            getattr(b, 'dw_mid', None), torch.nn.Identity)]):
        assert type(block.se) is type(base_block.se)  # the block's own SE (or none) is kept
    if name in WITH_SE:
        assert any(isinstance(b.se, SqueezeExcite) for b in model.enhancer_blocks())
    calls, tensors = [], {}

    def record(tag):
        def hook(module, inputs, output):
            calls.append(tag)
            tensors[tag] = (inputs[0], output)
        return hook

    block = next(b for b in model.enhancer_blocks() if not isinstance(b.se, torch.nn.Identity)) \
        if name in WITH_SE else model.enhancer_blocks()[0]
    depthwise = block.aa if isinstance(block, InvertedResidual) else block.dw_mid
    projection = block.conv_pwl if isinstance(block, InvertedResidual) else block.pw_proj
    for tag, module in (('depthwise', depthwise), ('meta_pool', block.meta_pool), ('se', block.se),
                        ('projection', projection)):
        module.register_forward_hook(record(tag))
    with torch.no_grad():
        model(_x())
    assert calls == ['depthwise', 'meta_pool', 'se', 'projection']
    assert tensors['meta_pool'][0] is tensors['depthwise'][1]
    assert tensors['se'][0] is tensors['meta_pool'][1]
    assert tensors['meta_pool'][0].shape[1] == block.meta_pool.conv_h.out_channels


@pytest.mark.parametrize('name', FAMILIES)
def test_supernet_fused_forward_and_backward_equal_the_plain_eq1_sum(name):
    torch.manual_seed(0)
    # Eval mode: batch-statistics BN would make the comparison ill-conditioned, not the slots.
    fused = _randomize_bn(timm.create_model(name, num_classes=NUM_CLASSES)).double().eval()
    plain = copy.deepcopy(fused)
    for slot in plain.enhancer_slots():
        slot.forward = slot.forward_plain  # the literal weighted sum of Eq. 1, every candidate as PyTorch defines it
    x = _x(dtype=torch.float64)
    cotangent = torch.randn(x.shape[0], NUM_CLASSES, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    results = []
    for model in (fused, plain):
        out = model(x)
        (out * cotangent).sum().backward()
        results.append((out, [p.grad for p in model.arch_parameters()], [p.grad for p in model.weight_parameters()]))
    (out_f, arch_f, weight_f), (out_p, arch_p, weight_p) = results
    for a, b in zip([out_f] + arch_f + weight_f, [out_p] + arch_p + weight_p):
        a, b = a.detach(), b.detach()
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max())  # float64 rounding, relative


@pytest.mark.parametrize('name', FAMILIES)
def test_fix_to_genotype_gives_the_state_dict_of_the_genotype_built_model(name):
    supernet = timm.create_model(name, num_classes=NUM_CLASSES)
    genotype = timm.create_model(name, genotype='random:7', num_classes=NUM_CLASSES).genotype
    supernet.fix_to_genotype(genotype)
    built = timm.create_model(name, genotype=genotype, num_classes=NUM_CLASSES)
    assert {k: v.shape for k, v in supernet.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    built.load_state_dict(supernet.state_dict())


@pytest.mark.parametrize('name', FAMILIES)
def test_features_only_forward_intermediates_and_deploy_rewrite(name):
    ours = timm.create_model(name, genotype='random:1', features_only=True, out_indices=(1, 2, 3))
    theirs = timm.create_model(METAPOOL_FAMILIES[name], features_only=True, out_indices=(1, 2, 3))
    assert isinstance(ours, type(theirs)) and isinstance(ours, MetaPoolingMixin)
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert [f.shape[1] for f in ours(_x())] == theirs.feature_info.channels()

    model = _randomize_bn(timm.create_model(name, genotype='avg3', num_classes=NUM_CLASSES)).eval()
    x = _x()
    with torch.no_grad():
        full = model(x)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final), full)
        deployed = reparameterize_model(model)
        torch.testing.assert_close(deployed(x), full, rtol=1e-5, atol=1e-6)
    # The pool moves behind the projection only where no squeeze-excite runs in between (its mean would change).
    moved = [isinstance(getattr(b, 'conv_pwl', None) or b.pw_proj.conv, ProjectionAvgPool)
             for b in deployed.enhancer_blocks()]
    assert moved == [isinstance(b.se, torch.nn.Identity) for b in deployed.enhancer_blocks()]
    assert deployed.genotype == model.genotype


def test_torch_compile_of_a_family_with_se():
    # aot_eager: dynamo's capture and AOT autograd, without inductor's code generation (tens of seconds on CPU).
    model = timm.create_model('mobilenetv3_small_metapool_100', genotype='random:0', num_classes=NUM_CLASSES).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend='aot_eager')(x), model(x), rtol=1e-5, atol=1e-6)


def test_search_cli_from_base_weights(tmp_path):
    data_dir = generate_demo_dataset(str(tmp_path / 'data'), images_per_class={'train': 8})
    base = timm.create_model('mobilenetv3_small_100')
    weights = tmp_path / 'mobilenetv3_small_100.safetensors'
    safetensors.torch.save_file(base.state_dict(), weights)
    out = tmp_path / 'run'
    main(['--data-dir', data_dir, '--output', str(out), '--model', 'mobilenetv3_small_metapool_100',
          '--init-weights', str(weights), '--img-size', '48', '-b', '8', '--epochs', '1', '--workers', '0',
          '--lr', '0.01', '--arch-lr', '0.05', '--quiet'])
    genotype = Genotype.from_json_file(out / 'genotype.json')
    assert len(genotype) == 10
    fixed = timm.create_model('mobilenetv3_small_metapool_100', genotype=genotype, num_classes=len(DEMO_CLASSES))
    checkpoint = torch.load(out / 'last.pth', weights_only=False)
    fixed.load_state_dict(checkpoint['state_dict'])
    with pytest.raises(SystemExit, match='--init-weights.*does not fit the base model'):
        main(['--data-dir', data_dir, '--output', str(tmp_path / 'run2'), '--model', 'mobilenetv2_metapool_035',
              '--init-weights', str(weights), '--img-size', '48', '-b', '8', '--epochs', '1', '--workers', '0',
              '--quiet'])


@pytest.mark.parametrize('name', FAMILIES)
def test_short_search_and_export_round_trip(name, tmp_path):
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    search = PMPLSearch(model, PMPLConfig(lr=0.01, arch_lr=0.03))
    g = torch.Generator().manual_seed(0)
    # Batches of 8 at 48 px: BN over fewer values on the last 1x1 maps makes the first steps diverge.
    batch = lambda: (torch.randn(8, 3, 48, 48, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g))
    alphas = [a.detach().clone() for a in model.arch_parameters()]
    search.step(batch(), batch(), step=0)
    assert any(not torch.equal(a, b) for a, b in zip(alphas, model.arch_parameters()))
    search.apply_early_stopping(step=1, epoch=0, force=True)
    assert model.genotype is not None and not model.open_slots()

    model.eval()
    out = export_for_hub(model, tmp_path / 'export', model_name=name)
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.genotype == model.genotype
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_se_layer_replaces_the_blocks_own_se_and_runs_after_the_enhancer():
    model = timm.create_model('efficientnet_b0_metapool', genotype='skip', se_layer='ese', num_classes=NUM_CLASSES)
    base = _base('efficientnet_b0_metapool', se_layer='ese')
    assert all(type(b.se).__name__ == 'EffectiveSEModule' for b in model.enhancer_blocks())
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(_x()), base.eval()(_x()))
    with pytest.raises(ValueError, match="efficientnet_lite0_metapool takes no se_layer.*no squeeze-excite"):
        timm.create_model('efficientnet_lite0_metapool', se_layer='se')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_base_weights_warm_start_every_shared_layer(tmp_path, suffix):
    base = _randomize_bn(timm.create_model('mobilenetv3_small_100'))  # 1000 classes, as timm's weights
    path = tmp_path / f'base{suffix}'
    if suffix == '.pth':
        torch.save(base.state_dict(), path)
    else:
        safetensors.torch.save_file(base.state_dict(), path)
    supernet = timm.create_model('mobilenetv3_small_metapool_100', num_classes=NUM_CLASSES)
    slots_before = copy.deepcopy([s.state_dict() for s in supernet.enhancer_slots()])
    fresh = load_base_weights(supernet, str(path))
    assert {'classifier.weight', 'classifier.bias'} <= set(fresh)
    state = supernet.state_dict()
    for key, value in base.state_dict().items():
        if not key.startswith('classifier.'):
            assert torch.equal(state[key], value), key
    for slot, before in zip(supernet.enhancer_slots(), slots_before):
        assert all(torch.equal(slot.state_dict()[k], v) for k, v in before.items())

    other_width = timm.create_model('mobilenetv3_large_metapool_100', num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match='does not fit the base model.*missing'):
        load_base_weights(other_width, str(path))
    with pytest.raises(ValueError, match='holds Meta-Pooling weights'):
        torch.save(supernet.state_dict(), tmp_path / 'supernet.pth')
        load_base_weights(supernet, str(tmp_path / 'supernet.pth'))


def test_hook_on_a_plain_timm_model_and_on_one_without_inverted_residuals():
    base = timm.create_model('mobilenetv3_small_100', num_classes=NUM_CLASSES)
    model = add_meta_pooling(copy.deepcopy(base), genotype='max3')
    assert isinstance(model, type(base)) and model.genotype.ops == ('max3',) * model.num_slots
    with pytest.raises(ValueError, match='already has Meta-Pooling slots'):
        add_meta_pooling(model)
    supernet = add_meta_pooling(copy.deepcopy(base))
    assert all(isinstance(s, MetaPooling) for s in supernet.enhancer_slots())
    with pytest.raises(ValueError, match='ResNet has no InvertedResidual block.*no place for a Meta-Pooling slot'):
        add_meta_pooling(timm.create_model('resnet10t'))
    # A model whose blocks are hooked below the root is refused too (a second slot per block would follow).
    partly = timm.create_model('efficientnet_lite0', num_classes=NUM_CLASSES)
    add_meta_pooling(partly.blocks, genotype='skip')
    with pytest.raises(ValueError, match=r'already has Meta-Pooling slots \(15\)'):
        add_meta_pooling(partly)
    with pytest.raises(ValueError, match=r'its blocks: DepthwiseSeparableConv'):
        add_meta_pooling(timm.create_model('lcnet_050'))


def test_hook_on_mixnet_whose_depthwise_conv_mixes_kernel_sizes():
    base = _randomize_bn(timm.create_model('mixnet_s', num_classes=NUM_CLASSES)).eval()
    model = add_meta_pooling(copy.deepcopy(base), genotype='skip')
    blocks = [m for m in base.modules() if type(m) is InvertedResidual]
    assert model.num_slots == len(blocks) and any(type(b.conv_dw).__name__ == 'MixedConv2d' for b in blocks)
    x = _x()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    supernet = add_meta_pooling(copy.deepcopy(base)).train()
    supernet(x).logsumexp(1).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in supernet.arch_parameters())


@pytest.mark.parametrize('features', [dict(feature_cfg=dict(flatten_sequential=True)), dict(feature_cls='hook'),
                                      dict(feature_cls='getter')])
def test_features_wrapped_by_timm_keep_the_genotype_guard(features):
    # timm's feature wrappers (FeatureListNet, FeatureHookNet, FeatureGetterNet) hold the model with slots.
    max5 = timm.create_model('efficientnet_b0_metapool', genotype='max5', features_only=True, **features)
    avg3 = timm.create_model('efficientnet_b0_metapool', genotype='avg3', features_only=True, **features)
    assert isinstance(max5, MetaPoolingMixin) and max5.genotype.ops == ('max5',) * max5.num_slots
    with pytest.raises(GenotypeMismatchError, match="slot 0 .* is 'max5' in the weights but 'avg3' in this model"):
        avg3.load_state_dict(max5.state_dict())
    twin = timm.create_model('efficientnet_b0_metapool', genotype='max5', features_only=True, **features)
    twin.load_state_dict(max5.state_dict())
    with torch.no_grad():
        for a, b in zip(twin.eval()(_x()), max5.eval()(_x())):
            torch.testing.assert_close(a, b)


def test_a_genotype_searched_on_another_network_is_named_when_used(tmp_path, caplog):
    path = tmp_path / 'genotype.json'
    path.write_text(Genotype.uniform('max3', 16).to_json(model='mobilenetv2_metapool_035'))
    with caplog.at_level('WARNING', logger='timm_metapool.families'):
        timm.create_model('mobilenetv2_metapool_100', genotype=str(path))  # another width of the same network
        assert not caplog.records
        model = timm.create_model('mnasnet_metapool_100', genotype=str(path))  # 16 slots too, other blocks
    assert model.genotype == Genotype.uniform('max3', 16)
    assert [r.getMessage() for r in caplog.records] == [
        f'{path} was searched on mobilenetv2_metapool_035, and mnasnet_metapool_100 is built with it: its ops go to '
        f'the slots of another network. Search mnasnet_metapool_100 itself for its own genotype.']
