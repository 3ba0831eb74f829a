"""`course-lib pets` interrupted (Ctrl-C) during each of its steps: what finished is kept, the report says where the run
stopped, and no model is ever half-written (an earlier run's `model.pth` stays usable).

Ctrl-C is a `KeyboardInterrupt` raised in the middle of the step: while the photos are listed, after a few batches of
the finder and of training, at the first batch of the interpretation's predictions (the tiny validation set is one
batch), and halfway through writing the model. The runs are in-process on a 2-photos-per-breed copy of the sample at
32 pixels, so each takes seconds; `test_cli.py` sends a real SIGINT to a real process once."""
import io, json, shutil
from pathlib import Path
import pytest
import torch

import course_lib.cli as cli
import course_lib.external as D
import course_lib.loader as LD
import course_lib.learner as L
from course_lib.interpret import ClassificationInterpretation
from course_lib.learner import Learner
from course_lib.export import load_learner

SAMPLE = D.data_home()/'oxford-iiit-pet-sample'/'images'
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the pets sample is not at {SAMPLE} (set COURSE_LIB_DATA)")
TINY = ['--arch', 'efficientnet_lite0', '--size', '32', '--bs', '16', '--freeze-epochs', '1', '--epochs', '0',
        '--lr', '1e-2']


@pytest.fixture(scope='module')
def tiny_images(tmp_path_factory):
    "Two photos per breed from the sample (74 photos)."
    folder = tmp_path_factory.mktemp('tiny')/'images'; folder.mkdir()
    by_breed = {}
    for f in sorted(SAMPLE.glob('*.jpg')): by_breed.setdefault(f.name.rsplit('_', 1)[0], []).append(f)
    for files in by_breed.values():
        for f in files[:2]: shutil.copy(f, folder/f.name)
    return folder


@pytest.fixture(scope='module')
def earlier_run(tiny_images, tmp_path_factory):
    "The folder of a run that finished: the earlier run that a new one, interrupted, must not damage."
    out = tmp_path_factory.mktemp('earlier')/'run'
    assert cli.main(['pets', '--out', str(out), '--data', str(tiny_images), *TINY]) == 0
    return out


def interrupt_batches_of(monkeypatch, owner, method, after=2):
    "Ctrl-C after `after` batches of the data loaders, counted from when `owner.method` starts."
    state = {'on': False, 'n': 0}
    real_method, real_iter = getattr(owner, method), LD.DataLoader.__iter__
    def started(*args, **kwargs):
        state['on'] = True
        return real_method(*args, **kwargs)
    def batches(self):
        for b in real_iter(self):
            if state['on']:
                state['n'] += 1
                if state['n'] > after: raise KeyboardInterrupt
            yield b
    monkeypatch.setattr(owner, method, started)
    monkeypatch.setattr(LD.DataLoader, '__iter__', batches)


def interrupt_data(monkeypatch):
    def listing(*args, **kwargs): raise KeyboardInterrupt      # while the photos are being listed
    monkeypatch.setattr(cli, 'get_image_files', listing)


def interrupt_export_halfway(monkeypatch):
    real = L.torch.save
    def half_then_ctrl_c(obj, f, *args, **kwargs):
        buf = io.BytesIO(); real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:buf.tell() // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(L.torch, 'save', half_then_ctrl_c)


STEPS = {   # step: (how to interrupt it, the files of this run that must be there afterwards)
    'data': (interrupt_data, []),
    'lr_find': (lambda mp: interrupt_batches_of(mp, Learner, 'lr_find'), []),
    'fine_tune': (lambda mp: interrupt_batches_of(mp, Learner, 'fine_tune'), ['lr_find.png']),
    'interpretation': (lambda mp: interrupt_batches_of(mp, ClassificationInterpretation, 'from_learner', after=0),
                       ['lr_find.png', 'loss.png']),
    'export': (interrupt_export_halfway, ['lr_find.png', 'loss.png', 'confusion.png']),
    'retrain': (lambda mp: interrupt_batches_of(mp, cli, '_retrained'),
                ['lr_find.png', 'loss.png', 'confusion.png', 'model.pth']),
}


def run_interrupted(step, out, images, monkeypatch, capsys):
    how, _ = STEPS[step]
    how(monkeypatch)
    capsys.readouterr()
    rc = cli.main(['pets', '--out', str(out), '--data', str(images), *TINY])
    monkeypatch.undo()
    err = capsys.readouterr().err
    return rc, err, json.loads((out/'metrics.json').read_text()), (out/'report.md').read_text()


@pytest.mark.parametrize('step', [s for s in STEPS if s != 'export'])
def test_ctrl_c_keeps_what_finished_and_says_where_it_stopped(step, tiny_images, tmp_path, monkeypatch, capsys):
    out = tmp_path/'run'
    rc, err, m, report = run_interrupted(step, out, tiny_images, monkeypatch, capsys)
    kept = STEPS[step][1]
    assert rc == 130 and f"interrupted during '{step}'" in err, err
    assert m['status'] == 'interrupted' and m['step'] == step and m['files'] == kept
    assert f"**The run was interrupted during the step '{step}'.**" in report
    assert sorted(p.name for p in out.iterdir()) == sorted(['report.md', 'metrics.json', *kept])
    for name in ('lr_find', 'loss', 'confusion'):      # the report links only the plots this run made
        assert (f'![{name}]({name}.png)' in report) == (f'{name}.png' in kept), name
    assert ('lr_min' in m) == (step not in ('data', 'lr_find'))
    if step == 'interpretation': assert [r['phase'] for r in m['epochs']] == ['frozen']


def test_ctrl_c_while_the_model_is_written_keeps_the_earlier_model(earlier_run, tiny_images, tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path/'run'; shutil.copytree(earlier_run, out)
    before = (out/'model.pth').read_bytes()
    rc, err, m, report = run_interrupted('export', out, tiny_images, monkeypatch, capsys)
    assert rc == 130 and "interrupted during 'export'" in err, err
    assert m['status'] == 'interrupted' and m['step'] == 'export' and 'model' not in m
    assert m['files'] == STEPS['export'][1] and m['earlier_files'] == ['model.pth']
    assert "Left in this folder by an earlier run, not this one's: `model.pth`." in report
    assert (out/'model.pth').read_bytes() == before and load_learner(out/'model.pth').dls.vocab
    assert sorted(p.name for p in out.iterdir()) == sorted(['report.md', 'metrics.json', 'model.pth',
                                                             *STEPS['export'][1]])   # no temporary file


def test_ctrl_c_while_retraining_keeps_the_validation_runs_model(tiny_images, tmp_path, monkeypatch, capsys):
    out = tmp_path/'run'
    rc, err, m, report = run_interrupted('retrain', out, tiny_images, monkeypatch, capsys)
    assert rc == 130 and m['step'] == 'retrain' and m['trained_on']['n'] == m['n_train'] < m['n_train'] + m['n_valid']
    assert f"trained on the {m['n_train']} training photos" in report and load_learner(out/'model.pth').dls.vocab


def test_an_earlier_runs_plots_are_named_as_such(earlier_run, tiny_images, tmp_path, monkeypatch, capsys):
    out = tmp_path/'run'; shutil.copytree(earlier_run, out)
    rc, _, m, report = run_interrupted('lr_find', out, tiny_images, monkeypatch, capsys)
    assert rc == 130 and m['files'] == [] and m['earlier_files'] == list(cli.OUTPUT_FILES)
    assert '![' not in report and 'not this one\'s: `lr_find.png`, `loss.png`, `confusion.png`, `model.pth`' in report
    assert load_learner(out/'model.pth') is not None
