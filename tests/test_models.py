"""mobilenetv2_metapool_* against timm's own MobileNetV2 and timm's model API."""
import pytest
import torch
import timm
from timm.models._efficientnet_blocks import InvertedResidual

import timm_metapool
from timm_metapool import OP_NAMES, Genotype, MetaPooling
from timm_metapool.integrity import GENOTYPE_STATE_KEY

VARIANTS = ['035', '050', '075', '100', '110d', '120d', '140']


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered_with_timm():
    assert timm.list_models('mobilenetv2_metapool*') == sorted(f'mobilenetv2_metapool_{v}' for v in VARIANTS)


@pytest.mark.parametrize('variant', VARIANTS)
def test_all_skip_is_timm_mobilenetv2(variant):
    ours = timm.create_model(f'mobilenetv2_metapool_{variant}', genotype='skip')
    theirs = timm.create_model(f'mobilenetv2_{variant}')
    assert n_params(ours) == n_params(theirs)
    # The same tensors; the model's state_dict also records its genotype (integrity.GENOTYPE_STATE_KEY).
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items() if k != GENOTYPE_STATE_KEY}
    assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    n_ir = sum(isinstance(m, InvertedResidual) for m in theirs.modules())
    assert ours.num_slots == n_ir


def test_paper_parameter_counts():
    # Paper Table 4: MobileNetV2 3.50M, +CoordAttention-style global enhancer in every slot 3.95M.
    assert n_params(timm.create_model('mobilenetv2_metapool_100', genotype='skip')) == 3_504_872
    assert n_params(timm.create_model('mobilenetv2_metapool_100', genotype='global')) == 3_950_648
    assert timm.create_model('mobilenetv2_metapool_100').num_slots == 16


def test_all_skip_computes_exactly_timm_mobilenetv2():
    torch.manual_seed(0)
    theirs = timm.create_model('mobilenetv2_050', num_classes=7).eval()
    ours = timm.create_model('mobilenetv2_metapool_050', genotype='skip', num_classes=7).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_enhancer_sits_after_depthwise_conv_in_expanded_space():
    model = timm.create_model('mobilenetv2_metapool_100', genotype='global')
    for block in model.enhancer_blocks():
        assert block.meta_pool.conv_h.out_channels == block.conv_dw.out_channels == block.conv_pwl.in_channels
    assert not hasattr(model.blocks[0][0], 'meta_pool')  # the first DepthwiseSeparable block stays plain


def test_supernet_parameter_groups():
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=10)
    arch = model.arch_parameters()
    weights = model.weight_parameters()
    assert len(arch) == model.num_slots and all(a.shape == (len(OP_NAMES),) for a in arch)
    names = [n for n, p in model.named_parameters() if any(p is a for a in arch)]
    assert all(n.endswith('.meta_pool.arch_alpha') for n in names)
    assert {id(p) for p in arch}.isdisjoint({id(p) for p in weights})
    assert len(arch) + len(weights) == len(list(model.parameters()))
    assert model.genotype is None and model.open_slots() == list(range(model.num_slots))


def test_derive_genotype_is_argmax_and_fix_keeps_weights():
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=10)
    chosen = [OP_NAMES[(3 * i + 1) % len(OP_NAMES)] for i in range(model.num_slots)]
    with torch.no_grad():
        for slot, name in zip(model.enhancer_slots(), chosen):
            slot.arch_alpha.zero_()
            slot.arch_alpha[OP_NAMES.index(name)] = 0.1
    assert model.derive_genotype().ops == tuple(chosen)

    global_weights = {i: s.ops['global'].conv_h.weight for i, s in enumerate(model.enhancer_slots())}
    final = model.fix_to_genotype()
    assert final.ops == tuple(chosen) and model.genotype == final and model.arch_parameters() == []
    for i, slot in enumerate(model.enhancer_slots()):
        if chosen[i] == 'global':
            assert slot.conv_h.weight is global_weights[i]
    fresh = timm.create_model('mobilenetv2_metapool_035', genotype=final, num_classes=10)
    fresh.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_fix_to_genotype_rejects_conflicts():
    model = timm.create_model('mobilenetv2_metapool_035')
    model.fix_slot(0, 'avg5')
    with pytest.raises(ValueError, match="Slot 0 is fixed to 'avg5'"):
        model.fix_to_genotype('skip')
    with pytest.raises(ValueError, match='already fixed'):
        model.fix_slot(0, 'skip')
    with pytest.raises(ValueError, match='16 enhancer slots'):
        model.fix_to_genotype('skip,skip')
    for index in (16, -1):  # -1 would silently fix slot 15 and be logged as slot -1
        with pytest.raises(IndexError, match=f'Slot {index} does not exist.*16 enhancer slots, 0 to 15'):
            model.fix_slot(index, 'avg3')
    assert model.open_slots() == list(range(1, 16))


