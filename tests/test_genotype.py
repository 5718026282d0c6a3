"""Genotype parsing, serialisation and every error path."""
import json
import pathlib

import pytest

from timm_metapool import OP_NAMES, Genotype

N = 16


def test_all_string_forms_agree(tmp_path):
    ops = [OP_NAMES[i % len(OP_NAMES)] for i in range(N)]
    from_list = Genotype.parse(ops, num_slots=N)
    from_string = Genotype.parse(','.join(ops), num_slots=N)
    from_spaced = Genotype.parse(' , '.join(ops), num_slots=N)
    path = tmp_path / 'g.json'
    path.write_text(from_list.to_json(model='mobilenetv2_metapool_100'))
    from_file = Genotype.parse(str(path), num_slots=N)
    from_pathlike = Genotype.parse(path, num_slots=N)
    assert from_list.ops == tuple(ops)
    assert from_list == from_string == from_spaced == from_file == from_pathlike
    assert Genotype.parse(from_list.to_string()) == from_list
    data = json.loads(path.read_text())
    assert data['format_version'] == 1 and data['ops'] == ops and data['model'] == 'mobilenetv2_metapool_100'


@pytest.mark.parametrize('name', OP_NAMES)
def test_uniform_preset(name):
    assert Genotype.parse(name, num_slots=N).ops == (name,) * N


def test_random_is_reproducible_and_seed_dependent():
    a = Genotype.parse('random:0', num_slots=N)
    assert a == Genotype.parse('random:0', num_slots=N)
    assert a != Genotype.parse('random:1', num_slots=N)
    assert set(a.ops) <= set(OP_NAMES) and len(set(a.ops)) > 1


def test_genotype_is_immutable():
    g = Genotype(('skip', 'global'))
    with pytest.raises(Exception):
        g.ops = ('skip',)
    assert hash(g) == hash(Genotype(['skip', 'global']))


def test_wrong_length_names_expected_count():
    with pytest.raises(ValueError, match='3 ops but this model has 16 enhancer slots'):
        Genotype.parse('skip,global,avg3', num_slots=16)


def test_unknown_op_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown op 'avg9' at slot 1; valid ops are: skip, global, max3"):
        Genotype.parse('skip,avg9')


def test_malformed_json(tmp_path):
    path = tmp_path / 'bad.json'
    path.write_text('{"ops": ["skip", ')
    with pytest.raises(ValueError, match='not valid JSON'):
        Genotype.parse(str(path))


def test_json_without_ops(tmp_path):
    path = tmp_path / 'no_ops.json'
    path.write_text('{"genes": []}')
    with pytest.raises(ValueError, match="no 'ops' list"):
        Genotype.parse(str(path))


def test_json_from_future_version(tmp_path):
    path = tmp_path / 'v9.json'
    path.write_text(json.dumps({'format_version': 9, 'ops': ['skip']}))
    with pytest.raises(ValueError, match='format_version 9'):
        Genotype.parse(str(path))


def test_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match='Cannot read genotype file'):
        Genotype.parse(str(tmp_path / 'missing.json'))
    with pytest.raises(ValueError, match='Cannot read genotype file'):
        Genotype.parse(pathlib.Path(tmp_path))  # a directory
    binary = tmp_path / 'weights.json'  # e.g. a checkpoint given where the genotype goes
    binary.write_bytes(b'\x80\x02\xff' + bytes(range(256)))
    with pytest.raises(ValueError, match=r"Genotype file '.*weights\.json' is not UTF-8 text"):
        Genotype.parse(str(binary))


@pytest.mark.parametrize('bad, message', [
    ('', 'Empty genotype'),
    ('random:x', 'seed must be an integer'),
    ('bogus', 'Cannot parse genotype'),
    (3, 'Cannot make a genotype from int'),
    ([], 'at least one op'),
])
def test_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        Genotype.parse(bad, num_slots=N)


def test_presets_need_slot_count():
    with pytest.raises(ValueError, match='needs the model'):
        Genotype.parse('global')
    with pytest.raises(ValueError, match='needs the model'):
        Genotype.parse('random:3')


def test_reserved_keys():
    with pytest.raises(ValueError, match='reserved'):
        Genotype(('skip',)).to_dict(ops=[])
