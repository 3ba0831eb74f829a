"Tests for course_lib.architectures: what Throughput times, and measure_arch's argument check."
import pytest
import torch
from torch import nn

from course_lib.learner import Learner, accuracy
from course_lib.progress import ProgressCallback
import course_lib.architectures as architectures
from course_lib.architectures import Throughput, measure_arch

from helpers import synth_dls


def small_learner(**kw):
    torch.manual_seed(0)
    learn = Learner(synth_dls(), nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)), lr=1e-2, **kw)
    return learn.remove_cb(ProgressCallback)


def test_throughput_times_training_epochs_but_not_lr_find():
    pytest.importorskip('course_lib.lr_finder')
    learn = small_learner(cbs=Throughput())
    learn.lr_find(num_it=20, show_plot=False)
    assert learn.throughput.epochs == []           # lr_find's trial steps are not training speed
    learn.fit(2)
    n_train = len(learn.dls.train.dataset)
    assert [n for n, _ in learn.throughput.epochs] == [n_train, n_train] and learn.throughput.images_per_s > 0


def test_measure_arch_checks_the_metric_before_training(monkeypatch):
    monkeypatch.setattr(architectures, 'vision_learner', lambda dls, arch, cbs=(), **kw: small_learner(cbs=cbs, **kw))
    def train(learn): pytest.fail('measure_arch trained before noticing that the metric is not recorded')
    with pytest.raises(ValueError, match=r"metric='accuracy' is not recorded by this learner; "
                                         r"it records \['train_loss', 'valid_loss'\]"):
        measure_arch(nn.Identity, synth_dls(), train)
    with pytest.raises(ValueError, match='not recorded'):
        measure_arch(nn.Identity, synth_dls(), train, metric='error_rate', metrics=accuracy)


# ---------- cached-feature heads: the loader, the seeded head and the paired table ----------

def test_feature_loader_covers_every_item_once_and_cycles_the_views():
    from course_lib.architectures import FeatureLoader
    views = torch.stack([torch.zeros(10, 3), torch.ones(10, 3)])    # two passes of 10 items, 3 features
    dl = FeatureLoader(views, torch.arange(10), bs=4, shuffle=True, seed=1)
    assert len(dl) == 3 and len(FeatureLoader(views, torch.arange(10), bs=4, drop_last=True)) == 2
    for expect in (0., 1., 0.):                                      # pass k reads view k % 2
        batches = list(dl)
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))
        assert all(float(x.mean()) == expect for x, _ in batches)


def test_head_accuracy_is_seeded_and_learns_separable_features():
    from course_lib.architectures import head_accuracy
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 3
    plain = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(200, 3, generator=g)
    views = plain[None] + 0.1 * torch.randn(2, 200, 3, generator=g)
    a, b = (head_accuracy(plain, views, y, seed=5, epochs=8, lr=0.1) for _ in range(2))
    assert a == b and a > 0.9, (a, b)


def test_show_seeds_reports_paired_differences(capsys):
    from course_lib.architectures import show_seeds
    show_seeds({'a': [0.5, 0.6, 0.7], 'b': [0.6, 0.6, 0.6]}, n_valid=50)
    out = capsys.readouterr().out
    assert '60.0 ± 10.0' in out and '1/1/1' in out and 'one photo is 2.0 points' in out
