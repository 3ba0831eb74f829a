"Tests for course_lib.interpret on hand-made predictions and tiny synthetic loaders."
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from torch.utils.data import TensorDataset, DataLoader as TorchDataLoader

from course_lib.loader import DataLoader, DataLoaders
from course_lib.augment import Normalize
from course_lib.learner import Learner
from course_lib.progress import ProgressCallback
from course_lib.losses import CrossEntropyLossFlat
from course_lib.interpret import *

pytestmark = pytest.mark.usefixtures('one_thread')  # fixture in conftest.py


VOCAB = ['a', 'b', 'c', 'd']


def hand_made():
    # actual -> predicted: a->a x2, a->b x1, b->b x1, c->a x3, c->c x1, d->b x1, d->c x1
    targs = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3, 3])
    preds = torch.tensor([0, 0, 1, 1, 0, 0, 0, 2, 1, 2])
    probs = torch.full((10, 4), 0.1)
    probs[torch.arange(10), preds] = 0.7
    losses = torch.tensor([0.1, 0.2, 1.5, 0.3, 2.0, 0.9, 2.5, 0.4, 1.7, 0.05])
    return ClassificationInterpretation(VOCAB, probs, targs, losses), targs, preds, losses


def test_confusion_matrix_known_answer():
    interp, targs, preds, _ = hand_made()
    cm = interp.confusion_matrix()
    expected = np.array([[2, 1, 0, 0],
                         [0, 1, 0, 0],
                         [3, 0, 1, 0],
                         [0, 1, 1, 0]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 10 and cm[3, 3] == 0  # a class that is never predicted correctly keeps its row
    sk = pytest.importorskip('sklearn.metrics')
    np.testing.assert_array_equal(cm, sk.confusion_matrix(targs, preds, labels=range(4)))


def test_confusion_matrix_random_against_sklearn():
    sk = pytest.importorskip('sklearn.metrics')
    g = torch.Generator().manual_seed(0)
    t, p = torch.randint(0, 37, (500,), generator=g), torch.randint(0, 37, (500,), generator=g)
    np.testing.assert_array_equal(confusion_matrix(t, p, 37), sk.confusion_matrix(t, p, labels=range(37)))


def test_most_confused():
    interp, *_ = hand_made()
    assert interp.most_confused() == [('c', 'a', 3), ('a', 'b', 1), ('d', 'b', 1), ('d', 'c', 1)]
    assert interp.most_confused(min_val=2) == [('c', 'a', 3)]
    assert interp.most_confused(min_val=4) == []
    with pytest.raises(ValueError, match='min_val'): interp.most_confused(min_val=0)
    # the diagonal of the stored matrix is untouched by most_confused
    assert interp.confusion_matrix()[0, 0] == 2


def test_top_losses_order():
    interp, _, _, losses = hand_made()
    vals, idxs = interp.top_losses(4)
    assert idxs.tolist() == [6, 4, 8, 2]
    assert torch.equal(vals, losses[idxs])
    vals, idxs = interp.top_losses()
    assert torch.all(vals[:-1] >= vals[1:]) and sorted(idxs.tolist()) == list(range(10))
    assert interp.top_losses(2, largest=False)[1].tolist() == [9, 0]
    for bad in (0, 11, 2.5, True):
        with pytest.raises(ValueError, match='between 1 and the number of items'): interp.top_losses(bad)


def test_bad_inputs():
    _, targs, _, losses = hand_made()
    probs = torch.rand(10, 4)
    with pytest.raises(ValueError, match=r'\(10, 4\)'): ClassificationInterpretation(VOCAB, probs[:, :3], targs, losses)
    with pytest.raises(ValueError, match="reduction='none'"):
        ClassificationInterpretation(VOCAB, probs, targs, losses.mean())
    with pytest.raises(ValueError, match=r'class indices in \[0, 4\)'):
        ClassificationInterpretation(VOCAB, probs, targs + 1, losses)
    with pytest.raises(ValueError, match='no DataLoader'):
        ClassificationInterpretation(VOCAB, probs, targs, losses).plot_top_losses(3)


def _quiet(learn):
    learn.remove_cb(ProgressCallback)
    return learn


def test_from_learner_matches_a_manual_computation(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(37, 5), torch.randint(0, 4, (37,))
    valid = TorchDataLoader(TensorDataset(x, y), batch_size=8)
    dls = DataLoaders(valid, valid, vocab=VOCAB)
    model = nn.Linear(5, 4)
    learn = _quiet(Learner(dls, model, loss_func=CrossEntropyLossFlat(label_smoothing=0.1), path=tmp_path))
    interp = ClassificationInterpretation.from_learner(learn)
    with torch.no_grad(): logits = model(x)
    assert torch.equal(interp.targs, y)  # validation order kept
    torch.testing.assert_close(interp.probs, logits.softmax(-1))
    torch.testing.assert_close(interp.losses, F.cross_entropy(logits, y, reduction='none', label_smoothing=0.1))
    assert torch.equal(interp.preds, logits.argmax(-1))
    assert learn.loss_func.reduction == 'mean'  # restored
    assert len(interp) == 37


def test_shuffled_torch_loader_is_refused(tmp_path):
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    dl = TorchDataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    dl.shuffle = True  # torch loaders do not expose it; ours do
    learn = _quiet(Learner(DataLoaders(dl, dl, vocab=VOCAB), nn.Linear(5, 4), path=tmp_path))
    with pytest.raises(ValueError, match='shuffles'): ClassificationInterpretation.from_learner(learn, dl)


def _image_dls(n=10):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
    labels = [i % 4 for i in range(n)]
    kw = dict(bs=4, batch_tfms=[Normalize()], device='cpu', num_workers=1)
    train = DataLoader(ims, labels, shuffle=True, drop_last=True, split='train', seed=0, **kw)
    valid = DataLoader(ims, labels, split='valid', **kw)
    return DataLoaders(train, valid, vocab=VOCAB), ims


class MeanColour(nn.Module):
    def __init__(self): super().__init__(); self.lin = nn.Linear(3, 4)
    def forward(self, x): return self.lin(x.mean((2, 3)))


def test_plot_top_losses_shows_the_decoded_images(tmp_path):
    dls, ims = _image_dls()
    torch.manual_seed(0)
    learn = _quiet(Learner(dls, MeanColour(), path=tmp_path))
    interp = ClassificationInterpretation.from_learner(learn)
    vals, idxs = interp.top_losses(5)
    axs = interp.plot_top_losses(5, nrows=2)
    assert axs.shape == (2, 3)
    shown = [ax for ax in axs.flat if ax.images]
    assert len(shown) == 5
    for ax, i, loss in zip(shown, idxs.tolist(), vals.tolist()):
        p, t = int(interp.preds[i]), int(interp.targs[i])
        assert ax.get_title() == f'{VOCAB[p]}/\n{VOCAB[t]}\n{loss:.2f} / {float(interp.probs[i, p]):.2f}'
        # the picture is the original photo, normalisation undone
        np.testing.assert_allclose(ax.images[0].get_array(), np.asarray(ims[i]) / 255, atol=1e-5)
    plt.close('all')


def test_training_loader_is_read_in_order_without_augmentation(tmp_path):
    dls, ims = _image_dls()
    learn = _quiet(Learner(dls, MeanColour(), path=tmp_path))
    interp = ClassificationInterpretation.from_learner(learn, dls.train)
    assert len(interp) == 10 and interp.targs.tolist() == [i % 4 for i in range(10)]
    assert not interp.dl.shuffle and interp.dl.split == 'valid'
    plt.close('all')


def test_plot_confusion_matrix():
    interp, *_ = hand_made()
    ax = interp.plot_confusion_matrix()
    np.testing.assert_array_equal(ax.images[0].get_array(), interp.confusion_matrix())
    assert [t.get_text() for t in ax.get_xticklabels()] == VOCAB
    assert len(ax.texts) == np.count_nonzero(interp.confusion_matrix())
    ax = interp.plot_confusion_matrix(normalize=True)
    np.testing.assert_allclose(ax.images[0].get_array().sum(1), [1, 1, 1, 1])
    plt.close('all')


def test_plot_confusion_matrix_takes_the_books_figsize_and_dpi():
    interp, *_ = hand_made()
    fig = interp.plot_confusion_matrix(figsize=(12, 12), dpi=60).figure
    assert fig.dpi == 60 and tuple(fig.get_size_inches()) == (12, 12)   # 720 x 720 pixels, as in the book
    for bad in (0, -5, 'high', True):
        with pytest.raises(ValueError, match='dpi must be a positive number'): interp.plot_confusion_matrix(dpi=bad)
    plt.close('all')
