"Tests for course_lib.learner on small synthetic data (no images): schedules, lrs, errors, callbacks, persistence."
import math, os, pickle, re, shutil, subprocess, sys, warnings
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader as TorchDataLoader

from course_lib.optimizer import *
from course_lib.learner import *
from course_lib.progress import *
from course_lib.schedule import *
from course_lib.export import *
from course_lib.oom import *
from course_lib.export import _check_plain


from helpers import synth_dls


def mlp():
    return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def quiet(learn):
    learn.remove_cb(ProgressCallback)
    return learn


# ---------- schedule ----------

def test_combined_cos_known_points():
    f = combined_cos(0.25, 1e-3 / 25, 1e-3, 1e-3 / 1e5)
    assert f(0.) == pytest.approx(4e-5)
    assert f(0.25) == pytest.approx(1e-3)
    assert f(1.) == pytest.approx(1e-8)
    assert f(0.125) == pytest.approx((4e-5 + 1e-3) / 2)  # cosine midpoint is the arithmetic mean
    # a quarter of the way: cosine, not linear
    assert f(0.0625) == pytest.approx(4e-5 + (1 - math.cos(math.pi / 4)) / 2 * (1e-3 - 4e-5))
    assert f(0.25 + 0.75 / 4) == pytest.approx(1e-8 + (1 + math.cos(math.pi / 4)) / 2 * (1e-3 - 1e-8))
    xs = [i / 100 for i in range(101)]
    vals = [f(x) for x in xs]
    assert all(a <= b for a, b in zip(vals[:25], vals[1:26]))   # rising until pct_start
    assert all(a >= b for a, b in zip(vals[25:], vals[26:]))    # then falling


def test_fit_one_cycle_lr_and_mom_per_batch():
    torch.manual_seed(0)
    dls = synth_dls(n=256, bs=16)  # 12 training batches
    learn = quiet(Learner(dls, mlp(), splitter=lambda m: [list(m[:3].parameters()), list(m[3].parameters())]))
    n_epoch, lr_max = 4, slice(1e-4, 1e-2)
    learn.fit_one_cycle(n_epoch, lr_max)
    rec, n_iter = learn.recorder, len(dls.train)
    total = n_epoch * n_iter
    assert len(rec.lrs) == total
    assert rec.lrs[0] == pytest.approx([1e-4 / 25, 1e-2 / 25])
    assert rec.moms[0] == pytest.approx([0.95, 0.95])
    # pct_start=0.25 of 48 batches -> batch 12 is exactly the peak
    assert rec.lrs[12] == pytest.approx([1e-4, 1e-2])
    assert rec.moms[12] == pytest.approx([0.85, 0.85])
    # last batch: pct = (total-1)/total, close to the final value
    f = combined_cos(0.25, 1e-2 / 25, 1e-2, 1e-2 / 1e5)
    assert rec.lrs[-1][1] == pytest.approx(f((total - 1) / total))
    assert f(1.) == pytest.approx(1e-7)
    g = combined_cos(0.25, 0.95, 0.85, 0.95)
    for i in (0, 5, 12, 30, total - 1):
        assert rec.moms[i][0] == pytest.approx(g(i / total))
        # momentum mirrors lr: high lr <-> low momentum
    assert max(range(total), key=lambda i: rec.lrs[i][1]) == min(range(total), key=lambda i: rec.moms[i][1])
    # the optimiser's betas really were changed, only beta1
    assert all(pg['betas'][1] == 0.99 for pg in learn.opt.param_groups)


def test_schedule_not_applied_during_validation():
    seen = []
    class Spy(Callback):
        order = 99
        def before_batch(self):
            if not self.learn.training: seen.append((self.learn.get_hyper('lr')[0], self.learn.get_hyper('mom')[0]))
        def after_train(self): self.last_train = (self.learn.get_hyper('lr')[0], self.learn.get_hyper('mom')[0])
        def after_validate(self): assert set(seen[-len(self.learn.dls.valid):]) == {self.last_train}
    learn = quiet(Learner(synth_dls(), mlp(), cbs=[Spy()]))
    learn.fit_one_cycle(2, 1e-2)
    assert len(seen) == 2 * len(learn.dls.valid)


