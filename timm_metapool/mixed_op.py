"""MetaPooling: the parameterized spatial enhancer, a softmax-weighted mixture of candidate ops (paper Eq. 1)."""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .ops import OP_NAMES, create_op

__all__ = ['MetaPooling', 'ARCH_PARAM_NAME']

# Parameter name of the architecture logits; `name.endswith(ARCH_PARAM_NAME)` tells them from network weights.
ARCH_PARAM_NAME = 'arch_alpha'


class MetaPooling(nn.Module):
    """Mixed op of Eq. 1: beta_bar(x) = sum_k softmax(alpha)_k * op_k(x).

    `arch_alpha` holds one logit per candidate and is meant for its own optimizer (Adam in PMPL), apart from the
    network weights. `fix(k)` turns the slot into the single op k (Alg. 1, "fix the distribution by argmax"): the
    other candidates and their parameters are released and no longer computed.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is not None:
            return self.ops[self.chosen](x)
        weights = self.probabilities().to(x.dtype)
        out = weights[0] * self.ops[self.op_names[0]](x)
        for i in range(1, len(self.op_names)):
            out = out + weights[i] * self.ops[self.op_names[i]](x)
        return out

    def extra_repr(self) -> str:
        return f"chosen={self.chosen!r}" if self.chosen else f"candidates={','.join(self.op_names)}"
