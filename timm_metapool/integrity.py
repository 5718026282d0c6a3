"""What makes a Meta-Pooling state_dict safe to load: the genotype it carries, and a checksum of its tensors.

Parameter-free candidates (`skip`, `maxK`, `avgK`, paper Sec. 2.1) leave no trace in a state_dict, so two genotypes
can have identical keys and shapes while computing different functions. Every Meta-Pooling model therefore writes
its slot genotype into its state_dict as one small integer tensor under `GENOTYPE_STATE_KEY` (one code per slot:
the candidate's index in `OP_NAMES`, `SEARCH_SLOT` for an open `MetaPooling`, `OTHER_SLOT` for any other module put
in a slot), and refuses, on load, weights whose genotype differs from its own, naming the first differing slot.
"""
import hashlib
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .mixed_op import MetaPooling
from .ops import OP_NAMES, op_name_of

__all__ = [
    'GENOTYPE_STATE_KEY', 'SEARCH_SLOT', 'OTHER_SLOT', 'GenotypeMismatchError', 'ChecksumMismatchError',
    'slot_code', 'genotype_codes', 'codes_tensor', 'describe_code', 'first_slot_difference', 'check_genotype_codes',
    'state_dict_codes', 'codes_to_op_names', 'describe_key_mismatch', 'weights_checksum', 'check_weights_checksum',
]

GENOTYPE_STATE_KEY = 'metapool_genotype'
SEARCH_SLOT = -1
OTHER_SLOT = -2


class GenotypeMismatchError(ValueError):
    """Weights and the model (or the genotype asked for) describe different architectures."""


class ChecksumMismatchError(ValueError):
    """A weights file's tensors are not the ones written with it (corrupted on disk or in transfer)."""


def slot_code(module: nn.Module) -> int:
    """The code one slot's module is stored as: its candidate index, `SEARCH_SLOT` or `OTHER_SLOT`."""
    if isinstance(module, MetaPooling):
        return SEARCH_SLOT  # its weights are in search-space form (every candidate), fixed by MetaPooling.fix or not
    name = op_name_of(module)
    return OP_NAMES.index(name) if name in OP_NAMES else OTHER_SLOT


def genotype_codes(slots: Sequence[nn.Module]) -> List[int]:
    """Each slot's code (`slot_code`): what a state_dict's genotype entry stores."""
    return [slot_code(s) for s in slots]


def codes_tensor(codes: Sequence[int]) -> torch.Tensor:
    """The state_dict value: int16 on the CPU whatever the model's device (also under a `torch.device` context)."""
    return torch.tensor(list(codes), dtype=torch.int16, device='cpu')


def describe_code(code: int) -> str:
    """A slot code in words, for errors."""
    if code == SEARCH_SLOT:
        return 'the search space (a MetaPooling with every candidate)'
    if 0 <= code < len(OP_NAMES):
        return repr(OP_NAMES[code])
    return 'a module that is none of the eight candidates'


def first_slot_difference(
        stored: Sequence,
        own: Sequence,
        slot_names: Optional[Sequence[str]] = None,
        describe: Callable[[Any], str] = describe_code,
        own_name: str = 'this model',
) -> Optional[str]:
    """A sentence naming the first slot where the weights' slots (codes, or op names with `describe=repr`) differ
    from `own`, or None if they are equal."""
    if len(stored) != len(own):
        return f'the weights have {len(stored)} enhancer slots, {own_name} {len(own)}'
    for index, (have, want) in enumerate(zip(stored, own)):
        if have != want:
            where = f' ({slot_names[index]})' if slot_names else ''
            return f'slot {index}{where} is {describe(have)} in the weights but {describe(want)} in {own_name}'
    return None


def _fix_hint(stored: Sequence[int], own: Sequence[int]) -> str:
    if SEARCH_SLOT in stored and SEARCH_SLOT not in own:
        return ('These are search-space (PMPL supernet) weights: fix them to a genotype first '
                '(`timm-metapool-publish --from-supernet` exports the sub-network, or in Python '
                'supernet.fix_to_genotype() before state_dict()), or retrain the genotype.')
    if SEARCH_SLOT in own and SEARCH_SLOT not in stored:
        return ("These weights are of a fixed genotype and this model is the search space (built without "
                "genotype=): build it with their genotype, timm.create_model(..., genotype=...), or --model-kwargs "
                "genotype=... for timm's scripts.")
    return ('Build the model with the genotype the weights were trained with (their config.json model_args.genotype, '
            f'the safetensors metadata, or the genotype.json of the search). To start a model of another genotype '
            f'from them anyway, delete the {GENOTYPE_STATE_KEY!r} entry and load with strict=False.')


def check_genotype_codes(
        stored: torch.Tensor,
        own: Sequence[int],
        slot_names: Optional[Sequence[str]] = None,
) -> None:
    """Raise `GenotypeMismatchError` unless the weights' genotype tensor equals the model's codes."""
    stored_codes = [int(c) for c in torch.as_tensor(stored).reshape(-1).tolist()]
    difference = first_slot_difference(stored_codes, own, slot_names)
    if difference:
        raise GenotypeMismatchError(f'These weights were made for another Meta-Pooling genotype: {difference}. '
                                    f'{_fix_hint(stored_codes, own)}')


def describe_key_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """'missing: a, b, c, ...; unexpected: ...; other shapes: ...' for the ways `given` does not fit the keys and
    shapes of `expected` (three keys of each), or '' when it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    return '; '.join(f'{what}: {", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""}' for what, keys in
                     (('missing', missing), ('unexpected', unexpected), ('other shapes', reshaped)) if keys)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to('cpu').contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order: independent of the file format."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        digest.update(f'{key}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def check_weights_checksum(state_dict: Mapping[str, torch.Tensor], expected: Optional[str], path: str) -> None:
    """Raise `ChecksumMismatchError` naming `path` when its tensors do not hash to `expected` (None: not recorded)."""
    if expected is None:
        return
    if weights_checksum(state_dict) != expected:
        raise ChecksumMismatchError(
            f'{path!r} is corrupted: its weights do not match the checksum written with them (sha256 {expected[:12]}'
            f'...). Restore the file from a copy, download it again, or re-export it.')


def state_dict_codes(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> Optional[List[int]]:
    """The genotype codes a state_dict carries, or None for weights without one (timm's own, for instance)."""
    stored = state_dict.get(prefix + GENOTYPE_STATE_KEY)
    return None if stored is None else [int(c) for c in torch.as_tensor(stored).reshape(-1).tolist()]


def codes_to_op_names(codes: Sequence[int]) -> Optional[List[str]]:
    """Op names for codes of a fixed genotype, or None when any slot is open or not a candidate."""
    if any(not 0 <= c < len(OP_NAMES) for c in codes):
        return None
    return [OP_NAMES[c] for c in codes]