# ---------- learning rates per group ----------

def test_group_lrs():
    assert group_lrs(3e-3, 3) == [3e-3] * 3
    assert group_lrs(slice(1e-5, 1e-3), 3) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert group_lrs(slice(1e-6, 1e-2), 5) == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    assert group_lrs(slice(1e-3), 3) == pytest.approx([1e-4, 1e-4, 1e-3])
    assert group_lrs(slice(1e-3), 1) == [1e-3]
    assert group_lrs(slice(1e-5, 1e-3), 1) == [1e-3]


def test_set_lrs_maps_splitter_groups_to_torch_groups():
    model = mlp()
    splitter = lambda m: [list(m[0].parameters()), list(m[1].parameters()), list(m[3].parameters())]
    learn = Learner(synth_dls(), model, splitter=splitter)
    learn.create_opt()
    learn.set_lrs(slice(1e-5, 1e-3))
    # group 0: Linear (weight decays, bias does not) -> 2 torch groups; group 1: BatchNorm -> 1 (no decay); group 2: 2
    pgs = learn.opt.param_groups
    assert [(pg['group_idx'], pg['decay']) for pg in pgs] == [(0, True), (0, False), (1, False), (2, True), (2, False)]
    assert [pg['lr'] for pg in pgs] == pytest.approx([1e-5, 1e-5, 1e-4, 1e-3, 1e-3])
    assert [pg['weight_decay'] for pg in pgs] == [0.01, 0., 0., 0.01, 0.]
    assert learn.get_hyper('lr') == pytest.approx([1e-5, 1e-4, 1e-3])
    learn.set_lrs(slice(1e-2))
    assert learn.get_hyper('lr') == pytest.approx([1e-3, 1e-3, 1e-2])


def test_default_optimiser_matches_adamw_with_no_decay_group():
    torch.manual_seed(0)
    m1 = mlp(); m2 = mlp(); m2.load_state_dict(m1.state_dict())
    learn = quiet(Learner(synth_dls(), m1, lr=1e-2))
    learn.create_opt()
    nd = no_decay_ids(m2)
    ref = torch.optim.AdamW([{'params': [p for p in m2.parameters() if id(p) not in nd], 'weight_decay': 0.01},
                             {'params': [p for p in m2.parameters() if id(p) in nd], 'weight_decay': 0.}],
                            lr=1e-2, betas=(0.9, 0.99), eps=1e-5)
    x, y = next(iter(synth_dls().train))
    for m, opt in ((m1, learn.opt), (m2, ref)):
        m.train()
        for _ in range(3):
            nn.functional.cross_entropy(m(x), y).backward(); opt.step(); opt.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()): assert torch.equal(a, b)


# ---------- errors ----------

@pytest.mark.parametrize('lr', [0, -1e-3, float('nan'), float('inf')])
def test_bad_lr(lr):
    learn = quiet(Learner(synth_dls(), mlp()))
    with pytest.raises(ValueError, match=r'lr must be a positive finite number, got ' + re_escape(repr(lr))):
        learn.fit(1, lr=lr)


def re_escape(s):
    import re
    return re.escape(s)


def test_bad_lr_in_constructor_and_slices():
    with pytest.raises(ValueError, match=r'got -0\.1'):
        Learner(synth_dls(), mlp(), lr=-0.1)
    learn = quiet(Learner(synth_dls(), mlp()))
    with pytest.raises(ValueError, match=r'start 0\.01 is larger than its stop 0\.0001'):
        learn.fit_one_cycle(1, slice(1e-2, 1e-4))
    with pytest.raises(ValueError, match=r'stop of the learning-rate slice.*got -1'):
        learn.set_lrs(slice(-1))


