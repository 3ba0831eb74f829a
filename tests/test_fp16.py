("Tests for course_lib.fp16 on tiny synthetic data: the CPU fallbacks, the bf16 decision, GradScaler skips "
 "and the recorder.")
import warnings
import pytest
import torch
from torch import nn

from course_lib.learner import Learner, Callback, CancelBatchException
from course_lib.progress import ProgressCallback
from course_lib.optimizer import SGD
import course_lib.fp16 as fp16
from course_lib.fp16 import MixedPrecision, MixedPrecisionWarning, to_float


pytestmark = pytest.mark.usefixtures('one_thread')  # fixture in conftest.py


from helpers import synth_dls


def mlp():
    return nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def make_learner(cbs=None, **kw):
    torch.manual_seed(0)
    learn = Learner(synth_dls(), mlp(), lr=1e-2, cbs=cbs, **kw)
    learn.remove_cb(ProgressCallback)
    return learn


def mp_cbs(learn): return [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]


def fp16_warnings(record): return [w for w in record if issubclass(w.category, MixedPrecisionWarning)]


# ---------- to_fp16 on a CPU ----------

def test_to_fp16_on_cpu_warns_once_and_trains_bit_identical_to_fp32():
    ref = make_learner()
    ref.fit_one_cycle(2)
    learn = make_learner()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        assert learn.to_fp16() is learn
        learn.fit_one_cycle(2)
        assert learn.recorder.losses == ref.recorder.losses       # same numbers, bit for bit
        for (k, a), (_, b) in zip(ref.model.state_dict().items(), learn.model.state_dict().items()):
            assert torch.equal(a, b), k
        assert learn.recorder.loss_scales == [1.] * 12 and learn.recorder.skipped_steps == 0
        learn.fit(1)                                                # a second fit says nothing again
    ws = fp16_warnings(record)
    assert len(ws) == 1, [str(w.message) for w in ws]
    msg = str(ws[0].message)
    assert 'not on a CUDA GPU' in msg and 'stays in fp32' in msg and 'slower' in msg
    assert ws[0].filename == __file__  # points at the caller's line, not into course_lib
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    assert learn.mixed_precision.dtype == torch.float32 and 'not on a CUDA GPU' in learn.mixed_precision.reason


def test_to_fp16_says_to_move_data_when_cuda_exists_but_learner_is_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    learn = make_learner()
    with pytest.warns(MixedPrecisionWarning, match=r"learn\.dls\.to\('cuda'\)"):
        learn.to_fp16()
    assert learn.mixed_precision.dtype == torch.float32


def test_to_fp32_undoes_and_methods_replace_each_other(monkeypatch):
    monkeypatch.setattr(fp16, 'time_autocast_steps', lambda *a, **k: {torch.float32: 1., torch.bfloat16: .5})
    learn = make_learner()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', MixedPrecisionWarning)
        learn.to_fp16().to_fp16()
    assert len(mp_cbs(learn)) == 1
    learn.to_bf16()
    assert len(mp_cbs(learn)) == 1 and learn.mixed_precision.dtype == torch.bfloat16
    assert learn.to_fp32() is learn
    assert mp_cbs(learn) == [] and not hasattr(learn, 'mixed_precision')
    learn.to_fp32()  # twice is fine
    learn.fit(1)
    assert not hasattr(learn.recorder, 'loss_scales')


# ---------- the bf16 decision on a CPU ----------

