"Property and error-message tests for course_lib.losses (nbs/03_cross_entropy.ipynb)."
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from course_lib.losses import (softmax, log_softmax, logsumexp, nll_loss, cross_entropy,
                               CrossEntropyLossFlat, LabelSmoothingCrossEntropy)

SHAPES = [(1, 2), (1, 10), (2, 1), (4, 3), (16, 10), (64, 37), (3, 1000)]
SCALES = [1e-3, 1.0, 10.0, 100.0, 1e4]
REDUCTIONS = ['mean', 'sum', 'none']


def make_logits(shape, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_targets(n, c, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, c, (n,), generator=g)


def extreme_logits(n, c, seed):
    "Logits mixing +1e4, -1e4 and 0 (plus small noise) in every row: naive exp() overflows here."
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, c), generator=g).float() * 1e4 + torch.randn(n, c, generator=g)


def tol(x):
    "float32 rounding of values around |x|.max(): a few ulps of the largest magnitude."
    return dict(rtol=1e-5, atol=max(1e-6, 8 * torch.finfo(x.dtype).eps * x.abs().max().item()))


# ---------------------------------------------------------------- softmax / log_softmax
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('scale', SCALES)
def test_log_softmax_matches_torch(shape, scale):
    x = make_logits(shape, scale, seed=len(shape) * 31 + shape[-1])
    assert_close(log_softmax(x), F.log_softmax(x, dim=-1), **tol(x))
    assert_close(softmax(x), F.softmax(x, dim=-1), **tol(x))
    assert_close(logsumexp(x), torch.logsumexp(x, dim=-1), **tol(x))


@pytest.mark.parametrize('dim', [0, 1, 2, -1])
def test_softmax_other_dims(dim):
    x = make_logits((3, 4, 5), 5.0, seed=dim + 10)
    assert_close(softmax(x, dim=dim), F.softmax(x, dim=dim))
    assert_close(log_softmax(x, dim=dim), F.log_softmax(x, dim=dim))
    assert_close(logsumexp(x, dim=dim, keepdim=True), torch.logsumexp(x, dim=dim, keepdim=True))


@pytest.mark.parametrize('seed', range(5))
def test_softmax_extreme_logits_finite(seed):
    x = extreme_logits(8, 6, seed)
    assert torch.isnan(x.exp() / x.exp().sum(-1, keepdim=True)).any(), "test input should overflow the naive formula"
    sm, lsm = softmax(x), log_softmax(x)
    assert torch.isfinite(sm).all() and torch.isfinite(lsm).all()
    assert_close(sm.sum(-1), torch.ones(8))
    assert_close(sm, F.softmax(x, dim=-1), **tol(x))
    assert_close(lsm, F.log_softmax(x, dim=-1), **tol(x))


def test_softmax_huge_values():
    x = torch.tensor([[1e30, -1e30, 0.], [3e38, 3e38, -3e38]])
    assert_close(softmax(x), torch.tensor([[1., 0., 0.], [.5, .5, 0.]]))
    assert torch.isfinite(log_softmax(x)[:, :2]).all()


