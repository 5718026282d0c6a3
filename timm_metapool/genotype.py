"""Genotype: the architecture PMPL finds, one receptive-field enhancer per slot (paper Fig. 1c).

A genotype is immutable. It parses from a list of op names, a comma-separated string, a uniform preset (`global`:
every slot the same op), `random:SEED` (the paper's "Random" ablation, Table 3) or a path to a JSON file written by
the search; it serialises to that JSON and to the compact string.
"""
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .ops import OP_NAMES

__all__ = ['Genotype', 'GenotypeLike', 'GENOTYPE_FORMAT_VERSION']

GENOTYPE_FORMAT_VERSION = 1

_ALLOWED_FORMS = (
    "a list of op names, a comma-separated string ('global,avg3,...'), a uniform preset (one op name), "
    "'random:SEED', or a path to a genotype JSON file"
)


@dataclass(frozen=True)
class Genotype:
    """One op name per enhancer slot, in slot order (the order of `model.enhancer_slots()`)."""
    ops: Tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.ops, str) or not isinstance(self.ops, (tuple, list)):
            raise ValueError(f'Genotype ops must be a sequence of op names, got {type(self.ops).__name__}.')
        object.__setattr__(self, 'ops', tuple(self.ops))
        if not self.ops:
            raise ValueError('A genotype needs at least one op.')
        for i, op in enumerate(self.ops):
            if op not in OP_NAMES:
                raise ValueError(
                    f"Unknown op {op!r} at slot {i}; valid ops are: {', '.join(OP_NAMES)}.")

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self):
        return iter(self.ops)

    def __getitem__(self, index: int) -> str:
        return self.ops[index]

    def __str__(self) -> str:
        return self.to_string()

    def to_string(self) -> str:
        """The compact form, e.g. `skip,global,avg3,...`; parses back with `Genotype.parse`."""
        return ','.join(self.ops)

    def to_dict(self, **extra: Any) -> Dict[str, Any]:
        """JSON-ready dict with the format version; `extra` (search statistics, arguments) is stored beside the ops."""
        if 'ops' in extra or 'format_version' in extra:
            raise ValueError("'ops' and 'format_version' are reserved keys of a genotype file.")
        return {'format_version': GENOTYPE_FORMAT_VERSION, 'ops': list(self.ops), **extra}

    def to_json(self, **extra: Any) -> str:
        """`to_dict(**extra)` as indented JSON: the genotype file format."""
        return json.dumps(self.to_dict(**extra), indent=2)

    @classmethod
    def uniform(cls, op_name: str, num_slots: int) -> 'Genotype':
        """Every slot the same op (the paper's No / Local / Global rows of Table 3)."""
        return cls((op_name,) * num_slots)

    @classmethod
    def random(cls, seed: int, num_slots: int, op_names: Sequence[str] = OP_NAMES) -> 'Genotype':
        """Each slot drawn uniformly from `op_names` with a private RNG, so the same seed gives the same genotype."""
        rng = random.Random(seed)
        return cls(tuple(rng.choice(op_names) for _ in range(num_slots)))

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = 'genotype data') -> 'Genotype':
        """The genotype of a `to_dict()` dict (its 'ops' list); ValueError naming `source` when it is not one."""
        if not isinstance(data, dict) or 'ops' not in data:
            raise ValueError(f"{source} has no 'ops' list; a genotype file looks like "
                             f'{{"format_version": {GENOTYPE_FORMAT_VERSION}, "ops": ["skip", "global", ...]}}.')
        version = data.get('format_version', GENOTYPE_FORMAT_VERSION)
        if version != GENOTYPE_FORMAT_VERSION:
            raise ValueError(f'{source} has format_version {version!r}; this timm_metapool reads version '
                             f'{GENOTYPE_FORMAT_VERSION}. Upgrade timm_metapool or re-export the genotype.')
        if not isinstance(data['ops'], list):
            raise ValueError(f"{source}: 'ops' must be a list of op names, got {type(data['ops']).__name__}.")
        return cls(tuple(data['ops']))

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> 'Genotype':
        """The genotype of a genotype file (`to_json`, or a search's genotype.json); ValueError naming the file."""
        try:
            with open(path, 'r', encoding='utf-8') as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f'Cannot read genotype file {str(path)!r}: {e.strerror or e}.') from e
        except UnicodeDecodeError as e:
            raise ValueError(f'Genotype file {str(path)!r} is not UTF-8 text, so not a genotype JSON file '
                             f'({e.reason} at byte {e.start}).') from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f'Genotype file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}, '
                             f'column {e.colno}).') from e
        return cls.from_dict(data, source=f'Genotype file {str(path)!r}')

    @classmethod
    def parse(cls, value: 'GenotypeLike', num_slots: Optional[int] = None) -> 'Genotype':
        """Parse any accepted form. With `num_slots`, presets expand to it and the length is checked against it."""
        genotype = cls._parse_any(value, num_slots)
        if num_slots is not None and len(genotype) != num_slots:
            raise ValueError(f'Genotype has {len(genotype)} ops but this model has {num_slots} enhancer slots; '
                             f'give exactly {num_slots} ops (or a preset such as "skip" or "random:0").')
        return genotype

    @classmethod
    def _parse_any(cls, value: 'GenotypeLike', num_slots: Optional[int]) -> 'Genotype':
        if isinstance(value, Genotype):
            return value
        if isinstance(value, os.PathLike):
            return cls.from_json_file(value)
        if isinstance(value, (list, tuple)):
            return cls(tuple(value))
        if not isinstance(value, str):
            raise ValueError(f'Cannot make a genotype from {type(value).__name__}; give {_ALLOWED_FORMS}.')
        text = value.strip()
        if not text:
            raise ValueError(f'Empty genotype string; give {_ALLOWED_FORMS}.')
        if text.lower().startswith('random:'):
            seed_text = text.split(':', 1)[1]
            try:
                seed = int(seed_text)
            except ValueError:
                raise ValueError(f"Bad random genotype {text!r}: the seed must be an integer, as in 'random:0'.")
            return cls.random(seed, cls._require_slots(num_slots, text))
        if ',' in text:
            return cls(tuple(op.strip() for op in text.split(',')))
        if text in OP_NAMES:
            return cls.uniform(text, cls._require_slots(num_slots, text))
        if text.endswith('.json') or os.path.exists(text):
            return cls.from_json_file(text)
        raise ValueError(f"Cannot parse genotype {text!r}: not an op name ({', '.join(OP_NAMES)}), not a "
                         f'comma-separated list and not an existing file. Give {_ALLOWED_FORMS}.')

    @staticmethod
    def _require_slots(num_slots: Optional[int], text: str) -> int:
        if num_slots is None:
            raise ValueError(f'Genotype {text!r} is a preset; it needs the model\'s slot count '
                             f'(Genotype.parse({text!r}, num_slots=N)).')
        return num_slots


GenotypeLike = Union[Genotype, str, os.PathLike, Sequence[str]]
