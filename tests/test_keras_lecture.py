"Tests for course_lib.keras_lecture that a notebook should not carry: bad inputs, edge cases, properties."
import pytest, torch
from torch import nn
from course_lib.learner import Callback
from course_lib.keras_lecture import (TensorLoader, tensor_dls, mlp, reuse_all_but_output, set_trainable, top_k,
                                      WeightPenalty, MaxNorm, mc_dropout_predict, classifier_head, sched_power,
                                      sched_exp, sched_piecewise, ReduceLROnPlateau)


def test_tensor_loader_covers_every_item_once_and_is_reproducible():
    x, y = torch.arange(23.), torch.arange(23)
    a = [xb.tolist() for xb, _ in TensorLoader(x, y, bs=5, shuffle=True, seed=3)]
    b = [xb.tolist() for xb, _ in TensorLoader(x, y, bs=5, shuffle=True, seed=3)]
    assert a == b and [len(r) for r in a] == [5, 5, 5, 5, 3]
    assert sorted(sum(a, [])) == list(range(23))
    assert [xb.tolist() for xb, _ in TensorLoader(x, y, bs=10)][0] == list(range(10))   # no shuffle: in order


@pytest.mark.parametrize('bs', [0, -1, 2.5, True])
def test_tensor_loader_rejects_bad_batch_size(bs):
    with pytest.raises(ValueError, match='bs must be a positive integer'):
        TensorLoader(torch.zeros(3), torch.zeros(3), bs=bs)


def test_tensor_dls_is_a_learner_input():
    dls = tensor_dls(torch.zeros(10, 4), torch.zeros(10, dtype=torch.long),
                     torch.zeros(6, 4), torch.zeros(6, dtype=torch.long), bs=4)
    assert len(dls.train) == 3 and len(dls.valid) == 1 and str(dls.device) == 'cpu'


def test_mlp_shapes_and_dropout_validation():
    assert mlp(64, 3)(torch.zeros(2, 8, 8)).shape == (2, 3)
    assert sum(isinstance(l, nn.Dropout) for l in mlp(4, 2, hidden=(5, 5), p=0.5)) == 2
    with pytest.raises(ValueError, match=r'p must be in \[0, 1\)'): mlp(4, 2, p=1.)


def test_reuse_all_but_output_copies_weights_and_never_shares_them():
    a = mlp(4, 3, hidden=(5,))
    b = reuse_all_but_output(a, 2)
    assert b[-1].out_features == 2 and torch.equal(b[1].weight, a[1].weight)
    with torch.no_grad(): b[1].weight.add_(1.)
    assert not torch.equal(b[1].weight, a[1].weight)        # a deep copy: A is unaffected
    with pytest.raises(TypeError, match='last layer is nn.Linear'): reuse_all_but_output(nn.Sequential(nn.ReLU()), 2)
    with pytest.raises(TypeError, match='nn.Sequential'): reuse_all_but_output(nn.Linear(2, 2), 2)


def test_set_trainable_round_trip():
    m = mlp(4, 2)
    assert not any(p.requires_grad for p in set_trainable(m, False).parameters())
    assert all(p.requires_grad for p in set_trainable(m, True).parameters())


def test_top_k_orders_and_validates():
    p = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert [n for n, _ in top_k(p, list('abcd'), 3)] == ['b', 'd', 'c']
    with pytest.raises(ValueError, match='one row of 4 probabilities'): top_k(p[None], list('abcd'))
    with pytest.raises(ValueError, match='k must be between 1 and 4'): top_k(p, list('abcd'), k=5)


def test_classifier_head_layers():
    h = classifier_head(16, 2, hidden=8, p=0.5)
    assert [type(l).__name__ for l in h] == ['AdaptiveAvgPool2d', 'Flatten', 'Linear', 'ReLU', 'Dropout', 'Linear']
    assert h[2].out_features == 8 and h[4].p == 0.5


def test_schedules_values_and_monotonicity():
    pcts = [i / 50 for i in range(51)]
    for f in (sched_power(0.1, 0.2, 2.), sched_exp(0.1, 0.3), sched_piecewise([0.3, 0.7], [0.1, 0.01, 0.001])):
        vals = [f(p) for p in pcts]
        assert vals[0] == pytest.approx(0.1) and all(a >= b for a, b in zip(vals, vals[1:]))
    assert sched_exp(1., 0.25)(1.) == pytest.approx(1e-4)
    assert sched_power(1., 1., 1.)(1.) == pytest.approx(0.5)


