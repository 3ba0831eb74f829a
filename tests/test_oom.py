"Fault injection for out-of-memory handling in `Learner.fit`: the clear error, and `auto_bs` halving the batch size."
import warnings
import pytest
import torch
from torch import nn

from course_lib.loader import DataLoaders
from course_lib.optimizer import *
from course_lib.learner import *
from course_lib.progress import *
from course_lib.schedule import *
from course_lib.export import *
from course_lib.oom import *


class TensorLoader:
    "A minimal loader whose batch size can change between epochs, like course_lib's DataLoader."
    def __init__(self, x, y, bs): self.x, self.y, self.bs = x, y, bs
    def __len__(self): return -(-len(self.x) // self.bs)
    def __iter__(self):
        for i in range(0, len(self.x), self.bs): yield self.x[i:i + self.bs], self.y[i:i + self.bs]


class FitsAtMost(nn.Module):
    "A linear model on a simulated device where batches larger than `limit` run out of memory."
    def __init__(self, limit, in_eval_only=False, exc=None):
        super().__init__()
        self.lin, self.limit, self.in_eval_only, self.exc, self.sizes = nn.Linear(2, 2), limit, in_eval_only, exc, []
    def forward(self, x):
        self.sizes.append((self.training, len(x)))
        if len(x) > self.limit and not (self.in_eval_only and self.training):
            raise self.exc or torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} GiB (simulated)")
        return self.lin(x)


def dls(n=96, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > x[:, 1]).long()
    return DataLoaders(TensorLoader(x[:64], y[:64], bs), TensorLoader(x[64:], y[64:], bs), vocab=['a', 'b'])


def learner(model, bs=32, **kw):
    return Learner(dls(bs=bs), model, lr=0.1, metrics=accuracy, **kw)


def test_oom_gives_a_clear_error_with_the_batch_size(one_thread):
    learn = learner(FitsAtMost(10))
    with pytest.raises(BatchTooLargeError) as ei:
        learn.fit(1)
    msg = str(ei.value)
    assert 'bs=32' in msg and 'bs=16' in msg and 'auto_bs=True' in msg and 'epoch 0' in msg and 'train batch 0' in msg
    assert isinstance(ei.value, torch.OutOfMemoryError)  # code that catches torch's OOM still catches it
    assert isinstance(ei.value.__cause__, torch.OutOfMemoryError) and 'simulated' in msg
    assert learn.pred is None and learn.xb is None  # the failed batch is released


def test_auto_bs_halves_until_it_fits_and_finishes(one_thread):
    model = FitsAtMost(10)
    learn = learner(model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        learn.fit(2, auto_bs=True)
    msgs = [str(w.message) for w in rec if 'auto_bs' in str(w.message)]
    assert len(msgs) == 2 and 'bs=32' in msgs[0] and msgs[0].endswith('with bs=16.') and msgs[1].endswith('with bs=8.')
    assert learn.dls.train.bs == 8 and learn.dls.valid.bs == 8
    assert len(learn.recorder.values) == 2 and all(v[2] is not None for v in learn.recorder.values)
    failed = [i for i, (_, n) in enumerate(model.sizes) if n > 10]
    assert all(n <= 10 for _, n in model.sizes[failed[-1] + 1:])  # after the last failure every batch fits
    assert learn.auto_bs is False  # only for that call


def test_auto_bs_through_fit_one_cycle_and_progress_total(one_thread):
    seen = {}
    class Peek(Callback):
        def after_fit(self): seen.update(n=self.learn.progress.bar.n, total=self.learn.progress.bar.total)
    learn = learner(FitsAtMost(20), cbs=[Peek()])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(2, 0.1, auto_bs=True)
    assert learn.dls.train.bs == 16 and len(learn.recorder.values) == 2
    assert seen['n'] <= seen['total']  # the bar's total grew with the extra batches


def test_oom_in_validation_is_handled_too(one_thread):
    learn = learner(FitsAtMost(10, in_eval_only=True))
    with pytest.raises(BatchTooLargeError, match='valid batch 0'):
        learn.fit(1)
    learn = learner(FitsAtMost(10, in_eval_only=True))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, auto_bs=True)
    assert learn.dls.valid.bs == 8 and learn.recorder.values[-1][3] is not None


