"""The eight candidate receptive-field enhancers of Meta-Pooling (paper Sec. 2.1).

`skip` is "no enhancer"; `max{3,5,7}` / `avg{3,5,7}` are the Local Context Enhancers (stride-1 pooling, same
output size); `global` is the Global Context Enhancer (spatial separable pooling, Coordinate-Attention structure).
"""
import copy
from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (
    _column_gates_pay_off, _plain_directional_means, _pointwise_on_columns, apply_gates, directional_means,
    laid_out_like, same_size_avg_pool, same_size_max_pool,
)

__all__ = [
    'OP_NAMES', 'LOCAL_OP_NAMES', 'AvgPoolEnhancer', 'GlobalContextEnhancer', 'MaxPoolEnhancer', 'create_op',
    'op_name_of', 'plain_forward_of', 'pool_kernel_size',
]

# Canonical order: architecture logits, genotypes and saved files all index candidates by this order.
OP_NAMES: Tuple[str, ...] = ('skip', 'global', 'max3', 'max5', 'max7', 'avg3', 'avg5', 'avg7')
LOCAL_OP_NAMES: Tuple[str, ...] = ('max3', 'max5', 'max7', 'avg3', 'avg5', 'avg7')


# Leaves for torch.fx (timm's feature extraction included): their layout checks are Python control flow.
torch.fx.wrap('directional_means')
torch.fx.wrap('apply_gates')
torch.fx.wrap('laid_out_like')