@pytest.mark.parametrize('make, msg', [
    (lambda: sched_power(0., 1.), 'lr0 must be a positive finite number'),
    (lambda: sched_exp(0.1, -1), 's must be a positive finite number'),
    (lambda: sched_piecewise([0.5], [0.1]), 'needs 2 learning rates, got 1'),
    (lambda: sched_piecewise([0.6, 0.4], [0.1, 0.1, 0.1]), 'must increase strictly'),
    (lambda: sched_piecewise([1.2], [0.1, 0.1]), 'within \\(0, 1\\)'),
    (lambda: sched_power(float('nan'), 1.), 'lr0 must be a positive finite number'),
])
def test_schedules_reject_bad_arguments(make, msg):
    with pytest.raises(ValueError, match=msg): make()


def test_reduce_lr_on_plateau_with_a_real_learner():
    "On a task whose validation loss cannot improve (random labels), the rate is cut every `patience` epochs."
    from course_lib.learner import Learner
    from course_lib.progress import ProgressCallback
    from course_lib.optimizer import SGD
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    dls = tensor_dls(x, y, torch.randn(32, 3), torch.randint(0, 2, (32,)), bs=16)
    cb = ReduceLROnPlateau(factor=0.5, patience=1, min_lr=0.02)
    learn = Learner(dls, nn.Linear(3, 2), opt_func=SGD, lr=0.1, wd=0.).remove_cb(ProgressCallback)
    learn.fit(8, cbs=[cb])
    assert cb.reductions, 'expected at least one reduction on random labels'
    assert min(lr[0] for lr in learn.recorder.lrs) >= 0.02 - 1e-12                     # min_lr respected
    assert learn.get_hyper('lr')[0] == pytest.approx(max(0.1 * 0.5 ** len(cb.reductions), 0.02))


def test_reduce_lr_on_plateau_rejects_bad_arguments():
    with pytest.raises(ValueError, match='factor must be between 0 and 1'): ReduceLROnPlateau(factor=1.)
    with pytest.raises(ValueError, match='patience must be an integer >= 1'): ReduceLROnPlateau(patience=0)


def _tiny_learner(*cbs, p=0.):
    from course_lib.learner import Learner
    from course_lib.progress import ProgressCallback
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    dls = tensor_dls(x, y, torch.randn(16, 4), torch.randint(0, 3, (16,)), bs=16)
    return Learner(dls, mlp(4, 3, hidden=(8,), p=p), lr=1e-2, cbs=list(cbs)).remove_cb(ProgressCallback)


def test_weight_penalty_adds_l1_and_l2_of_the_weight_matrices_only():
    learn = _tiny_learner(WeightPenalty(l1=0.01, l2=0.1))
    ws = [learn.model[1].weight.detach(), learn.model[3].weight.detach()]
    want = sum(0.01 * float(w.abs().sum()) + 0.1 * float((w ** 2).sum()) for w in ws)
    assert learn.weight_penalty.penalty().item() == pytest.approx(want, rel=1e-5)
    seen = []
    class Spy(Callback):
        order = 99
        def after_loss(self): seen.append((self.learn.training, self.learn.loss.item()))
    plain = _tiny_learner(Spy())
    plain.fit(1); base = list(seen); seen.clear()
    _tiny_learner(WeightPenalty(l2=0.1), Spy()).fit(1)
    assert seen[0][1] > base[0][1]                       # the first training batch: same weights, loss + penalty
    with pytest.raises(ValueError, match='not both 0'): WeightPenalty()
    with pytest.raises(ValueError, match='must be >= 0'): WeightPenalty(l2=-1)


def test_max_norm_caps_every_unit_after_each_step():
    learn = _tiny_learner(MaxNorm(0.3))
    learn.fit(2)
    for m in learn.model:
        if isinstance(m, nn.Linear): assert float(m.weight.detach().norm(dim=1).max()) <= 0.3 + 1e-6


def test_mc_dropout_varies_between_passes_and_restores_the_mode():
    model = mlp(4, 3, hidden=(16,), p=0.5).train()
    x = torch.randn(10, 4)
    torch.manual_seed(0)
    mean, std = mc_dropout_predict(model, x, n=20)
    assert mean.shape == (10, 3) and torch.allclose(mean.sum(1), torch.ones(10), atol=1e-5)
    assert float(std.max()) > 0 and model.training
    model.eval(); mc_dropout_predict(model, x, n=2); assert not model.training
    nodrop = mlp(4, 3, hidden=(16,))
    assert float(mc_dropout_predict(nodrop, x, n=3)[1].max()) == 0   # no dropout layer: every pass the same
    with pytest.raises(ValueError, match='n must be a whole number >= 2'): mc_dropout_predict(model, x, n=1)
