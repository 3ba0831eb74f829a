"Tests for course_lib.lr_finder: schedule, stopping, suggestions on known curves, and the bit-exact restore."
import copy, math, random
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset, DataLoader as TorchDataLoader

from course_lib.loader import DataLoaders
from course_lib.learner import Learner, Callback
from course_lib.progress import ProgressCallback
from course_lib.lr_finder import *
from course_lib.lr_finder import _dl_rngs, _set_dl_rngs
import course_lib.schedule  # noqa: F401  Learner.fit_one_cycle, which a test uses (not imported by lr_finder)


def blobs(n=512, bs=32, seed=0, c=5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, 2, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + torch.randn(n, 2, generator=g)
    train = TorchDataLoader(TensorDataset(x[:384], y[:384]), batch_size=bs, shuffle=True,
                            generator=torch.Generator().manual_seed(seed + 1))
    valid = TorchDataLoader(TensorDataset(x[384:], y[384:]), batch_size=bs)
    return DataLoaders(train, valid, vocab=list('abcde'))


def mlp(bn=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), *([nn.BatchNorm1d(32)] if bn else []), nn.ReLU(), nn.Linear(32, 5))


def learner(**kw):
    learn = Learner(blobs(), mlp(**kw))
    learn.remove_cb(ProgressCallback)
    return learn


# ---------- suggestion functions on curves with known answers ----------

LRS = np.logspace(-6, 1, 80)
# flat-ish rise 0..19, straight fall 20..59 (lowest at 59), explosion from 60
CURVE = np.concatenate([2.5 + 0.01 * np.arange(20), 3.0 - 0.05 * np.arange(40), 2.0 + 0.5 * np.arange(20) ** 2])


def test_minimum():
    assert minimum(LRS, CURVE) == pytest.approx(LRS[59] / 10)
    assert minimum([1., 2., 3.], [3., 1., 2.]) == pytest.approx(0.2)


def test_steep():
    c = CURVE.copy(); c[31:60] -= 0.3          # one step (30 -> 31) steeper than all others
    assert steep(LRS, c) == pytest.approx(LRS[30])
    # slope is per log(lr): the same loss drop over a shorter log-distance is steeper
    lrs = [1e-4, 1e-3, 1e-2, 2e-2, 1e-1]
    assert steep(lrs, [2., 1.8, 1.6, 1.5, 3.]) == pytest.approx(1e-2)


# Expected indices below were computed with fastai 2.8.12's own suggestion functions on the same curves
# (bench/lr_find_vs_fastai.py re-checks a recorded curve whenever fastai is installed beside the project).

def test_valley_matches_fastai():
    # contiguous run 20..59: counted back from 59 it starts at 19; 19 + int(40/3) + int(40/6) = 38
    assert valley(LRS, CURVE) == pytest.approx(LRS[38])
    assert valley([1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.], [1.0, 2.0, 1.8, 1.5, 1.1, 3.0]) == pytest.approx(1e-4)


def test_valley_counts_back_from_the_end_when_the_subsequence_skips_points():
    # losses 9 -> 1 over points 0..16 with 7 bumps: the subsequence has 10 points, so it "starts" at 16 - 10 = 6,
    # and valley is 6 + 3 + 1 = 10, not the middle of the true subsequence (8)
    bumpy = [9, 9.5, 8, 8.5, 7, 7.5, 6, 6.5, 5, 5.5, 4, 4.5, 3, 3.5, 2, 1.5, 1, 3, 6]
    lrs = np.logspace(-5, 0, len(bumpy))
    assert valley(lrs, bumpy) == pytest.approx(lrs[10])


def test_valley_edge_cases():
    assert valley([1., 2., 3.], [1., 2., 3.]) == 1.          # nothing decreases: the first point (as fastai)
    assert valley(range(1, 8), [7., 6., 5., 4., 3., 2., 1.]) == pytest.approx(3.)   # starts at -1: -1 + 2 + 1 = 2
    # the longest run is the first two points: fastai's index comes out as -1 and wraps to the last point; we clamp
    assert valley(range(1, 8), [0.9, -0.14, 0.97, 1.31, 1.94, 1.4, 1.68]) == 1.


def test_slide_matches_fastai():
    # the first window that passes is 43..58: slide is the left end of the last one that failed, 44
    assert slide(LRS, CURVE) == pytest.approx(LRS[44])
    assert slide(LRS, CURVE, adjust_value=0.5) == pytest.approx(LRS[44] * 0.5)
    line = [20. - i for i in range(20)]                         # passes at once: the first window's left end
    assert slide(range(1, 21), line) == pytest.approx(5.)
    assert slide(LRS[:20], np.arange(20.) ** 3) == pytest.approx(LRS[0])   # never settles: the first lr