@pytest.mark.parametrize('t_bf16,expect_bf16,text', [
    (0.5, True, None),                    # measured 2x faster: use bf16, silently
    (35., False, '35.00x slower than'),    # the slowdown measured on this course's machine
    (1 / 1.05, False, 'only 1.05x as fast as'),  # faster, but below min_speedup=1.1
])
def test_to_bf16_on_cpu_follows_the_measurement(monkeypatch, t_bf16, expect_bf16, text):
    calls = []
    def fake(dtypes=(torch.float32, torch.bfloat16), device='cpu', **kw):
        calls.append((tuple(dtypes), str(device)))
        return {torch.float32: 1., torch.bfloat16: t_bf16}
    monkeypatch.setattr(fp16, 'time_autocast_steps', fake)
    learn = make_learner()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        learn.to_bf16()
    assert calls == [((torch.float32, torch.bfloat16), 'cpu')]
    ws = fp16_warnings(record)
    if expect_bf16:
        assert ws == [] and learn.mixed_precision.dtype == torch.bfloat16 and not learn.mixed_precision.use_scaler
        assert '2.00x faster' in learn.mixed_precision.reason
    else:
        assert len(ws) == 1 and text in str(ws[0].message) and 'stays in fp32' in str(ws[0].message)
        assert learn.mixed_precision.dtype == torch.float32


def test_to_bf16_min_speedup_is_respected(monkeypatch):
    monkeypatch.setattr(fp16, 'time_autocast_steps', lambda *a, **k: {torch.float32: 1., torch.bfloat16: .5})
    learn = make_learner()
    with pytest.warns(MixedPrecisionWarning, match='min_speedup=3'):
        learn.to_bf16(min_speedup=3)
    assert learn.mixed_precision.dtype == torch.float32


def test_real_benchmark_leaves_the_rng_and_threads_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    torch.set_num_threads(2)   # the probe itself runs on one thread and must put this back
    n_threads = torch.get_num_threads()
    t = fp16.time_autocast_steps()
    assert set(t) == {torch.float32, torch.bfloat16}
    assert all(v > 0 for v in t.values()), t
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == n_threads


def test_bf16_on_cpu_trains_with_bf16_activations_and_fp32_params():
    seen = {}
    learn = make_learner(cbs=[MixedPrecision(torch.bfloat16)])
    def hook(m, i, o): seen['act'] = o.dtype   # (returns None: a hook that returns a value replaces the output)
    learn.model[0].register_forward_hook(hook)
    class CheckPred(Callback):
        order = 20
        def after_pred(self): seen['pred'] = self.learn.pred.dtype
        def after_loss(self): seen['loss'] = self.learn.loss.dtype
    learn.add_cb(CheckPred())
    learn.fit(1)
    assert seen == {'act': torch.bfloat16, 'pred': torch.float32, 'loss': torch.float32}
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    assert learn.recorder.loss_scales == [1.] * 6 and learn.recorder.skipped_steps == 0
    assert not torch.is_autocast_enabled('cpu')


# ---------- GradScaler: skipped steps and the recorded scale ----------

class InjectInf(Callback):
    ("Write inf (or nan) into the first gradient at training batch `at`; keep parameters and Adam step counts "
     "after each step.")
    order = 0
    def __init__(self, at, value=float('inf')):
        self.at, self.value, self.n, self.params, self.steps = at, value, 0, [], []
    def after_backward(self):
        if self.n == self.at: next(self.learn.model.parameters()).grad.view(-1)[0] = self.value
        self.n += 1
    def after_step(self):
        self.params.append([p.detach().clone() for p in self.learn.model.parameters()])
        st = self.learn.opt.state
        self.steps.append([float(st[p]['step']) if p in st else 0. for p in self.learn.model.parameters()])


@pytest.mark.parametrize('value', [float('inf'), float('nan')])
def test_non_finite_gradient_skips_the_step_and_halves_the_scale(value):
    inj = InjectInf(at=3, value=value)
    learn = make_learner(cbs=[MixedPrecision(torch.float16), inj])
    learn.fit_one_cycle(1)
    rec = learn.recorder
    assert rec.loss_scales == [2.**16] * 4 + [2.**15] * 2
    assert rec.skipped_steps == 1 and learn.mixed_precision.skipped_steps == 1
    for a, b in zip(inj.params[3], inj.params[2]): assert torch.equal(a, b)    # weights unchanged by the skipped step
    assert inj.steps[3] == inj.steps[2]                                           # Adam did not count a step either
    assert not all(torch.equal(a, b) for a, b in zip(inj.params[4], inj.params[3]))  # the next step ran
    assert inj.steps[4] == [s + 1 for s in inj.steps[3]]
    lrs = [v[0] for v in rec.lrs]
    assert len(lrs) == 6 and len(set(lrs)) == 6                                   # the schedule kept moving
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())