@pytest.mark.parametrize('n', [0, -2, 1.5])
def test_bad_n_epoch(n):
    learn = quiet(Learner(synth_dls(), mlp()))
    with pytest.raises(ValueError, match=f'n_epoch must be an integer >= 1, got {n}'):
        learn.fit(n)
    with pytest.raises(ValueError, match=f'got {n}'):
        learn.fit_one_cycle(n)


def test_empty_dataloaders():
    dls = synth_dls(n=40, bs=64)
    dls.train = TorchDataLoader(dls.train.dataset, batch_size=64, drop_last=True)
    with pytest.raises(ValueError, match=r'train DataLoader is empty \(len\(dls.train\) == 0\)'):
        quiet(Learner(dls, mlp())).fit(1)
    dls = synth_dls(n=40, bs=64, n_train=20)
    dls.valid = TorchDataLoader(dls.valid.dataset, batch_size=64, drop_last=True)  # items, but no batch
    with pytest.raises(ValueError, match=r'valid DataLoader is empty'):
        quiet(Learner(dls, mlp())).fit(1)


def test_no_validation_items_trains_on_everything():
    "A validation set without items (training on every photo) trains, warns, records no valid values."
    learn = quiet(Learner(synth_dls(n=40, n_train=40), mlp(), metrics=[accuracy]))
    before = [p.detach().clone() for p in learn.model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        learn.fit_one_cycle(2, 1e-2)
    said = [str(w.message) for w in caught if 'validation set has no items' in str(w.message)]
    assert len(said) == 1 and said[0].startswith('the validation set has no items: fit only trains')   # once per fit
    assert [r[2:4] for r in learn.recorder.values] == [[None, None], [None, None]]
    assert all(r[1] is not None for r in learn.recorder.values)
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_nan_loss_stops_with_epoch_batch_lr():
    class NaNAt(Callback):
        "Turns the loss into NaN at epoch 1, batch 3."
        def after_loss(self):
            if self.learn.training and self.learn.epoch == 1 and self.learn.iter == 3:
                self.learn.loss = self.learn.loss * float('nan')
    model = mlp()
    learn = quiet(Learner(synth_dls(), model, lr=2e-3, cbs=[NaNAt()]))
    with pytest.raises(LossNotFiniteError,
                       match=r'loss is nan at epoch 1 \(0-based\), batch 3 of 6, learning rate\(s\) 0\.002'):
        learn.fit(3)
    assert len(learn.recorder.values) == 1  # one full epoch done
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not taken


def test_inf_loss_from_divergence():
    class Explode(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(2, 2)
        def forward(self, x): return self.lin(x) * 1e38
    learn = quiet(Learner(synth_dls(), Explode(), lr=1e3))
    with pytest.raises(LossNotFiniteError, match=r'epoch 0 \(0-based\), batch \d+ of 6, learning rate\(s\) 1e\+03'):
        learn.fit(2)


# ---------- callbacks ----------

def test_callback_order_and_events():
    log = []
    class A(Callback):
        order = 20
        def before_fit(self): log.append('A')
    class B(Callback):
        order = -5
        def before_fit(self): log.append('B')
    class C(Callback):
        order = 7
        def before_fit(self): log.append('C')
    learn = quiet(Learner(synth_dls(), mlp(), cbs=[A(), B()]))
    learn.fit(1, cbs=[C()])
    assert log == ['B', 'C', 'A']
    assert [type(c).__name__ for c in learn.cbs] == ['B', 'A', 'Recorder']  # C only during that fit
    assert learn.a.learn is learn and learn.b.order == -5
    assert not hasattr(learn, 'c')


def test_batch_event_sequence():
    seq = []
    names = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step',
             'after_step', 'after_batch']
    class Log(Callback):
        pass
    for n in names: setattr(Log, n, lambda self, n=n: seq.append((self.learn.training, n)))
    learn = quiet(Learner(synth_dls(n=64, bs=48), mlp(), cbs=[Log()]))
    learn.fit(1)
    train = [n for t, n in seq if t]; valid = [n for t, n in seq if not t]
    assert train == names
    assert valid == ['before_batch', 'after_pred', 'after_loss', 'after_batch']


@pytest.mark.parametrize('exc,level', [(CancelFitException, 'fit'), (CancelEpochException, 'epoch'),
                                       (CancelTrainException, 'train'), (CancelValidException, 'validate'),
                                       (CancelBatchException, 'batch')])
def test_cancel_exceptions(exc, level):
    calls = []
    class Canceller(Callback):
        def before_batch(self):
            if self.learn.training == (level != 'validate') and self.learn.iter == 1: raise exc()
        def after_batch(self): calls.append(('batch', self.learn.epoch, self.learn.training))
        def after_step(self): calls.append(('step', self.learn.epoch))
        def after_validate(self): calls.append(('validate', self.learn.epoch))
        def after_fit(self): calls.append(('fit',))
    for ev in ('fit', 'epoch', 'train', 'validate', 'batch'):
        setattr(Canceller, f'after_cancel_{ev}', lambda self, ev=ev: calls.append(('cancel', ev)))
    learn = quiet(Learner(synth_dls(), mlp(), cbs=[Canceller()]))
    learn.fit(2)
    assert ('cancel', level) in calls
    assert {c[1] for c in calls if c[0] == 'cancel'} == {level}
    assert calls[-1] == ('fit',)  # after_fit always runs
    steps = [c for c in calls if c[0] == 'step']
    valids = [c for c in calls if c[0] == 'validate']
    if level == 'fit': assert len(steps) == 1 and valids == []
    if level == 'epoch': assert len(steps) == 2 and valids == []
    if level == 'train': assert len(steps) == 2 and len(valids) == 2
    if level == 'validate': assert len(steps) == 12 and len(valids) == 2 and len(learn.recorder.values) == 2
    if level == 'batch': assert len(steps) == 10


def test_add_remove_and_added_cbs():
    class Tmp(Callback): pass
    learn = Learner(synth_dls(), mlp())
    assert isinstance(learn.recorder, Recorder) and isinstance(learn.progress, ProgressCallback)
    with learn.added_cbs([Tmp]):
        assert isinstance(learn.tmp, Tmp)
    assert not any(isinstance(c, Tmp) for c in learn.cbs) and not hasattr(learn, 'tmp')
    learn.remove_cb(learn.progress)
    assert not hasattr(learn, 'progress')
    with pytest.raises(RuntimeError):
        with learn.added_cbs([Tmp()]): raise RuntimeError('boom')
    assert not hasattr(learn, 'tmp')


def test_recorder_values_and_smoothing():
    torch.manual_seed(0)
    learn = quiet(Learner(synth_dls(), mlp(), metrics=[accuracy, error_rate], lr=1e-2))
    learn.fit(2)
    rec = learn.recorder
    assert rec.metric_names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'error_rate', 'time']
    assert len(rec.values) == 2 and len(rec.losses) == 12 and len(rec.epoch_ends) == 2
    assert rec.smooth_losses[0] == pytest.approx(rec.losses[0])  # debiased
    v = 0.
    for t, l in enumerate(rec.losses, 1): v = 0.98 * v + 0.02 * l
    assert rec.smooth_losses[-1] == pytest.approx(v / (1 - 0.98 ** 12))
    assert rec.values[-1][1] == pytest.approx(rec.smooth_losses[-1])
    _, _, valid_loss, acc, err, _ = rec.values[-1]
    probs, targs, losses = learn.get_preds(with_loss=True)
    assert valid_loss == pytest.approx(losses.mean().item(), rel=1e-5)
    assert acc == pytest.approx(accuracy(probs, targs).item()) and err == pytest.approx(1 - acc)