def test_refused_genotype_leaves_every_slot_as_it_was():
    model = timm.create_model('mobilenetv2_metapool_035')
    model.fix_slot(5, 'avg5')
    alphas = [s.arch_alpha.detach().clone() for s in model.enhancer_slots() if hasattr(s, 'arch_alpha')]
    with pytest.raises(ValueError, match="Slot 5 is fixed to 'avg5', the genotype asks for 'max3'"):
        model.fix_to_genotype('max3')  # slots 0-4 come before the conflict
    assert model.open_slots() == [i for i in range(16) if i != 5]
    assert all(torch.equal(a, s.arch_alpha) for a, s in
               zip(alphas, [s for s in model.enhancer_slots() if hasattr(s, 'arch_alpha')]))


def test_slot_fixed_by_its_metapooling_is_finalized_by_the_model():
    """MetaPooling.fix on one slot, then the model's own fixing: the slot becomes its bare op with its weights, and
    the model reaches a genotype whose state_dict loads into a model built from it."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=10)
    slot = model.enhancer_slots()[3]
    conv_h = slot.ops['global'].conv_h.weight
    slot.fix(slot.op_names.index('global'))
    assert model.genotype is None and 3 not in model.open_slots()
    with pytest.raises(ValueError, match=r"Slot 3 is already fixed to 'global' \(by MetaPooling.fix\), not 'avg3'"):
        model.fix_slot(3, 'avg3')
    genotype = model.fix_to_genotype()
    assert genotype[3] == 'global' and model.genotype == genotype
    assert model.enhancer_slots()[3].conv_h.weight is conv_h
    fresh = timm.create_model('mobilenetv2_metapool_035', genotype=genotype, num_classes=10)
    fresh.load_state_dict(model.state_dict())  # strict


def test_genotype_forms_and_errors_through_create_model(tmp_path):
    ops = Genotype.parse('random:5', num_slots=16)
    path = tmp_path / 'genotype.json'
    path.write_text(ops.to_json())
    for form in (ops, list(ops.ops), ops.to_string(), str(path), 'random:5'):
        assert timm.create_model('mobilenetv2_metapool_100', genotype=form).genotype == ops
    with pytest.raises(ValueError, match='but this model has 21 enhancer slots'):
        timm.create_model('mobilenetv2_metapool_110d', genotype=ops.to_string())
    with pytest.raises(ValueError, match='valid ops are'):
        timm.create_model('mobilenetv2_metapool_100', genotype='bogus,' * 15 + 'skip')


def test_se_layer_is_refused_not_ignored():
    # timm's own mobilenetv2_100 silently drops se_layer (no se ratio in its arch strings); here it is refused.
    timm.create_model('mobilenetv2_100', se_layer='se')
    with pytest.raises(ValueError, match="takes no se_layer.*'se'.*genotype=.*enhancer_blocks"):
        timm.create_model('mobilenetv2_metapool_035', se_layer='se')
    assert timm.create_model('mobilenetv2_metapool_035', se_layer=None, genotype='skip').genotype.ops[0] == 'skip'


def test_pretrained_without_published_weights_is_a_clear_error():
    with pytest.raises(RuntimeError, match='mobilenetv2_metapool_100 has no pretrained weights.*genotype='):
        timm.create_model('mobilenetv2_metapool_100', pretrained=True)
    with pytest.raises(RuntimeError, match='mobilenetv2_metapool_050 has no pretrained weights'):
        timm.create_model('mobilenetv2_metapool_050', pretrained=True)


@pytest.mark.parametrize('genotype', [None, 'random:0'])
def test_create_model_kwargs(genotype):
    model = timm.create_model('mobilenetv2_metapool_035', genotype=genotype, num_classes=5, in_chans=1,
                              drop_rate=0.2, drop_path_rate=0.1)
    assert model.conv_stem.in_channels == 1 and model.get_classifier().out_features == 5
    assert model.drop_rate == 0.2
    twin = timm.create_model('mobilenetv2_035', num_classes=5, in_chans=1, drop_rate=0.2, drop_path_rate=0.1)
    drop_probs = [getattr(b.drop_path, 'drop_prob', 0.0) for stage in model.blocks for b in stage]
    assert drop_probs == [getattr(b.drop_path, 'drop_prob', 0.0) for stage in twin.blocks for b in stage]
    assert max(drop_probs) > 0
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 5)


@pytest.mark.parametrize('genotype', [None, 'random:1'])
def test_features_only_matches_timm(genotype):
    ours = timm.create_model('mobilenetv2_metapool_050', genotype=genotype, features_only=True, out_indices=(1, 2, 4))
    theirs = timm.create_model('mobilenetv2_050', features_only=True, out_indices=(1, 2, 4))
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    feats = ours(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == theirs.feature_info.channels()
    if genotype is None:
        assert len(ours.arch_parameters()) == ours.num_slots


@pytest.mark.parametrize('genotype', [None, 'random:2'])
def test_forward_api(genotype):
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', genotype=genotype, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    full = model(x)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), full)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == 5 and intermediates[-1].shape[-1] == 2
    torch.testing.assert_close(model.forward_head(final), full)

    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), full)
    model.set_grad_checkpointing(False)

    model_cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last)), full, rtol=1e-4, atol=1e-5)

    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_grad_checkpointing_trains_alpha():
    model = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in model.arch_parameters())


@pytest.mark.parametrize('genotype', [None, 'random:3'])
def test_fx_feature_extraction(genotype):
    from timm.models import create_feature_extractor
    model = timm.create_model('mobilenetv2_metapool_035', genotype=genotype).eval()
    extractor = create_feature_extractor(model, return_nodes={'blocks.3': 'mid', 'conv_head': 'head'})
    x = torch.randn(1, 3, 64, 64)
    out = extractor(x)
    torch.testing.assert_close(out['mid'], model.blocks[:4](model.bn1(model.conv_stem(x))))
    assert out['head'].shape[1] == model.conv_head.out_channels


# Moved pools and fused Global Context Enhancers after timm's reparameterize_model.
DEPLOYABLE_GENOTYPE = 'avg3,global,max3,avg7,global,' + ','.join(['skip'] * 11)


def _fixed_model(genotype: str, deploy: bool) -> torch.nn.Module:
    from timm.utils.model import reparameterize_model
    model = timm.create_model('mobilenetv2_metapool_035', genotype=genotype, num_classes=10).eval()
    return reparameterize_model(model) if deploy else model


@pytest.mark.parametrize('genotype, deploy', [('random:4', False), (DEPLOYABLE_GENOTYPE, True)])
def test_jit_script_fixed_model(genotype, deploy):
    model = _fixed_model(genotype, deploy)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))


def test_jit_script_of_a_supernet_says_to_fix_the_slots_first():
    supernet = timm.create_model('mobilenetv2_metapool_035', num_classes=10).eval()
    supernet.fix_slot(0, 'avg3')  # one slot fixed is not enough: the others are still mixed ops
    with pytest.raises(RuntimeError, match=r'MetaPooling slot .* cannot be scripted.*fix_to_genotype\(\)'):
        torch.jit.script(supernet)
    supernet.fix_to_genotype()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.jit.script(supernet)(x), supernet(x))


def test_torch_compile_fixed_model():
    model = timm.create_model('mobilenetv2_metapool_035', genotype='random:0', num_classes=10).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('genotype, deploy', [('random:0', False), ('global', False),
                                             (DEPLOYABLE_GENOTYPE, True)])
def test_torch_export_fixed_model(genotype, deploy):
    # torch.export is what the ONNX (dynamo) exporter and ExecuTorch trace through: the fast paths' Python control
    # flow must hand it the plain definitions, and the exported program must compute the same outputs.
    model = _fixed_model(genotype, deploy)
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('genotype', [None, 'random:0'])
def test_meta_device_shapes(genotype):
    # Shape inference and lazy initialisation run on the 'meta' device, which has no autocast to switch off.
    model = timm.create_model('mobilenetv2_metapool_035', genotype=genotype, num_classes=7, device='meta')
    x = torch.randn(2, 3, 48, 40, device='meta')
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 7) and out.device.type == 'meta'
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)


def test_package_exports():
    assert timm_metapool.OP_NAMES == ('skip', 'global', 'max3', 'max5', 'max7', 'avg3', 'avg5', 'avg7')
    assert isinstance(timm.create_model('mobilenetv2_metapool_035').enhancer_slots()[0], MetaPooling)


def test_reparameterize_model_moves_avg_pools_out_of_the_box():
    from timm.utils.model import reparameterize_model
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_metapool_035', genotype='avg3', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    deployed = reparameterize_model(model)
    assert all(isinstance(b.meta_pool, torch.nn.Identity) for b in deployed.enhancer_blocks())
    torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-6)


def test_loading_weights_of_the_other_kind_says_what_to_do():
    """A strict load used to list every missing and unexpected key (timm's scripts without --model-kwargs genotype=)."""
    supernet = timm.create_model('mobilenetv2_metapool_035', num_classes=4)
    fixed = timm.create_model('mobilenetv2_metapool_035', num_classes=4, genotype='global')
    with pytest.raises(ValueError, match='weights are of a fixed genotype.*search space.*genotype='):
        supernet.load_state_dict(fixed.state_dict())
    with pytest.raises(ValueError, match='search-space .*supernet.* weights.*fix_to_genotype'):
        fixed.load_state_dict(supernet.state_dict())
    timm_weights = timm.create_model('mobilenetv2_035', num_classes=4).state_dict()
    with pytest.raises(ValueError, match='carry no Meta-Pooling genotype'):
        supernet.load_state_dict(timm_weights)
    timm.create_model('mobilenetv2_metapool_035', num_classes=4, genotype='skip').load_state_dict(timm_weights)
    with pytest.raises(ValueError, match='weights are of a fixed genotype'):  # the genotype is checked non-strict too
        supernet.load_state_dict(fixed.state_dict(), strict=False)
    weights = {k: v for k, v in fixed.state_dict().items() if k != 'metapool_genotype'}  # the way round it
    missing, _ = supernet.load_state_dict(weights, strict=False)
    assert any('.meta_pool.ops.' in k for k in missing)