def test_without_overflow_nothing_is_skipped_and_the_scale_grows():
    learn = make_learner(cbs=[MixedPrecision(torch.float16, init_scale=8., growth_interval=2)])
    learn.fit(1)
    assert learn.recorder.loss_scales == [8., 8., 16., 16., 32., 32.]
    assert learn.recorder.skipped_steps == 0


def test_a_fresh_scaler_each_fit():
    learn = make_learner(cbs=[MixedPrecision(torch.float16), InjectInf(at=0)])
    learn.fit(1)
    assert learn.recorder.loss_scales[:2] == [2.**16, 2.**15]
    learn.remove_cb(InjectInf)
    learn.fit(1)
    assert learn.recorder.loss_scales == [2.**16] * 6 and learn.recorder.skipped_steps == 0


def test_fp16_scaled_training_matches_fp32_closely():
    """Same seed, same data, plain SGD (unlike Adam, it is not invariant to the gradient's scale, so forgetting to
    unscale would blow up): fp16 autocast with loss scaling ends near the fp32 run, not equal to it (fp16 rounds)."""
    ref = make_learner(opt_func=SGD)
    ref.fit(2, lr=0.1)
    learn = make_learner(opt_func=SGD, cbs=[MixedPrecision(torch.float16)])
    learn.fit(2, lr=0.1)
    assert learn.recorder.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(ref.model.parameters(), learn.model.parameters()))
    for a, b in zip(ref.model.parameters(), learn.model.parameters()):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=0)   # forgetting to unscale: off by thousands


def test_autocast_is_left_when_a_batch_is_cancelled_in_the_forward_pass():
    class Cancel(Callback):
        order = 5   # before MixedPrecision's after_pred
        def after_pred(self):
            if self.learn.training: raise CancelBatchException()
    learn = make_learner(cbs=[MixedPrecision(torch.float16), Cancel()])
    learn.fit(1)
    assert not torch.is_autocast_enabled('cpu')
    class Boom(Callback):
        def after_pred(self): raise RuntimeError('boom')
    learn = make_learner(cbs=[MixedPrecision(torch.float16), Boom()])
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    assert not torch.is_autocast_enabled('cpu')


# ---------- errors and helpers ----------

def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match=r"got 'fp8'"): MixedPrecision('fp8')
    with pytest.raises(ValueError, match=r"got torch.int8"): MixedPrecision(torch.int8)
    with pytest.raises(ValueError, match='loss scaler only makes sense'): MixedPrecision(torch.float32, scaler=True)
    assert MixedPrecision('bf16').dtype == torch.bfloat16 and not MixedPrecision('bf16').use_scaler
    assert MixedPrecision('fp16').use_scaler


def test_to_float_walks_containers():
    out = to_float({'a': [torch.ones(2, dtype=torch.float16), torch.arange(2)], 'b': 'text'})
    assert out['a'][0].dtype == torch.float32 and out['a'][1].dtype == torch.int64 and out['b'] == 'text'


def test_probe_stops_once_its_budget_is_spent(monkeypatch):
    "The budget is checked between rounds: a fake clock (one second per reading) stops the probe after one round."
    passes, real = [], fp16._probe_net
    def counted():
        net = real()
        net.register_forward_hook(lambda *a: passes.append(1))
        return net
    monkeypatch.setattr(fp16, '_probe_net', counted)
    clock = iter(range(10**6))
    monkeypatch.setattr(fp16.time, 'perf_counter', lambda: float(next(clock)))
    fp16.time_autocast_steps(budget=0.5, reps=10)
    assert len(passes) == 2 * 2 + 2           # two warm-up passes and one timed round for each of the two dtypes
    passes.clear()
    fp16.time_autocast_steps(budget=1e9, reps=10)
    assert len(passes) == 2 * 2 + 2 * 10      # an unspent budget runs all `reps` rounds