class GlobalContextEnhancer(nn.Module):
    """Global Context Enhancer: spatial separable pooling (paper Sec. 2.1).

    Mean over W gives an Hx1 profile z^h, mean over H a 1xW profile z^w. Both go through one shared point-wise conv
    (C -> mid, mid = max(min_channels, C // reduction)) + BN + hard-swish, are split back, and each is mapped to a
    sigmoid gate by its own point-wise conv (mid -> C). Output: x * a_h * a_w. With reduction 32 this is the
    Coordinate-Attention structure whose MobileNetV2 totals match the paper's 3.95M (Table 4).
    """

    def __init__(
            self,
            channels: int,
            reduction: int = 32,
            min_channels: int = 8,
            act_layer: Type[nn.Module] = nn.Hardswish,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        mid_channels = max(min_channels, channels // reduction)
        self.conv_reduce = nn.Conv2d(channels, mid_channels, kernel_size=1, bias=True, **dd)
        self.bn = norm_layer(mid_channels, **dd)
        self.act = act_layer()
        self.conv_h = nn.Conv2d(mid_channels, channels, kernel_size=1, bias=True, **dd)
        self.conv_w = nn.Conv2d(mid_channels, channels, kernel_size=1, bias=True, **dd)

    def gates(self, x: torch.Tensor, like: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two sigmoid gates: a_h as (N, C, H, 1) and a_w as (N, C, 1, W), stored in the layout of `like`
        (default: x), the map they will multiply."""
        if like is None:
            like = x
        z = directional_means(x)
        if not torch.jit.is_scripting() and _column_gates_pay_off(like):
            return self._gates_by_columns(z, x.shape[2])
        return self._gates_by_rows(z, x.shape[2], like)

    def _gates_by_rows(
            self,
            z: torch.Tensor,
            height: int,
            like: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gates from the directional profiles z = [z^h | z^w], (N, C, H + W).

        The point-wise maps run as GEMMs over the H + W profile positions rather than as 1x1 convs on (N, C, L, 1)
        columns: the same arithmetic, without the large fixed cost that conv kernels (and especially their backward)
        carry at these tiny spatial sizes (docs/performance.md).
        """
        batch, channels, length = z.shape
        # Both directional profiles side by side, one row per position, so the shared reduction, BN and activation
        # run once for the two directions.
        z = z.transpose(1, 2).reshape(-1, channels)
        y = F.linear(z, self.conv_reduce.weight.flatten(1), self.conv_reduce.bias)
        # BN over the rows as 1x1 maps: statistics over batch and positions, exactly as on the (N, mid, L, 1) map.
        y = self.act(self.bn(y[:, :, None, None])).view(batch, length, -1)
        a_h = F.linear(y[:, :height], self.conv_h.weight.flatten(1), self.conv_h.bias).sigmoid()
        a_w = F.linear(y[:, height:], self.conv_w.weight.flatten(1), self.conv_w.bias).sigmoid()
        # Gates in the map's layout, so that broadcasting them runs along the map's innermost dimension (a small copy
        # for NCHW, none for channels-last): a strided gate over the full map is slower on CPU.
        return (laid_out_like(a_h.transpose(1, 2).unsqueeze(3), like),
                laid_out_like(a_w.transpose(1, 2).unsqueeze(2), like))

    @torch.jit.unused
    def _gates_by_columns(self, z: torch.Tensor, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """NCHW gates without autograd: the point-wise maps as W @ z on (C, H + W) profile columns, whose outputs
        are the gates' NCHW layout already (no transposing copies). Training keeps the rows: the weights' gradients
        through a batch of column GEMMs are slower than through the rows."""
        y = _pointwise_on_columns(self.conv_reduce, z)
        y = self.act(self.bn(y.unsqueeze(3))).squeeze(3)  # BN statistics over batch and positions, as in the rows
        a_h = _pointwise_on_columns(self.conv_h, y[:, :, :height]).sigmoid_()
        a_w = _pointwise_on_columns(self.conv_w, y[:, :, height:]).sigmoid_()
        return a_h.unsqueeze(3), a_w.unsqueeze(2)

    def fuse(self) -> 'GlobalContextEnhancer':
        """The enhancer for inference, for timm's `reparameterize_model`: a copy with BN (its running statistics and
        affine) folded into `conv_reduce` and replaced by `nn.Identity`, which removes a BN call per slot. The same
        outputs as this enhancer in eval mode, up to float rounding; the fused copy has no `bn.*` state, so its
        weights no longer load into a model built from a genotype (export the trained model, not the fused one). An
        enhancer whose norm layer is not a BatchNorm with running statistics is copied unchanged.
        """
        fused = copy.deepcopy(self)
        bn = self.bn
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            return fused
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            fused.conv_reduce.weight.copy_(self.conv_reduce.weight * scale[:, None, None, None])
            fused.conv_reduce.bias.copy_(self.conv_reduce.bias * scale + shift)
        fused.bn = nn.Identity()
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        return apply_gates(x, a_h, a_w)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """Sec. 2.1 as written, without the fast paths: means by `mean`, the output by broadcast products.

        The same outputs and gradients as `forward` up to float rounding, and what a flop counter should see: the
        fast paths' GEMMs with constant 0/1 matrices (`directional_means`, `apply_gates`) are not model arithmetic.
        """
        a_h, a_w = self._gates_by_rows(_plain_directional_means(x), x.shape[2], x)
        return x * a_h * a_w


def pool_kernel_size(op_name: str) -> int:
    """Kernel size of a local op name (`avg5` -> 5)."""
    return int(op_name[3:])



# Leaves for torch.fx: the device and layout checks are Python control flow.
torch.fx.wrap('same_size_avg_pool')
torch.fx.wrap('same_size_max_pool')


def _check_odd_kernel(kernel_size: int, owner: str) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'{owner} keeps the map size with padding k // 2, which needs an odd kernel size '
                         f'(the candidates use 3, 5 and 7); got {kernel_size!r}.')


class AvgPoolEnhancer(nn.AvgPool2d):
    """Local Context Enhancer `avgK` (paper Sec. 2.1): `nn.AvgPool2d(k, stride=1, padding=k // 2)` (zero padding
    counted), evaluated by `same_size_avg_pool`."""

    def __init__(self, kernel_size: int):
        _check_odd_kernel(kernel_size, 'AvgPoolEnhancer')
        super().__init__(kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_size_avg_pool(x, self.kernel_size)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's own average pooling: the reference `forward` is checked against."""
        return super().forward(x)


class MaxPoolEnhancer(nn.MaxPool2d):
    """Local Context Enhancer `maxK` (paper Sec. 2.1): `nn.MaxPool2d(k, stride=1, padding=k // 2)` (-inf padding),
    evaluated by `same_size_max_pool`."""

    def __init__(self, kernel_size: int):
        _check_odd_kernel(kernel_size, 'MaxPoolEnhancer')
        super().__init__(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_size_max_pool(x, self.kernel_size)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's own max pooling: the reference `forward` is checked against."""
        return super().forward(x)


def create_op(
        op_name: str,
        channels: int,
        device=None,
        dtype=None,
) -> nn.Module:
    """Build candidate `op_name` for a `channels`-wide feature map. Every op keeps the input's shape."""
    if op_name == 'skip':
        op = nn.Identity()
    elif op_name == 'global':
        op = GlobalContextEnhancer(channels, device=device, dtype=dtype)
    elif op_name in LOCAL_OP_NAMES:
        k = pool_kernel_size(op_name)
        op = MaxPoolEnhancer(k) if op_name.startswith('max') else AvgPoolEnhancer(k)
    else:
        raise ValueError(f"Unknown Meta-Pooling op {op_name!r}; valid ops are: {', '.join(OP_NAMES)}.")
    return op


def plain_forward_of(op: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A candidate's plain definition: its `forward_plain` (the pools, `global`), or the module itself (`skip`)."""
    return getattr(op, 'forward_plain', op)


def op_name_of(module: nn.Module) -> Optional[str]:
    """The candidate name of a fixed enhancer module, or None if `module` is not one of the eight candidates.

    A module that stands for a candidate in a deployed form (`timm.utils.model.reparameterize_model`) names it in its
    `op_name` attribute.
    """
    deployed_as = getattr(module, 'op_name', None)
    if isinstance(deployed_as, str):
        return deployed_as
    if isinstance(module, nn.Identity):
        return 'skip'
    if isinstance(module, GlobalContextEnhancer):
        return 'global'
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        return ('max' if isinstance(module, nn.MaxPool2d) else 'avg') + str(k)
    return None
