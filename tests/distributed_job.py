"""The job tests/test_distributed.py launches with torchrun (two CPU processes, gloo): `python -m torch.distributed.run
--standalone --nproc-per-node=2 tests/distributed_job.py MODE OUT`. Each rank writes what the test compares into
OUT/rank{r}/ (never into the learner's folder, OUT/learn/, where only rank 0 may write).

MODE `plain`: a model without BatchNorm, 2 epochs at bs 8 per process, to compare with one process at bs 16.
MODE `callbacks`: a small CNN with BatchNorm, lr_find, then fit with SaveModelCallback and EarlyStoppingCallback;
    each rank's own record says something else (RanksDisagree); every rank must follow rank 0's.
MODE `sample`: the pets sample at 32 pixels (the book's DataBlock), a small CNN with BatchNorm, one epoch.
MODE `fail`: rank 1 raises in its second batch; rank 0 must stop with a DistributedError, not hang.
"""
import json, os, sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from course_lib.loader import DataLoader, DataLoaders
from course_lib.learner import Learner, Callback, simple_cnn, accuracy
from course_lib.callbacks import SaveModelCallback, EarlyStoppingCallback
import course_lib.progress, course_lib.lr_finder   # noqa: F401  (the progress bar and lr_find, as in a reader's job)
from course_lib.distributed import rank, world_size, rank0_first

SEED, N_TRAIN, N_VALID = 3, 48, 20   # 20 validation photos: 10 per rank, batches of 8 and 2


def photos(n=N_TRAIN + N_VALID):
    "Small random photos labelled by their brightness, the same in every process."
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return ims, [int(np.asarray(im).mean() > 127.5) for im in ims]


def dls(bs):
    ims, labels = photos()
    train = DataLoader(ims[:N_TRAIN], labels[:N_TRAIN], bs=bs, shuffle=True, split='train', device='cpu',
                       num_workers=1)
    valid = DataLoader(ims[N_TRAIN:], labels[N_TRAIN:], bs=bs, device='cpu', num_workers=1)
    return DataLoaders(train, valid, vocab=['dark', 'bright'], device='cpu')


def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))


def sample_dls():
    "The chapter's DataBlock on the 296-photo sample, tiny: Resize(40), random crops of 32 pixels, batches of 16."
    from course_lib.data import (DataBlock, ImageBlock, CategoryBlock, get_image_files, RandomSplitter,
                                 RegexLabeller, using_attr)
    from course_lib.augment import Resize, aug_transforms
    from course_lib.external import data_home
    pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=RandomSplitter(seed=42),
                     get_y=using_attr(RegexLabeller(r'(.+)_\d+\.\w+$'), 'name'), item_tfms=Resize(40),
                     batch_tfms=aug_transforms(size=32))
    return pets.dataloaders(data_home()/'oxford-iiit-pet-sample'/'images', bs=16, seed=42, device='cpu')


class FailOnRank1(Callback):
    def after_batch(self):
        if rank() == 1 and self.learn.training and self.learn.iter == 1:
            raise ValueError("injected failure on rank 1, batch 1")


class RanksDisagree(Callback):
    """Each rank's own row of the recorder tells it something else: on rank 1 valid_loss falls every epoch (it would
    train on), on rank 0 the real valid_loss plus 100 per epoch rises (it stops once patience runs out)."""
    order = 52   # after the Recorder (50) writes the row, before DistributedCallback (55) replaces it with rank 0's
    def __init__(self): self.rows = []
    def after_epoch(self):
        row = self.learn.recorder.values[-1]   # column 2: valid_loss
        row[2] = -float(self.learn.epoch) if rank() == 1 else row[2] + 100. * self.learn.epoch
        self.rows.append(list(row))


def log_writes(written):
    "Note every file this process writes through the library's atomic_write (save and export use it)."
    import course_lib.learner, course_lib.export
    for mod in (course_lib.learner, course_lib.export):
        def logged(file, *a, _write=mod.atomic_write, **kw):
            written.append(Path(file).name)
            return _write(file, *a, **kw)
        mod.atomic_write = logged


def run(mode, out):
    import torch.distributed as dist
    written = []
    log_writes(written)
    if mode == 'plain':
        learn = Learner(dls(8), linear_model(), lr=0.05, metrics=accuracy, path=out/'learn')
        with learn.distrib_ctx(seed=SEED) as l:
            info = dict(rank=rank(), world_size=world_size(), n_batches=len(l.dls.train))
            rank0_first(lambda: (out/'order.txt').open('a').write(f'{rank()}\n'))   # rank 0 first, then the other
            l.fit(2)
    elif mode == 'callbacks':
        torch.manual_seed(int(os.environ['RANK']))   # different initial weights: DDP must start every rank from rank 0's
        learn = Learner(dls(8), simple_cnn(2, widths=(8, 16)), lr=0.01, metrics=accuracy, path=out/'learn')
        with learn.distrib_ctx(seed=SEED) as l:
            before = {k: v.clone() for k, v in l.model.state_dict().items()}
            sugg = l.lr_find(num_it=12, show_plot=False)
            restored = all(torch.equal(before[k], v) for k, v in l.model.state_dict().items())
            # rank 0's rows: no improvement after epoch 0, so it stops after epoch 2; rank 1 must stop with it
            save, stop, skew = SaveModelCallback(fname='best'), EarlyStoppingCallback(patience=2), RanksDisagree()
            l.fit(8, cbs=[save, stop, skew])
            info = dict(rank=rank(), world_size=world_size(), sugg=list(sugg), n_finder=len(l.lr_find_result.lrs),
                        best_epoch=save.best_epoch, stopped_epoch=stop.stopped_epoch, lr_find_restored=restored,
                        own_rows=skew.rows)
            l.export('model.pth')
    elif mode == 'sample':
        learn = Learner(sample_dls(), simple_cnn(37, widths=(8, 16)), lr=0.01, metrics=accuracy, path=out/'learn')
        with learn.distrib_ctx(seed=SEED) as l:
            info = dict(rank=rank(), world_size=world_size(), n_train=len(l.dls.train.items))
            l.fit(1)
        # after distrib_ctx the loaders read every photo again: this rank's model on the whole validation set
        info['valid_loss_alone'] = float(learn.get_preds(with_loss=True)[2].mean())
    elif mode == 'fail':
        learn = Learner(dls(8), linear_model(), cbs=[FailOnRank1()], path=out/'learn')
        with learn.distrib_ctx(timeout=60):
            learn.fit(3)
        return
    mine = out/f"rank{info['rank']}"   # rank() is 0 again here: distrib_ctx has closed the process group
    mine.mkdir(parents=True, exist_ok=True)
    info.update(values=learn.recorder.values, model_is_bare=not hasattr(learn.model, 'module'),
                sharded=any(getattr(dl, 'sharding', None) for dl in learn.dls.loaders),
                group_closed=not dist.is_initialized(), written=written)
    (mine/'info.json').write_text(json.dumps(info, default=float))
    torch.save(learn.model.state_dict(), mine/'params.pt')


if __name__ == '__main__':
    run(sys.argv[1], Path(sys.argv[2]))
