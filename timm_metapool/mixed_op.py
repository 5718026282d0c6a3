"""MetaPooling: the parameterized spatial enhancer, a softmax-weighted mixture of candidate ops (paper Eq. 1).

`MetaPooling.forward` computes Eq. 1 through exact rewrites that share work between candidates;
`MetaPooling.forward_plain` (and `mixed_op_plain`) is the literal weighted sum, kept as the reference definition:

* `skip` and the average pools (stride 1, zero padding counted) are linear and shift-invariant, so their weighted
  sum is one depthwise conv whose kernel is the softmax-weighted sum of centred box kernels (and a unit impulse).
* stride-1 max pools with -inf padding compose: max5 = max3(max3) and max7 = max3(max5), so max3 is computed once
  and each larger window costs one more 3x3 pass. For inputs without ties the gradients are identical; where a window
  holds several equal maxima both versions pass the gradient to one of them, not necessarily the same one.
* the `global` term scales its small per-row gate by its weight before touching the full-size map.

On CPU the local terms run in channels-last (`kernels.local_layout`) and the mixed op returns a channels-last map: the same
values, but PyTorch's CPU max pooling, depthwise conv and their backward are several times faster in that layout,
and so are the 1x1 convs that follow in the block.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .kernels import (
    BoxMixtureConv, WeightedMaxChain, apply_gates, autocast_off, local_layout, reachable_window,
)
from .ops import OP_NAMES, GlobalContextEnhancer, create_op, plain_forward_of, pool_kernel_size

__all__ = ['MetaPooling', 'ARCH_PARAM_NAME', 'mixed_op_plain', 'linear_pool_basis']

# Parameter name of the architecture logits; `name.endswith(ARCH_PARAM_NAME)` tells them from network weights.
ARCH_PARAM_NAME = 'arch_alpha'

_LINEAR_OP_NAMES: Tuple[str, ...] = ('skip', 'avg3', 'avg5', 'avg7')
_MAX_OP_NAMES: Tuple[str, ...] = ('max3', 'max5', 'max7')


def mixed_op_plain(x: torch.Tensor, weights: torch.Tensor,
                   ops: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Eq. 1 as written: sum_k weights[k] * ops[k](x). The reference the fused path is checked against."""
    out = weights[0] * ops[0](x)
    for weight, op in zip(weights[1:], ops[1:]):
        out = out + weight * op(x)
    return out


def _window_size(linear_op_name: str) -> int:
    """Side of a linear candidate's window: 1 for `skip`, k for `avgK`."""
    return 1 if linear_op_name == 'skip' else pool_kernel_size(linear_op_name)