def test_float64_preserved_and_precise():
    x = make_logits((5, 7), 3.0, seed=3, dtype=torch.float64)
    out = log_softmax(x)
    assert out.dtype == torch.float64
    assert_close(out, F.log_softmax(x, -1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- nll / cross-entropy
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_nll_loss_matches_torch(shape, reduction):
    logp = F.log_softmax(make_logits(shape, 2.0, seed=shape[0]), -1)
    t = make_targets(*shape, seed=shape[1])
    assert_close(nll_loss(logp, t, reduction=reduction), F.nll_loss(logp, t, reduction=reduction))


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_cross_entropy_matches_torch(shape, scale, reduction):
    x = make_logits(shape, scale, seed=shape[0] * 7 + shape[1])
    t = make_targets(*shape, seed=shape[0])
    ours, ref = cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction)
    assert torch.isfinite(ours).all()
    assert ours.shape == ref.shape
    assert_close(ours, ref, **tol(x))


@pytest.mark.parametrize('eps', [0.0, 0.01, 0.1, 0.3, 0.9, 0.999])
@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('scale', [1.0, 30.0, 1e4])
def test_label_smoothing_matches_torch(eps, reduction, scale):
    x = make_logits((12, 6), scale, seed=int(eps * 1000))
    t = make_targets(12, 6, seed=5)
    ours = cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
    ref = F.cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
    assert_close(ours, ref, **tol(x))
    assert_close(CrossEntropyLossFlat(label_smoothing=eps, reduction=reduction)(x, t), ref, **tol(x))


def test_label_smoothing_changes_the_loss():
    x, t = make_logits((10, 4), 3.0, seed=1), make_targets(10, 4, seed=1)
    assert not torch.allclose(cross_entropy(x, t, label_smoothing=0.1), cross_entropy(x, t))
    assert_close(LabelSmoothingCrossEntropy()(x, t), F.cross_entropy(x, t, label_smoothing=0.1))
    assert_close(LabelSmoothingCrossEntropy(eps=0.3)(x, t), F.cross_entropy(x, t, label_smoothing=0.3))


@pytest.mark.parametrize('seed', range(5))
def test_cross_entropy_extreme_logits(seed):
    x, t = extreme_logits(16, 5, seed), make_targets(16, 5, seed)
    for r in REDUCTIONS:
        ours = cross_entropy(x, t, reduction=r)
        assert torch.isfinite(ours).all()
        assert_close(ours, F.cross_entropy(x, t, reduction=r), **tol(x))


def test_batch_of_one():
    x, t = torch.tensor([[0.5, -1.0, 2.0, 0.0]]), torch.tensor([2])
    for r in REDUCTIONS:
        assert_close(cross_entropy(x, t, reduction=r), F.cross_entropy(x, t, reduction=r))
    assert cross_entropy(x, t, reduction='none').shape == (1,)
    assert_close(CrossEntropyLossFlat()(x[0], t[0]), F.cross_entropy(x, t))  # (C,) logits with a scalar target


def test_composition():
    x, t = make_logits((9, 4), 4.0, seed=2), make_targets(9, 4, seed=2)
    assert_close(cross_entropy(x, t), nll_loss(log_softmax(x), t))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('eps', [0.0, 0.2])
def test_gradcheck_cross_entropy(reduction, eps):
    x = make_logits((5, 4), 2.0, seed=11, dtype=torch.float64).requires_grad_()
    t = make_targets(5, 4, seed=11)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, t, reduction=reduction, label_smoothing=eps), (x,))


def test_gradcheck_softmax_family():
    x = make_logits((3, 6), 3.0, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(softmax, (x,))
    assert torch.autograd.gradcheck(log_softmax, (x,))
    assert torch.autograd.gradcheck(lambda x: logsumexp(x, dim=0), (x,))
    assert torch.autograd.gradgradcheck(log_softmax, (x,))


@pytest.mark.parametrize('shape', [(1, 3), (6, 4), (32, 10)])
def test_gradient_is_softmax_minus_one_hot(shape):
    x = make_logits(shape, 3.0, seed=shape[1], dtype=torch.float64).requires_grad_()
    t = make_targets(*shape, seed=shape[0])
    cross_entropy(x, t).backward()
    expected = (F.softmax(x.detach(), -1) - F.one_hot(t, shape[1])) / shape[0]
    assert_close(x.grad, expected)


def test_gradient_extreme_logits_finite():
    x = extreme_logits(6, 5, seed=0).requires_grad_()
    t = make_targets(6, 5, seed=0)
    cross_entropy(x, t).backward()
    assert torch.isfinite(x.grad).all()
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2, t).backward()
    assert_close(x.grad, x2.grad)


# ---------------------------------------------------------------- CrossEntropyLossFlat
def test_flat_axis_last_and_extra_dims():
    x, t = make_logits((2, 3, 5), 2.0, seed=0), torch.randint(0, 5, (2, 3))
    lf = CrossEntropyLossFlat()
    assert_close(lf(x, t), F.cross_entropy(x.reshape(-1, 5), t.reshape(-1)))
    assert lf(x, t).shape == ()
    assert CrossEntropyLossFlat(reduction='none')(x, t).shape == (6,)
    assert_close(lf.decodes(x), x.argmax(-1))
    assert_close(lf.activation(x), F.softmax(x, -1))


