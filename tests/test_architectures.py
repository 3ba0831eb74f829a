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
