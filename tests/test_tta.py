"""`Learner.tta` (course_lib.tta) on a small CNN over real sample photos: what it promises, not how accurate it is."""
import pytest
import torch

from course_lib.external import data_home
from course_lib.data import (DataBlock, ImageBlock, CategoryBlock, get_image_files, RandomSplitter, RegexLabeller,
                             using_attr)
from course_lib.augment import Resize, aug_transforms
from course_lib.learner import Learner, simple_cnn
import course_lib.tta  # noqa: F401  (adds Learner.tta)

SAMPLE = data_home()/'oxford-iiit-pet-sample'/'images'
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the pets sample is not at {SAMPLE} (set COURSE_LIB_DATA)")


@pytest.fixture(scope='module')
def learn():
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda p: get_image_files(p)[:48],
                      splitter=RandomSplitter(0.25, seed=0), get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'),
                      item_tfms=Resize(48), batch_tfms=aug_transforms(size=32, min_scale=0.5))
    dls = block.dataloaders(SAMPLE, bs=8, seed=0)
    torch.manual_seed(0)
    return Learner(dls, simple_cnn(len(dls.vocab)))


def test_beta_one_is_the_plain_prediction_and_the_global_rng_is_untouched(learn):
    plain, targs = learn.get_preds()
    state = torch.random.get_rng_state()
    p, t = learn.tta(n=2, beta=1.)
    assert torch.allclose(p, plain, atol=1e-6) and torch.equal(t, targs)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_augmented_passes_are_seeded_and_differ_from_plain(learn):
    plain, _ = learn.get_preds()
    a, b = learn.tta(n=2, beta=None, seed=5)[0], learn.tta(n=2, beta=None, seed=5)[0]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, plain, atol=1e-4)
    assert torch.allclose(learn.tta(n=2)[0].sum(1), torch.ones(len(plain)), atol=1e-5)
    mx = learn.tta(n=2, beta=None, use_max=True, seed=5)[0]
    assert (mx >= a - 1e-6).all()   # the per-class maximum over the passes is at least their mean


def test_a_shuffled_loader_is_scored_in_item_order(learn):
    p, t = learn.tta(dl=learn.dls.train, n=1)
    assert torch.equal(t, learn.dls.train.labels) and len(p) == len(learn.dls.train.items)


@pytest.mark.parametrize('kw, msg', [(dict(n=0), 'at least 1, got 0'), (dict(n=True), 'got True'),
                                     (dict(beta=1.5), 'from 0 to 1'),
                                     (dict(dl=[1, 2]), 'needs a course_lib DataLoader')])
def test_bad_arguments_are_refused_with_the_value(learn, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg): learn.tta(**kw)
