"Tests for course_lib.callbacks on tiny synthetic data: scripted validation values, exact weight restores, errors."
import copy, warnings
import numpy as np
import pytest
import torch
from torch import nn

from course_lib.learner import Learner, Callback, accuracy, error_rate
from course_lib.progress import ProgressCallback
from course_lib.callbacks import *


pytestmark = pytest.mark.usefixtures('one_thread')  # fixture in conftest.py


from helpers import synth_dls


def make_learner(tmp_path, metrics=(accuracy, error_rate)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    learn = Learner(synth_dls(n=64, bs=16), model, metrics=list(metrics), lr=1e-2, path=tmp_path)
    learn.remove_cb(ProgressCallback)
    return learn


class Script(Callback):
    """Overwrites columns of the recorder's last row with scripted values (after the Recorder, before the trackers),
    and keeps a copy of the weights at the end of every epoch."""
    order = 55
    def __init__(self, **columns): self.columns, self.weights = columns, []
    def after_epoch(self):
        rec, e = self.learn.recorder, self.learn.epoch
        for name, vals in self.columns.items(): rec.values[-1][rec.metric_names.index(name)] = vals[e]
        self.weights.append(copy.deepcopy(self.learn.model.state_dict()))


def same_weights(a, b): return all(torch.equal(a[k], b[k]) for k in a)


# ---------- early stopping ----------

@pytest.mark.parametrize('patience,n_run', [(1, 3), (2, 4), (3, 5), (4, 8)])
def test_early_stopping_stops_at_the_right_epoch(tmp_path, patience, n_run, capsys):
    losses = [1.0, 0.8, 0.9, 0.95, 0.85, 0.7, 0.9, 0.9]  # best at 1, then 3 epochs without improvement, then a new best
    learn = make_learner(tmp_path)
    es = EarlyStoppingCallback(patience=patience)
    learn.fit(8, cbs=[Script(valid_loss=losses), es])
    assert len(learn.recorder.values) == n_run
    if n_run < 8:
        assert es.stopped_epoch == n_run - 1
        assert f'since epoch 1' in capsys.readouterr().out
    assert es.best_epoch == (1 if n_run < 8 else 5)


def test_early_stopping_runs_all_epochs_while_improving(tmp_path):
    learn = make_learner(tmp_path)
    es = EarlyStoppingCallback()
    learn.fit(4, cbs=[Script(valid_loss=[1.0, 0.9, 0.8, 0.7]), es])
    assert len(learn.recorder.values) == 4 and es.stopped_epoch is None and es.best_epoch == 3


def test_min_delta(tmp_path):
    learn = make_learner(tmp_path)
    es = EarlyStoppingCallback(min_delta=0.05, patience=2)
    learn.fit(6, cbs=[Script(valid_loss=[1.0, 0.97, 0.96, 0.9, 0.89, 0.88]), es])
    # 0.97 and 0.96 improve by < 0.05 on 1.0: two epochs without improvement -> stop after epoch 2
    assert len(learn.recorder.values) == 3 and es.best == 1.0


def test_direction_accuracy_vs_loss(tmp_path):
    seq = [0.5, 0.6, 0.55, 0.7]
    # accuracy: higher is better -> 0.6 improves, 0.55 does not -> stop after epoch 2
    learn = make_learner(tmp_path)
    learn.fit(4, cbs=[Script(accuracy=seq), EarlyStoppingCallback('accuracy')])
    assert len(learn.recorder.values) == 3
    # the same numbers read as a loss: 0.6 is worse than 0.5 -> stop after epoch 1
    learn = make_learner(tmp_path)
    learn.fit(4, cbs=[Script(valid_loss=seq), EarlyStoppingCallback('valid_loss')])
    assert len(learn.recorder.values) == 2
    # error_rate goes down
    learn = make_learner(tmp_path)
    learn.fit(4, cbs=[Script(error_rate=[0.5, 0.4, 0.45, 0.3]), EarlyStoppingCallback('error_rate')])
    assert len(learn.recorder.values) == 3
    # an explicit comp wins over the guess from the name
    learn = make_learner(tmp_path)
    learn.fit(4, cbs=[Script(accuracy=seq), EarlyStoppingCallback('accuracy', comp=np.less)])
    assert len(learn.recorder.values) == 2
    assert lower_is_better('train_loss') and lower_is_better('error_rate') and not lower_is_better('accuracy')


def test_unknown_monitor_fails_before_training(tmp_path):
    learn = make_learner(tmp_path)
    before = copy.deepcopy(learn.model.state_dict())
    for cb in (EarlyStoppingCallback('acuracy'), SaveModelCallback('valid-loss')):
        with pytest.raises(ValueError) as e:
            learn.fit(2, cbs=[cb])
        msg = str(e.value)
        assert repr(cb.monitor) in msg
        for name in ('train_loss', 'valid_loss', 'accuracy', 'error_rate'): assert repr(name) in msg
        assert "'time'" not in msg and "'epoch'" not in msg
    assert same_weights(before, learn.model.state_dict())
    assert not any(isinstance(c, TrackerCallback) for c in learn.cbs)  # removed again after the failed fit


def test_bad_arguments():
    with pytest.raises(ValueError, match='patience must be an integer >= 1'): EarlyStoppingCallback(patience=0)
    with pytest.raises(ValueError, match='patience'): EarlyStoppingCallback(patience=1.5)
    with pytest.raises(ValueError, match='min_delta'): EarlyStoppingCallback(min_delta=-0.01)
    with pytest.raises(ValueError, match='min_delta'): SaveModelCallback(min_delta=float('nan'))
    with pytest.raises(TypeError, match='comp must be a function'): EarlyStoppingCallback(comp='less')
    with pytest.raises(TypeError, match='monitor must be the name'): SaveModelCallback(monitor=accuracy)
    with pytest.raises(ValueError, match='not both'): SaveModelCallback(every_epoch=True, at_end=True)
    with pytest.raises(ValueError, match='fname'): SaveModelCallback(fname='')


def test_nan_counts_as_no_improvement(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(4, cbs=[Script(valid_loss=[1.0, float('nan'), 0.5, 0.4]), EarlyStoppingCallback()])
    assert len(learn.recorder.values) == 2


# ---------- saving the best model ----------

def test_save_reloads_the_best_epochs_exact_weights(tmp_path):
    learn = make_learner(tmp_path)
    script = Script(valid_loss=[1.0, 0.8, 0.5, 0.6, 0.7])
    learn.fit(5, cbs=[script, SaveModelCallback()])
    assert (tmp_path/'models'/'model.pth').exists()
    assert len(script.weights) == 5
    assert same_weights(learn.model.state_dict(), script.weights[2])       # bit-exact, BatchNorm buffers included
    assert not same_weights(learn.model.state_dict(), script.weights[-1])  # and not the last epoch's weights
    state = torch.load(tmp_path/'models'/'model.pth', weights_only=True)
    assert 'opt' not in state


def test_save_by_accuracy_and_with_early_stopping(tmp_path, capsys):
    learn = make_learner(tmp_path)
    script = Script(accuracy=[0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    save = SaveModelCallback('accuracy', fname='best', with_opt=True)
    learn.fit(6, cbs=[script, EarlyStoppingCallback('accuracy', patience=2), save])
    assert len(learn.recorder.values) == 4 and save.best_epoch == 1 and save.best == 0.7
    assert same_weights(learn.model.state_dict(), script.weights[1])
    assert 'opt' in torch.load(tmp_path/'models'/'best.pth', weights_only=True)
    out = capsys.readouterr().out
    assert 'Better model found at epoch 1 with accuracy value: 0.700000' in out


def test_stopping_epoch_is_compared_by_save_model_first(tmp_path):
    # early stopping on the loss, saving on accuracy: the epoch that stops training has the best accuracy
    learn = make_learner(tmp_path)
    script = Script(valid_loss=[1.0, 1.1], accuracy=[0.5, 0.9])
    save = SaveModelCallback('accuracy')
    learn.fit(4, cbs=[EarlyStoppingCallback(), save, script])
    assert len(learn.recorder.values) == 2 and save.best_epoch == 1
    assert same_weights(learn.model.state_dict(), script.weights[1])


def test_every_epoch_and_at_end(tmp_path):
    learn = make_learner(tmp_path)
    script = Script(valid_loss=[1.0, 0.5, 0.7, 0.9])
    learn.fit(4, cbs=[script, SaveModelCallback(every_epoch=True)])
    assert sorted(p.name for p in (tmp_path/'models').iterdir()) == [f'model_{i}.pth' for i in range(4)]
    assert same_weights(learn.model.state_dict(), script.weights[-1])  # nothing loaded back
    for i in range(4):
        assert same_weights(torch.load(tmp_path/'models'/f'model_{i}.pth', weights_only=True)['model'],
                            script.weights[i])

    learn = make_learner(tmp_path/'b')
    learn.fit(4, cbs=[Script(valid_loss=[1.0, 0.5, 0.7, 0.9]), SaveModelCallback(every_epoch=2)])
    assert sorted(p.name for p in (tmp_path/'b'/'models').iterdir()) == ['model_0.pth', 'model_2.pth']

    learn = make_learner(tmp_path/'c')
    script = Script(valid_loss=[1.0, 0.5, 0.7, 0.9])
    learn.fit(4, cbs=[script, SaveModelCallback(at_end=True)])
    assert [p.name for p in (tmp_path/'c'/'models').iterdir()] == ['model.pth']
    assert same_weights(torch.load(tmp_path/'c'/'models'/'model.pth', weights_only=True)['model'], script.weights[-1])


def test_reset_on_fit(tmp_path):
    learn = make_learner(tmp_path)
    s1 = Script(valid_loss=[1.0, 0.5, 0.7])
    save = SaveModelCallback(reset_on_fit=False)
    learn.add_cb(save)
    learn.fit(3, cbs=[s1])
    assert same_weights(learn.model.state_dict(), s1.weights[1])
    learn.fit(2, cbs=[Script(valid_loss=[0.6, 0.8])])  # never better than 0.5 from the first fit
    assert same_weights(learn.model.state_dict(), s1.weights[1])
    learn.remove_cb(save)

    learn = make_learner(tmp_path/'r')
    save = SaveModelCallback()  # reset_on_fit=True: the second fit has its own best
    learn.add_cb(save)
    learn.fit(3, cbs=[Script(valid_loss=[1.0, 0.5, 0.7])])
    s2 = Script(valid_loss=[0.6, 0.8])
    learn.fit(2, cbs=[s2])
    assert save.best == 0.6 and same_weights(learn.model.state_dict(), s2.weights[0])


def test_lr_find_with_trackers_attached(tmp_path):
    pytest.importorskip('course_lib.lr_finder')
    learn = make_learner(tmp_path)
    learn.add_cbs([SaveModelCallback(), EarlyStoppingCallback()])
    before = copy.deepcopy(learn.model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.lr_find(num_it=10, show_plot=False)
    assert same_weights(before, learn.model.state_dict())
    assert not (tmp_path/'models').exists()
    learn.fit(2)  # and they still work afterwards
    assert (tmp_path/'models'/'model.pth').exists()


def test_epochs_without_a_value_neither_reset_nor_add_to_the_wait(tmp_path):
    "A skipped validation (valid_loss None) is not 'no improvement': patience counts only epochs that were measured."
    from course_lib.keras_lecture import ReduceLROnPlateau
    learn = make_learner(tmp_path)
    plateau = ReduceLROnPlateau(patience=1)
    with pytest.warns(UserWarning, match='has no value at epoch'):
        learn.fit(5, cbs=[Script(valid_loss=[1.0, None, None, None, 0.9]), EarlyStoppingCallback(patience=1), plateau])
    assert len(learn.recorder.values) == 5 and plateau.reductions == []
    learn = make_learner(tmp_path)
    with pytest.warns(UserWarning, match='has no value at epoch'):
        learn.fit(5, cbs=[Script(valid_loss=[1.0, None, 1.0, None, 0.9]), EarlyStoppingCallback(patience=2)])
    assert len(learn.recorder.values) == 5          # the one unimproved epoch (2) is below patience 2
    learn = make_learner(tmp_path)
    with pytest.warns(UserWarning, match='has no value at epoch'):
        learn.fit(6, cbs=[Script(valid_loss=[1.0, None, 1.0, None, 1.0, 0.5]), EarlyStoppingCallback(patience=2)])
    assert len(learn.recorder.values) == 5          # two unimproved epochs (2 and 4): stopped after epoch 4


def test_tracking_a_validation_value_without_validation_items_is_an_error(tmp_path):
    "Training on every photo leaves nothing to monitor: the trackers say so instead of never saving or stopping."
    for cb in (SaveModelCallback(), EarlyStoppingCallback(monitor='accuracy', patience=1)):
        learn = make_learner(tmp_path)
        learn.dls = synth_dls(n=64, bs=16, n_train=64)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with pytest.raises(ValueError, match=r"monitors '(valid_loss|accuracy)', a validation value, but the "
                                                 r"validation set has no items"):
                learn.fit(1, cbs=[cb])
    learn = make_learner(tmp_path)
    learn.dls = synth_dls(n=64, bs=16, n_train=64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(2, cbs=[SaveModelCallback(monitor='train_loss')])   # a training value is still there to track
    assert (tmp_path/'models'/'model.pth').exists()