def test_flat_axis_1_segmentation_layout():
    x, t = make_logits((2, 4, 3, 5), 2.0, seed=9), torch.randint(0, 4, (2, 3, 5))
    lf = CrossEntropyLossFlat(axis=1)
    assert_close(lf(x, t), F.cross_entropy(x, t))
    assert_close(CrossEntropyLossFlat(axis=1, reduction='none')(x, t),
                 F.cross_entropy(x, t, reduction='none').reshape(-1))
    assert_close(CrossEntropyLossFlat(axis=1, label_smoothing=0.1)(x, t), F.cross_entropy(x, t, label_smoothing=0.1))
    assert_close(lf.decodes(x), x.argmax(1))
    assert_close(lf.activation(x), F.softmax(x, 1))


@pytest.mark.parametrize('dtype', [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_flat_accepts_integer_targets(dtype):
    x, t = make_logits((6, 3), 1.0, seed=0), make_targets(6, 3, seed=0)
    assert_close(CrossEntropyLossFlat()(x, t.to(dtype)), F.cross_entropy(x, t))


def test_flat_is_a_module_and_has_repr():
    lf = CrossEntropyLossFlat(label_smoothing=0.1)
    assert isinstance(lf, torch.nn.Module)
    assert 'label_smoothing=0.1' in repr(lf)
    assert isinstance(LabelSmoothingCrossEntropy(), CrossEntropyLossFlat)


# ---------------------------------------------------------------- error messages
X, T = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])


@pytest.mark.parametrize('f', [cross_entropy, CrossEntropyLossFlat(), lambda x, t: nll_loss(F.log_softmax(x, -1), t)])
def test_float_targets_rejected(f):
    with pytest.raises(TypeError, match=r'integer class indices, got dtype torch\.float32.*target\.long\(\)'):
        f(X, T.float())
    with pytest.raises(TypeError, match='integer class indices'):
        f(X, T == 1)


@pytest.mark.parametrize('f', [cross_entropy, CrossEntropyLossFlat(), lambda x, t: nll_loss(F.log_softmax(x, -1), t)])
def test_target_out_of_range(f):
    with pytest.raises(IndexError, match=r'target value 3 is out of range for 3 classes.*0\.\.2'):
        f(X, torch.tensor([0, 3, 1, 1]))
    with pytest.raises(IndexError, match=r'target value -1 is out of range for 3 classes'):
        f(X, torch.tensor([0, 1, -1, 1]))


def test_mismatched_batch_sizes():
    with pytest.raises(ValueError,
                       match=r'batch sizes do not match: logits of shape \(4, 3\) has 4 rows but target has 3'):
        cross_entropy(X, T[:3])
    with pytest.raises(ValueError, match=r'batch sizes do not match.*holds 4 items.*has 5 elements'):
        CrossEntropyLossFlat()(X, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match=r'target must have shape \(N,\)'):
        cross_entropy(X, T[:, None])


@pytest.mark.parametrize('eps', [-0.1, 1.0, 1.5, float('nan'), '0.1'])
def test_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match=r'label_smoothing must be a number in \[0, 1\), got'):
        CrossEntropyLossFlat(label_smoothing=eps)
    with pytest.raises(ValueError, match=r'label_smoothing must be a number in \[0, 1\)'):
        cross_entropy(X, T, label_smoothing=eps)


def test_bad_reduction_and_logits():
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        cross_entropy(X, T, reduction='avg')
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        CrossEntropyLossFlat(reduction='avg')
    with pytest.raises(TypeError, match=r'logits must be a floating point tensor, got dtype torch\.int64'):
        cross_entropy(X.long(), T)
    with pytest.raises(ValueError, match=r'logits must have shape \(N, C\).*got shape \(3,\)'):
        cross_entropy(X[0], T[0])