def linear_pool_basis(op_names: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Supports and areas of the linear candidates (`skip`, `avgK`), centred in a common KxK window.

    Returns `(masks, areas)`: masks (len(op_names), K, K) of ones on each candidate's window, K the largest
    average-pool size (1 if only `skip`), and areas (len(op_names),) = k^2. The depthwise kernel of candidate i is
    masks[i] / areas[i] (count_include_pad=True is exactly zero padding). Both are integers, exact in any dtype, so
    the division happens in the input's dtype as in `avg_pool2d`.
    """
    sizes = [_window_size(name) for name in op_names]
    size = max(sizes, default=1)
    masks = torch.zeros(len(sizes), size, size)
    for i, k in enumerate(sizes):
        start = (size - k) // 2
        masks[i, start:start + k, start:start + k] = 1.
    return masks, torch.tensor([float(k * k) for k in sizes])


class MetaPooling(nn.Module):
    """Mixed op of Eq. 1: beta_bar(x) = sum_k softmax(alpha)_k * op_k(x).

    `arch_alpha` holds one logit per candidate and is meant for its own optimizer (Adam in PMPL), apart from the
    network weights. `fix(k)` turns the slot into the single op k (Alg. 1, "fix the distribution by argmax"): the
    other candidates and their parameters are released and no longer computed.

    `forward` is the fused evaluation described in the module docstring (any subset of the eight candidates);
    `forward_plain` is the literal weighted sum. Both give the same outputs and gradients up to float rounding.
    """

    def __init__(
            self,
            channels: int,
            op_names: Sequence[str] = OP_NAMES,
            alpha_init_std: float = 1e-3,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if len(op_names) < 2 or len(set(op_names)) != len(op_names):
            raise ValueError(f'MetaPooling needs at least two distinct candidate ops, got {list(op_names)}.')
        self.op_names: Tuple[str, ...] = tuple(op_names)
        self.ops = nn.ModuleDict({name: create_op(name, channels, device=device, dtype=dtype) for name in op_names})
        self.arch_alpha = nn.Parameter(alpha_init_std * torch.randn(len(op_names), device=device, dtype=dtype))
        self.chosen: Optional[str] = None

        # Index groups of the fused path, in `op_names` order.
        index: Dict[str, int] = {name: i for i, name in enumerate(self.op_names)}
        self._linear_idx = [index[n] for n in _LINEAR_OP_NAMES if n in index]
        self._max_idx = [index.get(n) for n in _MAX_OP_NAMES[:max(
            [_MAX_OP_NAMES.index(n) + 1 for n in _MAX_OP_NAMES if n in index], default=0)]]
        self._global_idx = index.get('global')
        self._linear_sizes = tuple(_window_size(self.op_names[i]) for i in self._linear_idx)
        # Not persistent: derived from op_names, so state_dicts stay those of the plain module.
        masks, areas = linear_pool_basis([self.op_names[i] for i in self._linear_idx])
        self.register_buffer('linear_masks', masks.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer('linear_areas', areas.to(device=device, dtype=dtype), persistent=False)

    def probabilities(self) -> torch.Tensor:
        """pi = softmax(alpha), one probability per candidate in `op_names` order."""
        return torch.softmax(self.arch_alpha, dim=-1)

    @property
    def is_fixed(self) -> bool:
        return self.chosen is not None

    def fix(self, index: int) -> nn.Module:
        """Keep only candidate `index`; freeze alpha. Returns the chosen op module (with its trained weights)."""
        if not 0 <= index < len(self.op_names):
            raise IndexError(f'Candidate index {index} out of range for {len(self.op_names)} ops {self.op_names}.')
        if self.chosen is not None:
            raise RuntimeError(f'This MetaPooling slot is already fixed to {self.chosen!r}.')
        name = self.op_names[index]
        self.ops = nn.ModuleDict({name: self.ops[name]})
        self.chosen = name
        self.arch_alpha.requires_grad_(False)
        return self.ops[name]

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by `torch.jit.script` on every submodule: the mixed op's fused paths are eager-only, so scripting
        a model that still has search slots stops here with what to do, not deep in the compiler."""
        raise RuntimeError(
            'A MetaPooling slot (the PMPL search space) cannot be scripted with torch.jit.script. Fix the slots '
            'first: model.fix_to_genotype() (each slot to its argmax) or timm.create_model(..., genotype=...); fixed '
            'models script.')

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """Reference definition: the literal Eq. 1 sum (or op k alone once fixed), every candidate in its plain
        definition (`plain_forward_of`: PyTorch's own pooling, the Global Context Enhancer's `forward_plain`)."""
        if self.chosen is not None:
            return plain_forward_of(self.ops[self.chosen])(x)
        weights = self.probabilities().to(x.dtype)
        return mixed_op_plain(x, weights, [plain_forward_of(self.ops[name]) for name in self.op_names])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is not None:
            return self.ops[self.chosen](x)
        weights = self.probabilities().to(x.dtype)
        local_x = local_layout(x)  # the output keeps this layout (module docstring)
        # The local terms stand for pooling, which keeps x's dtype under autocast: their kernel arithmetic and convs
        # must not be cast to half precision (nor their output, which the other terms are added into).
        with autocast_off(x.device.type):
            out = self._linear_term(local_x, weights)
            out = self._max_terms(local_x, weights, out)
        if self._global_idx is not None:
            enhancer: GlobalContextEnhancer = self.ops['global']
            a_h, a_w = enhancer.gates(x, like=local_x)
            # pi_global * x * a_h * a_w with the weight folded into the (N, C, H, 1) gate, not the full map.
            out.add_(apply_gates(local_x, weights[self._global_idx] * a_h, a_w))
        return out

    def _linear_term(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over `skip`/`avgK` of pi_k * op_k(x) as one depthwise conv (zeros if there is no linear candidate).

        Always a fresh tensor that no backward needs, so the other terms are accumulated into it in place.
        """
        if not self._linear_idx:
            return torch.zeros_like(x)
        masks = self.linear_masks.to(x.dtype)
        if masks.shape[-1] == 1:  # `skip` alone
            return weights[self._linear_idx[0]] * x
        coeffs = weights[self._linear_idx] / self.linear_areas.to(x.dtype)
        # Dropping the taps that only ever meet zero padding saves most of the work on the small late-stage maps (a
        # 1x1 map needs a single scale: every window's centre).
        size = masks.shape[-1]
        kh, kw = reachable_window(size, x.shape[2], x.shape[3])
        if kh == kw == 1:
            return x * coeffs.sum()
        masks = masks[:, (size - kh) // 2:(size + kh) // 2, (size - kw) // 2:(size + kw) // 2]
        return BoxMixtureConv.apply(x, coeffs, masks, self._linear_sizes)

    def _max_terms(self, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Adds pi_k * maxK(x) for the max candidates, each larger window one more 3x3 pass over the previous."""
        if not self._max_idx:
            return out
        return WeightedMaxChain.apply(out, x, weights, tuple(self._max_idx))

    def extra_repr(self) -> str:
        return f"chosen={self.chosen!r}" if self.chosen else f"candidates={','.join(self.op_names)}"
