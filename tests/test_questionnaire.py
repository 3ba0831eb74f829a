"""The questionnaire notebook's layout (Q1..Q23, each followed by a checking code cell) and `check()`'s marking."""
import json, math, re
from pathlib import Path

import pytest
import torch

from course_lib.questionnaire import check, CHECKABLE, exp_softmax_columns, pet_breed

NB = Path(__file__).resolve().parents[1]/'nbs'/'16_questionnaire.ipynb'
Q_RE = re.compile(r'^\*\*Q(\d+)\.\*\*')
CHECK_RE = re.compile(r'\bassert\b|\btest_(eq|close|fail|ne|is|shuffled)\b|>>>')

def _cells():
    return [(c['cell_type'], ''.join(c['source'])) for c in json.loads(NB.read_text())['cells']]

def test_questions_in_order():
    cells = _cells()
    qs = [(i, int(m.group(1))) for i, (t, s) in enumerate(cells) if t == 'markdown' and (m := Q_RE.match(s))]
    assert [q for _, q in qs] == list(range(1, 24))
    for i, q in qs:
        assert i + 1 < len(cells), f"Q{q} is the last cell: no code cell checks it"
        kind, src = cells[i + 1]
        assert kind == 'code', f"the cell after Q{q} is {kind}, not a code cell"
        assert CHECK_RE.search(src), f"the code cell after Q{q} contains no assert/test_*/doctest"

def test_no_stray_question_markers():
    # a "**Q" that does not start a cell would be missed by tools that read the format
    for t, s in _cells():
        if t == 'markdown' and not Q_RE.match(s): assert not re.search(r'^\*\*Q\d+\.\*\*', s, re.M)

def test_book_wording_of_some_questions():
    md = {int(m.group(1)): s for t, s in _cells() if t == 'markdown' and (m := Q_RE.match(s))}
    assert 'log(-2)' in md[15] and 'resnet50 and resnet101' in md[22] and 'to_fp16' in md[23]
    assert md[1].startswith('**Q1.** Why do we first resize to a large size on the CPU')

RIGHT = {10: ('log_softmax', 'nll_loss'), 13: ([1.02, 0.08, 3.49], [0.22, 0.02, 0.76]), 15: float('nan'),
         20: [1e-6, 1e-5, 1e-4], 22: ([3, 4, 6, 3], [3, 4, 23, 3])}
ALSO_RIGHT = {10: ['F.nll_loss', 'Log Softmax'], 13: exp_softmax_columns([0.02, -2.49, 1.25], 4),
              15: torch.log(torch.tensor(-2.)), 20: (1e-6, 1.00001e-5, 1e-4), 22: [(3, 4, 6, 3), (3, 4, 23, 3)]}
WRONG = {10: [('softmax', 'nll_loss'), ('log_softmax',), 'cross_entropy', 42],
         13: [([1.02, 0.08, 3.49], [0.33, 0.33, 0.33]), ([2.02, 0.08, 3.49], [0.22, 0.02, 0.76]), 'x',
              ([1.02], [0.22])],
         15: [math.log(2), -0.69, None, 'minus infinity'],
         20: [[1e-6, 5.05e-5, 1e-4], [1e-4, 1e-4, 1e-3], [1e-6, 1e-4], None],
         22: [([3, 4, 6, 3], [3, 4, 6, 3]), ([3, 8, 36, 3], [3, 4, 23, 3]), 101, None]}

def test_supported_questions():
    assert set(CHECKABLE) == set(RIGHT) == set(WRONG)

@pytest.mark.parametrize('q', sorted(RIGHT))
def test_check_accepts_right(q, capsys):
    assert check(q, RIGHT[q]) is True
    assert check(q, ALSO_RIGHT[q]) is True
    assert capsys.readouterr().out.count('✓') == 2

@pytest.mark.parametrize('q', sorted(WRONG))
def test_check_rejects_wrong(q, capsys):
    for ans in WRONG[q]:
        assert check(q, ans) is False, f"Q{q}: {ans!r} was accepted"
        out = capsys.readouterr().out
        assert out.startswith(f'✗ Q{q}: not quite – ') and len(out) > 25   # a hint follows

def test_check_unsupported_question():
    with pytest.raises(ValueError, match=r'supports questions \[10, 13, 15, 20, 22\]'): check(9, 'no')

def test_pet_breed_error_names_file():
    with pytest.raises(ValueError, match="'great_pyrenees.jpg'"): pet_breed('some/dir/great_pyrenees.jpg')