def test_slide_on_a_curve_shorter_than_its_window_uses_the_whole_curve():
    assert slide([1., 2., 3., 4.], [4., 3., 2., 1.]) == 1.    # window of 3 on 4 points passes at once
    assert slide([1., 2., 3., 4., 5.], [1., 1., 1., 5., 30.]) == 1.   # the only window fails: the first point


def early_stop_curve():
    "A finder run asked for 100 iterations that stopped after 47 (the window is then points 10..41)."
    lrs = [exp_lr(1e-7, 10, i, 100) for i in range(47)]
    losses = [3 - 1.5 / (1 + math.exp(-(i - 25) / 4)) + 0.05 * math.sin(i * 1.7)
              + (0.3 * (i - 40) ** 2 if i > 40 else 0)
              for i in range(47)]
    return lrs, losses


def test_suggestions_on_an_early_stop_match_fastai():
    lrs, losses = early_stop_curve()
    s = suggest_lrs(lrs, losses, 100, (minimum, steep, valley, slide))
    assert s.minimum == pytest.approx(lrs[40] / 10)
    assert s.steep == pytest.approx(lrs[27])
    assert s.valley == pytest.approx(lrs[27])
    assert s.slide == pytest.approx(lrs[10])


def test_suggest_lrs_window_and_namedtuple():
    lrs = list(np.logspace(-7, 1, 100))
    losses = [3. - 0.01 * i for i in range(100)]
    losses[3] = -10.     # inside the first num_it//10 points: must be ignored
    losses[97] = -10.    # inside the last 5 points: must be ignored
    s = suggest_lrs(lrs, losses, 100)
    assert isinstance(s, SuggestedLRs) and s._fields == ('minimum', 'steep')
    assert s.minimum == pytest.approx(lrs[94] / 10)
    lr_min, lr_steep = s   # the book's line
    s2 = suggest_lrs(lrs, losses, 100, (valley, slide, minimum))
    assert s2._fields == ('valley', 'slide', 'minimum') and type(s2).__name__ == 'SuggestedLRs'
    with pytest.raises(ValueError, match='only 1 point'):
        suggest_lrs([1e-3], [1.], 100)
    with pytest.raises(ValueError, match='3 learning rates but 2 losses'):
        suggest_lrs([1, 2, 3], [1, 2], 100)


# ---------- the finder itself ----------

def test_exponential_schedule_loops_over_data_and_no_validation():
    seen = {'valid': 0}
    class Spy(Callback):
        def after_batch(self):
            if not self.learn.training: seen['valid'] += 1
    learn = learner()
    learn.add_cb(Spy())
    learn.lr_find(num_it=50, stop_div=False, show_plot=False)  # 12 batches per epoch: 5 passes
    r = learn.lr_find_result
    assert len(r.lrs) == 50 and r.stop_reason == 'reached num_it=50'
    assert r.lrs == pytest.approx([exp_lr(1e-7, 10, i, 50) for i in range(50)])
    assert seen['valid'] == 0
    v, sm = 0., []
    for t, l in enumerate(r.raw_losses, 1):
        v = 0.98 * v + 0.02 * l; sm.append(v / (1 - 0.98 ** t))
    assert r.losses == pytest.approx(sm)


def test_stops_when_smoothed_loss_passes_4x_min():
    learn = learner(bn=False)
    learn.lr_find(show_plot=False)
    r = learn.lr_find_result
    assert r.stop_reason.startswith('diverged') and len(r.lrs) < 100
    assert r.losses[-1] > 4 * min(r.losses[:-1])
    assert all(l <= 4 * min(r.losses[:i + 1]) for i, l in enumerate(r.losses[:-1]))


def test_stops_on_nan():
    class NaNAbove(nn.Module):
        "Gives NaN outputs once the lr passes 1e-3."
        def __init__(self): super().__init__(); self.lin = nn.Linear(2, 5); self.lr = 0.
        def forward(self, x): return self.lin(x) * (float('nan') if self.lr > 1e-3 else 1.)
    m = NaNAbove()
    learn = Learner(blobs(), m)
    learn.remove_cb(ProgressCallback)
    class Track(Callback):
        order = 10
        def before_batch(self): m.lr = self.learn.get_hyper('lr')[0]
    learn.add_cb(Track())
    learn.lr_find(show_plot=False)
    r = learn.lr_find_result
    assert r.stop_reason.startswith('the loss was nan') and all(math.isfinite(l) for l in r.losses)
    assert r.lrs[-1] <= 1e-3 < exp_lr(1e-7, 10, len(r.lrs), 100)


