"""The code paths that depend on the device, on every device present: CPU always, CUDA where available.

The fused mixed op has CPU fast paths and a generic path; these tests hold each device's path to the plain Eq. 1 sum
(PyTorch's own pooling for the candidates) and to the CPU results, and run a PMPL step, a checkpoint and an export
on the device. `benchmarks/gpu_check.sh` runs them on a GPU machine.
"""
import pytest
import torch
import timm

import timm_metapool  # noqa: F401
from _helpers import randomize_bn
from timm_metapool import OP_NAMES, MetaPooling, create_op
from timm_metapool.hub import export_for_hub
from timm_metapool.pmpl import PMPLConfig, PMPLSearch

DEVICES = [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device here')),
]
MODEL = 'mobilenetv2_metapool_035'


def _input(*shape, device='cpu', dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shape', [(2, 16, 9, 7), (3, 8, 14, 14), (2, 24, 4, 4)])
def test_fused_mixed_op_matches_the_plain_sum(device, shape):
    torch.manual_seed(0)
    op = randomize_bn(MetaPooling(shape[1]).double()).to(device)
    with torch.no_grad():
        op.arch_alpha.normal_()
    x = _input(*shape, device=device, dtype=torch.float64).requires_grad_()
    fused = op(x)
    grad = torch.randn_like(fused)
    gx, galpha = torch.autograd.grad(fused, (x, op.arch_alpha), grad)
    plain = op.forward_plain(x)
    px, palpha = torch.autograd.grad(plain, (x, op.arch_alpha), grad)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(gx, px)
    torch.testing.assert_close(galpha, palpha)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', [n for n in OP_NAMES if n != 'skip'])
def test_candidates_match_torch_pooling_on_the_device(device, name):
    op = randomize_bn(create_op(name, channels=8)).eval().to(device)
    x = _input(2, 8, 11, 9, device=device)
    with torch.no_grad():
        torch.testing.assert_close(op(x), op.forward_plain(x))
        if name.startswith(('max', 'avg')):
            k = int(name[3:])
            pool = torch.nn.functional.max_pool2d if name.startswith('max') else torch.nn.functional.avg_pool2d
            kwargs = {} if name.startswith('max') else dict(count_include_pad=True)
            torch.testing.assert_close(op(x), pool(x, k, 1, k // 2, **kwargs))


@pytest.mark.parametrize('device', DEVICES)
def test_model_on_the_device_matches_the_cpu(device):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(MODEL, genotype='random:3', num_classes=5)).eval()
    x = _input(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = model.to(device)(x.to(device)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('device', DEVICES)
def test_pmpl_step_checkpoint_and_export_on_the_device(device, tmp_path):
    torch.manual_seed(0)
    supernet = timm.create_model(MODEL, num_classes=4).to(device)
    search = PMPLSearch(supernet, PMPLConfig(lr=0.01, arch_lr=0.5, rho=0.05))
    batch = (_input(8, 3, 32, 32, device=device), torch.arange(8, device=device) % 4)
    meta = (_input(8, 3, 32, 32, device=device, seed=1), torch.arange(8, device=device) % 4)
    for step in range(3):
        search.step(batch, meta, step=step)
    search.apply_early_stopping(step=3, epoch=0, force=True)
    assert supernet.genotype is not None
    state = supernet.state_dict()
    torch.save(state, tmp_path / 'weights.pth')
    twin = timm.create_model(MODEL, genotype=supernet.genotype, num_classes=4)
    twin.load_state_dict(torch.load(tmp_path / 'weights.pth', map_location='cpu', weights_only=True))
    out = export_for_hub(supernet, tmp_path / 'export')  # checked against the model on its own device
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = _input(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), supernet.eval()(x.to(device)).cpu(), rtol=1e-4, atol=1e-4)
