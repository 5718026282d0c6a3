"""The search-space API of a model with Meta-Pooling slots (`MetaPoolingMixin`).

`timm_metapool.add_meta_pooling` (hook.py) gives every model it wraps this API: the slots, the architecture
parameters alpha and the network weights theta as separate groups (PMPL, Sec. 2.2), fixing slots (Alg. 1) and the
genotype. The registered models (`mobilenetv2_metapool_*` and the other families) live in families.py.
"""
import logging
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from timm.layers import register_notrace_module

from .blocks import META_POOL_BLOCKS, SLOT_ATTR
from .genotype import Genotype, GenotypeLike
from .integrity import (
    GENOTYPE_STATE_KEY, GenotypeMismatchError, check_genotype_codes, codes_tensor, describe_code, genotype_codes,
)
from .mixed_op import ARCH_PARAM_NAME, MetaPooling
from .ops import OP_NAMES, op_name_of

__all__ = ['MetaPoolingMixin']

# A mixed op is one leaf for torch.fx feature extraction: its candidates are keyed by op name, and `global` is a
# Python keyword that fx's generated code cannot address as an attribute.
register_notrace_module(MetaPooling)

SKIP_CODE = OP_NAMES.index('skip')
_logger = logging.getLogger(__name__)


class MetaPoolingMixin:
    """Search-space API of a model whose blocks hold Meta-Pooling slots (`timm_metapool.add_meta_pooling`).

    Works on any module tree: the slots are found by their blocks' classes, in module (forward) order.
    """

    def enhancer_blocks(self) -> List[nn.Module]:
        """The blocks that own an enhancer slot (`block.meta_pool`, `blocks.SLOT_ATTR`), in slot order."""
        return [m for m in self.modules() if isinstance(m, META_POOL_BLOCKS)]

    def enhancer_slots(self) -> List[nn.Module]:
        """Each slot's module: a `MetaPooling` while open, the chosen op once fixed."""
        return [getattr(b, SLOT_ATTR) for b in self.enhancer_blocks()]

    @property
    def num_slots(self) -> int:
        """How many enhancer slots the model has (one per inverted-residual block with a depthwise conv)."""
        return len(self.enhancer_blocks())

    def open_slots(self) -> List[int]:
        """Indices of slots still searching (unfixed MetaPooling)."""
        return [i for i, s in enumerate(self.enhancer_slots()) if isinstance(s, MetaPooling) and not s.is_fixed]

    @property
    def num_fixed_slots(self) -> int:
        """How many slots hold one op (fixed by PMPL, or built from a genotype)."""
        return self.num_slots - len(self.open_slots())

    def arch_parameters(self) -> List[nn.Parameter]:
        """Architecture logits (alpha) of the open slots: PMPL's outer-loop variables (Eq. 3)."""
        return [self.enhancer_slots()[i].arch_alpha for i in self.open_slots()]

    def named_weight_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """Network weights theta: every parameter except the architecture logits."""
        for name, p in self.named_parameters():
            if not name.endswith(ARCH_PARAM_NAME):
                yield name, p

    def weight_parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def slot_probabilities(self) -> List[Optional[torch.Tensor]]:
        """softmax(alpha) per slot (detached); None for a slot that holds a fixed op without logits."""
        return [s.probabilities().detach() if isinstance(s, MetaPooling) else None for s in self.enhancer_slots()]

    def slot_probability_lists(self, digits: int = 6) -> List[Optional[List[float]]]:
        """`slot_probabilities` as rounded floats (for logs, plots and JSON)."""
        return [None if p is None else [round(float(v), digits) for v in p] for p in self.slot_probabilities()]

    @property
    def genotype(self) -> Optional[Genotype]:
        """The architecture once every slot is fixed, else None (use `derive_genotype()` mid-search)."""
        names = [op_name_of(s) for s in self.enhancer_slots()]
        return Genotype(tuple(names)) if all(n is not None for n in names) else None

    def derive_genotype(self) -> Genotype:
        """Fixed slots keep their op; open slots take argmax(alpha) (Alg. 1, "fix the distribution by argmax")."""
        names = []
        for slot in self.enhancer_slots():
            if isinstance(slot, MetaPooling):
                names.append(slot.chosen or slot.op_names[int(slot.arch_alpha.argmax())])
            else:
                names.append(op_name_of(slot))
        return Genotype(tuple(names))

    def fix_slot(self, index: int, op_name: str) -> nn.Module:
        """Replace open slot `index` by its candidate `op_name`, keeping that op's trained weights.

        The replaced slot holds the bare op, so the state_dict matches a model built from the final genotype. A slot
        whose MetaPooling was fixed on its own (`MetaPooling.fix`) is replaced by its chosen op the same way.
        """
        blocks = self.enhancer_blocks()
        if not 0 <= index < len(blocks):  # negative indices too: fix events and logs name slots by their index
            raise IndexError(f'Slot {index} does not exist: this model has {len(blocks)} enhancer slots, '
                             f'0 to {len(blocks) - 1}.')
        block = blocks[index]
        slot = getattr(block, SLOT_ATTR)
        self._check_can_fix(index, op_name)
        setattr(block, SLOT_ATTR, slot.ops[op_name] if slot.is_fixed else slot.fix(slot.op_names.index(op_name)))
        return getattr(block, SLOT_ATTR)

    def _check_can_fix(self, index: int, op_name: str) -> None:
        """ValueError unless slot `index` can take `op_name`: it searches (or was fixed to `op_name` inside its
        MetaPooling) and has that candidate."""
        slot = self.enhancer_slots()[index]
        if not isinstance(slot, MetaPooling):
            raise ValueError(f'Slot {index} is already fixed to {op_name_of(slot)!r}.')
        if slot.is_fixed and slot.chosen != op_name:
            raise ValueError(f'Slot {index} is already fixed to {slot.chosen!r} (by MetaPooling.fix), not '
                             f'{op_name!r}.')
        if op_name not in slot.op_names:
            raise ValueError(f'Slot {index} has no candidate {op_name!r}; its candidates are {slot.op_names}.')

    def train(self, mode: bool = True):
        """`nn.Module.train`; the first time an open search space is put in training mode outside `PMPLSearch`
        (timm's train.py without a genotype, for instance) it logs that this is not PMPL: alpha trained by SGD on
        the training loss is not Eq. 3, which updates it on the meta split."""
        if mode and not getattr(self, 'trained_by_pmpl', False) and not getattr(self, '_warned_not_pmpl', False) \
                and self.open_slots():
            self._warned_not_pmpl = True
            _logger.warning(
                f'Training a Meta-Pooling search space ({len(self.open_slots())} open slots) outside PMPL: its alpha '
                f'would be trained by SGD on the training loss, which is not the PMPL search. To train an '
                f'architecture, give its genotype (timm train.py: --model-kwargs genotype=...); to search, use '
                f'timm-metapool-search or timm_metapool.pmpl.PMPLSearch.')
        return super().train(mode)

    def enhancer_slot_names(self) -> List[str]:
        """Module path of each slot's block (e.g. `blocks.1.0`), in slot order: how errors and cards name slots."""
        names = {id(m): name for name, m in self.named_modules()}
        return [names[id(b)] for b in self.enhancer_blocks()]

    def slot_codes(self) -> List[int]:
        """Each slot as stored in the state_dict (`integrity.slot_code`): candidate index, or open / other."""
        return genotype_codes(self.enhancer_slots())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Every state_dict carries the slot genotype (`integrity.GENOTYPE_STATE_KEY`): parameter-free candidates
        leave no other trace, so without it weights would load silently into another architecture."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + GENOTYPE_STATE_KEY] = codes_tensor(self.slot_codes())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, refusing weights of another genotype by slot (`_load_from_state_dict`).

        Weights without a genotype (timm's own) load strictly only into an all-`skip` model; torch hands modules
        strict=True whatever the caller asked, so the caller's flag is kept here for that one decision.
        """
        self._metapool_strict_load = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            del self._metapool_strict_load

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        stored = state_dict.pop(prefix + GENOTYPE_STATE_KEY, None)
        own = self.slot_codes()
        if stored is not None:
            check_genotype_codes(stored, own, self.enhancer_slot_names())
        elif getattr(self, '_metapool_strict_load', True) and any(c != SKIP_CODE for c in own):
            self._refuse_weights_without_genotype(own)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _refuse_weights_without_genotype(self, own: List[int]) -> None:
        index = next(i for i, c in enumerate(own) if c != SKIP_CODE)
        raise GenotypeMismatchError(
            f'These weights carry no Meta-Pooling genotype (timm\'s own weights, for instance), so they fit exactly '
            f'only an all-\'skip\' model, and this model\'s slot {index} ({self.enhancer_slot_names()[index]}) is '
            f'{describe_code(own[index])}. For a warm start of the shared layers (the other slots start fresh): '
            f'timm.create_model(..., genotype=..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH)), or '
            f'model.load_state_dict(weights, strict=False).')

    def fix_to_genotype(self, genotype: Optional[GenotypeLike] = None) -> Genotype:
        """Fix every open slot in place to `genotype` (default: `derive_genotype()`); returns the final genotype.

        Slots already fixed must agree with the genotype. The whole genotype is checked before any slot is fixed, so
        a refused genotype leaves the model as it was.
        """
        target = self.derive_genotype() if genotype is None else Genotype.parse(genotype, num_slots=self.num_slots)
        to_fix = []
        for index, (slot, op_name) in enumerate(zip(self.enhancer_slots(), target)):
            if isinstance(slot, MetaPooling):
                self._check_can_fix(index, op_name)
                to_fix.append((index, op_name))
            elif op_name_of(slot) != op_name:
                raise ValueError(f'Slot {index} is fixed to {op_name_of(slot)!r}, the genotype asks for {op_name!r}.')
        for index, op_name in to_fix:
            self.fix_slot(index, op_name)
        return target