def _state(learn):
    return dict(model=copy.deepcopy(learn.model.state_dict()),
                opt=None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
                rec={k: copy.deepcopy(v) for k, v in vars(learn.recorder).items() if k != 'learn'},
                rng=(random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()),
                gen=learn.dls.train.generator.get_state(), training=learn.model.training)


def _assert_same(a, b):
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k   # includes BN running stats
    if a['opt'] is None: assert b['opt'] is None
    else:
        assert a['opt']['state'].keys() == b['opt']['state'].keys()
        for i in a['opt']['state']:
            for k, v in a['opt']['state'][i].items(): assert torch.equal(v, b['opt']['state'][i][k]), (i, k)
        assert a['opt']['param_groups'] == b['opt']['param_groups']   # lr, betas, weight decay, group_idx...
    assert a['rec'].keys() == b['rec'].keys()
    for k in a['rec']: assert a['rec'][k] == b['rec'][k], k
    assert (a['rng'][0] == b['rng'][0] and np.array_equal(a['rng'][1], b['rng'][1])
            and torch.equal(a['rng'][2], b['rng'][2]))
    assert torch.equal(a['gen'], b['gen'])
    assert a['training'] == b['training']


@pytest.mark.parametrize('train_mode', [True, False])
def test_lr_find_restores_everything_bit_for_bit(train_mode):
    learn = learner()
    learn.fit_one_cycle(2, 1e-2)          # non-trivial optimiser state, BN stats, recorder contents, 1cycle hypers
    learn.model.train(train_mode)
    before = _state(learn)
    assert before['opt']['state'] and before['rec']['losses']
    learn.lr_find(show_plot=False)
    _assert_same(before, _state(learn))


def test_lr_find_without_optimiser_leaves_none():
    learn = learner()
    learn.fit(1)
    learn.opt = None
    before = _state(learn)
    learn.lr_find(num_it=20, show_plot=False)
    _assert_same(before, _state(learn))
    assert learn.opt is None


def test_lr_find_is_invisible_to_later_training():
    a, b = learner(), learner()
    a.fit(1, lr=1e-2); b.fit(1, lr=1e-2)
    b.lr_find(show_plot=False)
    torch.manual_seed(123); a.fit(2, lr=1e-2)
    torch.manual_seed(123); b.fit(2, lr=1e-2)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_restores_after_an_error():
    class Boom(Callback):
        def after_batch(self):
            if self.learn.training and self.learn.iter == 3: raise RuntimeError('boom')
    learn = learner()
    learn.fit(1)
    before = _state(learn)
    learn.add_cb(Boom())
    with pytest.raises(RuntimeError, match='boom'):
        learn.lr_find(show_plot=False)
    _assert_same(before, _state(learn))


def test_numpy_dataloader_rng_restored():
    class Fake: pass
    dls = Fake(); dls.train = Fake(); dls.train.rng = np.random.default_rng(3)
    saved = _dl_rngs(dls)
    first = dls.train.rng.integers(0, 1 << 30, 5)
    _set_dl_rngs(dls, saved)
    assert np.array_equal(dls.train.rng.integers(0, 1 << 30, 5), first)


def test_lr_find_argument_errors():
    learn = learner()
    with pytest.raises(ValueError, match=r'start_lr \(10\) must be smaller than end_lr \(0\.1\)'):
        learn.lr_find(start_lr=10, end_lr=0.1)
    with pytest.raises(ValueError, match='start_lr must be a positive finite number, got 0'):
        learn.lr_find(start_lr=0)
    with pytest.raises(ValueError, match='num_it must be an integer >= 10, got 5'):
        learn.lr_find(num_it=5)
    dls = blobs()
    dls.train = TorchDataLoader(TensorDataset(torch.randn(3, 2), torch.zeros(3).long()), batch_size=8, drop_last=True)
    empty = Learner(dls, mlp())
    with pytest.raises(ValueError, match='train DataLoader is empty'):
        empty.lr_find()


def test_book_line_and_plot():
    import matplotlib
    matplotlib.use('Agg')
    learn = learner(bn=False)
    lr_min, lr_steep = learn.lr_find()   # with the plot
    r = learn.lr_find_result
    assert 1e-7 <= lr_min <= 10 and 1e-7 <= lr_steep <= 10
    ax = r.plot(suggestions=suggest_lrs(r.lrs, r.losses, r.num_it, (minimum, steep, valley, slide)))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [l.split(':')[0] for l in labels] == ['minimum', 'steep', 'valley', 'slide']
    assert ax.get_xscale() == 'log'