def test_progress_prints_table(capsys):
    learn = Learner(synth_dls(), mlp(), metrics=error_rate)
    learn.fit(2)
    out = capsys.readouterr().out
    lines = [l.split() for l in out.splitlines() if l.strip()]
    assert lines[0] == ['epoch', 'train_loss', 'valid_loss', 'error_rate', 'time']
    assert [l[0] for l in lines[1:]] == ['0', '1'] and all(len(l) == 5 for l in lines[1:])
    assert all(re.fullmatch(r'\d\d:\d\d', l[-1]) for l in lines[1:])


# ---------- persistence ----------

def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    learn = quiet(Learner(synth_dls(), mlp(), path=tmp_path))
    learn.fit(1)
    file = learn.save('m')
    assert file == tmp_path/'models'/'m.pth'
    sd = {k: v.clone() for k, v in learn.model.state_dict().items()}
    osd = learn.opt.state_dict()
    ostate = {k: {n: t.clone() for n, t in s.items()} for k, s in osd['state'].items()}
    learn.fit(1)
    learn2 = quiet(Learner(synth_dls(), mlp(), path=tmp_path)).load('m')
    for k, v in learn2.model.state_dict().items(): assert torch.equal(v, sd[k]), k
    for k, s in learn2.opt.state_dict()['state'].items():
        for n, t in s.items(): assert torch.equal(t, ostate[k][n]), (k, n)
    with pytest.raises(FileNotFoundError, match=r"learn.save\('nope'\)"):
        learn.load('nope')