def test_even_one_item_does_not_fit(one_thread):
    learn = learner(FitsAtMost(0))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(BatchTooLargeError, match='even one item does not fit'):
            learn.fit(1, auto_bs=True)


def test_cpu_allocator_message_counts_as_oom_and_other_errors_pass_through(one_thread):
    learn = learner(FitsAtMost(10, exc=RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                                                    "you tried to allocate 9 GB")))
    with pytest.raises(BatchTooLargeError, match="cpu ran out of memory"):
        learn.fit(1)
    learn = learner(FitsAtMost(10, exc=RuntimeError('mat1 and mat2 shapes cannot be multiplied')))
    with pytest.raises(RuntimeError, match='shapes cannot be multiplied') as ei:
        learn.fit(1, auto_bs=True)
    assert not isinstance(ei.value, BatchTooLargeError) and learn.dls.train.bs == 32


def test_loader_without_bs_gets_advice_not_a_crash(one_thread):
    from torch.utils.data import TensorDataset, DataLoader as TorchDataLoader
    x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
    d = DataLoaders(TorchDataLoader(TensorDataset(x, y), batch_size=32),
                    TorchDataLoader(TensorDataset(x, y), batch_size=32))
    learn = Learner(d, FitsAtMost(10), lr=0.1)
    with pytest.raises(BatchTooLargeError, match='smaller batch size'):
        learn.fit(1, auto_bs=True)


def test_auto_bs_with_mixed_precision_leaves_no_autocast_behind(one_thread):
    from course_lib.fp16 import MixedPrecision
    learn = learner(FitsAtMost(10), cbs=[MixedPrecision(torch.bfloat16)])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, auto_bs=True)
    assert learn.dls.train.bs == 8
    assert not torch.is_autocast_enabled('cpu')  # the context opened by the batch that ran out of memory was closed


def test_oom_while_loading_the_first_batch_still_gets_the_clear_error(one_thread):
    class LoadsOnGPU(TensorLoader):  # e.g. batch augmentations on the GPU run out of memory inside the loader
        def __iter__(self):
            if self.bs > 10: raise torch.OutOfMemoryError("CUDA out of memory (simulated, in the loader)")
            yield from super().__iter__()
    learn = learner(nn.Linear(2, 2))
    learn.dls.train = LoadsOnGPU(learn.dls.train.x, learn.dls.train.y, 32)
    with pytest.raises(BatchTooLargeError, match='train batch 0 of 2, with batches of bs=32'):
        learn.fit(1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, auto_bs=True)
    assert learn.dls.train.bs == 8


def test_oom_in_validation_reruns_only_the_validation(one_thread):
    model = FitsAtMost(10, in_eval_only=True)
    learn = learner(model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        learn.fit(1, auto_bs=True)
    assert [n for training, n in model.sizes if training] == [32, 32]    # the two training batches ran once each
    assert learn.dls.train.bs == 32 and learn.dls.valid.bs == 8           # training fitted: its bs is untouched
    assert any(str(w.message).endswith('validating again with bs=16.') for w in rec)


def test_oom_messages_fit_their_context(one_thread):
    pytest.importorskip('course_lib.lr_finder')
    learn = learner(FitsAtMost(10))
    with pytest.raises(BatchTooLargeError, match='lr_find cannot halve it by itself') as ei:
        learn.lr_find(show_plot=False)
    assert 'auto_bs=True' not in str(ei.value)    # lr_find has no auto_bs
    from torch.utils.data import TensorDataset, DataLoader as TorchDataLoader
    x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
    d = DataLoaders(TorchDataLoader(TensorDataset(x, y), batch_size=32),
                    TorchDataLoader(TensorDataset(x, y), batch_size=32))
    with pytest.raises(BatchTooLargeError) as ei:
        Learner(d, FitsAtMost(10), lr=0.1).fit(1)
    assert 'bs=None' not in str(ei.value) and 'train batch 0 of 2' in str(ei.value)