class FakeInferenceDLs:
    "The inference side of a DataLoaders: vocab and a test_dl of raw 2-d points."
    def __init__(self, config): self.vocab, self.cfg = config['vocab'], config
    def test_dl(self, items, with_labels=False): return [(torch.tensor(items, dtype=torch.float32),)]
    @classmethod
    def for_inference(cls, config): return cls(config)


def export_dls():
    dls = synth_dls()
    dls.inference_config = lambda: {'vocab': ['a', 'b'], 'bs': 4, 'item_tfms': [{'name': 'X', 'kwargs': {'k': (1, 2)}}]}
    return dls


def test_export_load_learner_registered_model(tmp_path):
    torch.manual_seed(0)
    learn = quiet(Learner(export_dls(), create_model('simple_cnn', n_out=2, n_in=1, widths=(4,)), path=tmp_path))
    fname = learn.export()
    assert fname == tmp_path/'export.pth'
    state = torch.load(fname, weights_only=True)  # plain types only
    assert state['model_spec'] == {'name': 'simple_cnn', 'kwargs': {'n_out': 2, 'n_in': 1, 'widths': (4,)}}
    inf = load_learner(fname, dls_fn=FakeInferenceDLs.for_inference)
    for (k, a), b in zip(learn.model.state_dict().items(), inf.model.state_dict().values()): assert torch.equal(a, b), k
    assert inf.dls.vocab == ['a', 'b'] and inf.dls.cfg['item_tfms'][0]['kwargs']['k'] == (1, 2)


def test_export_custom_model_needs_model_fn(tmp_path):
    learn = quiet(Learner(export_dls(), mlp(), path=tmp_path))
    fname = learn.export('custom.pth')
    with pytest.raises(ValueError, match='pass model_fn='):
        load_learner(fname, dls_fn=FakeInferenceDLs.for_inference)
    inf = load_learner(fname, model_fn=mlp, dls_fn=FakeInferenceDLs.for_inference)
    x = torch.randn(5, 2)
    learn.model.eval()
    assert torch.equal(inf.model(x), learn.model(x))
    label, idx, probs = inf.predict([0.5, -0.5])
    assert label in ('a', 'b') and probs.shape == (2,) and inf.dls.vocab[int(idx)] == label


def test_load_learner_refuses_pickles(tmp_path):
    class Payload:
        def __reduce__(self): return (print, ('pwned',))
    bad = tmp_path/'bad.pth'
    torch.save({'format': 'course_lib.learner.export', 'x': Payload()}, bad)
    with pytest.raises(pickle.UnpicklingError, match='was refused'):
        load_learner(bad, dls_fn=FakeInferenceDLs.for_inference)
    torch.save({'just': 'a dict'}, tmp_path/'other.pth')
    with pytest.raises(ValueError, match='not a course_lib export'):
        load_learner(tmp_path/'other.pth')
    with pytest.raises(FileNotFoundError, match='learn.export'):
        load_learner(tmp_path/'missing.pth')


def test_export_refuses_non_plain_config(tmp_path):
    dls = synth_dls()
    dls.inference_config = lambda: {'vocab': ['a', 'b'], 'tfm': nn.ReLU()}
    learn = quiet(Learner(dls, mlp(), path=tmp_path))
    with pytest.raises(TypeError, match=r"dls.inference_config\(\)\['tfm'\] is a ReLU"):
        learn.export()
    with pytest.raises(TypeError, match=r"\[1\] is a object"):
        _check_plain([1, object()], 'x')


def test_predict_and_get_preds_restore_mode():
    learn = quiet(Learner(synth_dls(), mlp()))
    learn.model.train()
    probs, targs = learn.get_preds()
    assert learn.model.training
    assert probs.shape == (64, 2) and torch.allclose(probs.sum(1), torch.ones(64))


def test_fit_accepts_a_single_callback():
    "fastai accepts `cbs=SomeCallback()` as well as a list."
    seen = []
    class Spy1(Callback):
        def after_epoch(self): seen.append(self.learn.epoch)
    learn = quiet(Learner(synth_dls(), mlp()))
    learn.fit(2, cbs=Spy1())
    assert seen == [0, 1] and not any(isinstance(c, Spy1) for c in learn.cbs)


def test_a_single_callback_is_accepted_like_a_list(one_thread):
    class Count(Callback):
        def __init__(self): self.n = 0
        def after_batch(self): self.n += 1
    learn = quiet(Learner(synth_dls(), mlp(), cbs=Count()))
    learn.fit(1)
    assert learn.count.n == len(learn.dls.train) + len(learn.dls.valid)
    learn.add_cbs(Count)  # a class: instantiated
    assert isinstance(learn.count, Count) and learn.count.n == 0


def test_get_hyper_before_any_fit_reads_the_initial_lrs():
    learn = quiet(Learner(synth_dls(), mlp(), lr=3e-3))
    assert learn.get_hyper('lr') == [3e-3] and learn.get_hyper('mom') == [0.9]


def test_wd_none_leaves_weight_decay_to_the_optimiser():
    "Learner(wd=None), the default, keeps an opt_func's own weight_decay; a number overrides it; norms never decay."
    from functools import partial
    def decays(learn): return sorted({(g['decay'], g['weight_decay']) for g in learn.opt.param_groups})
    model = lambda: nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    adamw = partial(torch.optim.AdamW, weight_decay=0.05)
    for kw, want in [(dict(opt_func=adamw), 0.05), (dict(opt_func=adamw, wd=0.), 0.),
                     (dict(opt_func=adamw, wd=0.2), 0.2), ({}, 0.01), (dict(opt_func=SGD), 0.),
                     (dict(opt_func=SGD, wd=1e-3), 1e-3)]:
        learn = quiet(Learner(synth_dls(n=64), model(), **kw))
        learn.fit(1)
        assert decays(learn) == [(False, 0.), (True, want)], kw
    learn = quiet(Learner(synth_dls(n=64), model(), opt_func=adamw))
    learn.fit(1, wd=0.3)
    assert decays(learn) == [(False, 0.), (True, 0.3)] and learn.get_hyper('wd') == [0.3]
    learn.fit(1)
    assert learn.get_hyper('wd') == [0.3]   # with Learner(wd=None) a fit's wd stays for later fits, as in fastai
