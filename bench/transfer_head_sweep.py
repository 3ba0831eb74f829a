"""Sweep head settings for transfer learning with a frozen body, fast: cache the body's pooled features once, \
then train heads.

    .venv/bin/python bench/transfer_head_sweep.py                      \
# cache (8 augmented views, ~150 CPU-s) + default sweep
    .venv/bin/python bench/transfer_head_sweep.py --grid "dict(lin_ftrs=[[]], first_bn=[False], concat=[False], \
ps=[0.], ls=[0.], epochs=[6], lr=[1e-2], pct=[0.99], wd=[0.01])"

With `train_bn=False` the frozen body (BatchNorm in eval mode) is a fixed function, so training the head on cached
features of K augmented passes (pass k used at epoch k) is the same computation as `fine_tune(0, freeze_epochs=K)`
with the head alone: seconds per setting instead of minutes. Accuracy is the mean over seeds 0, 1, 2 of head init and
dropout (the augmented views come from seed 0).
"""
import argparse, itertools, os, sys, time
from pathlib import Path

os.environ.setdefault('COURSE_LIB_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, torch
from torch import nn
from course_lib.external import *
from course_lib.loader import *
from course_lib.data import *
from course_lib.augment import *
from course_lib.learner import Learner, accuracy
from course_lib.progress import ProgressCallback
from course_lib.losses import CrossEntropyLossFlat
from course_lib.models import AdaptiveConcatPool2d, arch_meta, create_body, create_head
from course_lib.cpu import tune_malloc

tune_malloc()   # glibc keeps large blocks in its heap (bench/cpu_allocator.py measures it)

def cache_features(size, mult, min_scale, views, seed, file):
    torch.manual_seed(seed)
    pets = DataBlock(get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'), splitter=RandomSplitter(seed=42),
                     item_tfms=Resize(round(size * 1.15)),
                     batch_tfms=aug_transforms(size=size, min_scale=min_scale, mult=mult))
    dls = pets.dataloaders(untar_data(URLs.PETS_SAMPLE)/'images', bs=32, seed=seed)
    dls.normalize(*arch_meta('efficientnet_lite0')['stats'])
    body = create_body('efficientnet_lite0').eval()
    pool = lambda f: AdaptiveConcatPool2d()(f).flatten(1)  # max half, then average half
    out = {'train': []}
    with torch.no_grad():
        for k in range(views):
            xs, ys = zip(*[(pool(body(xb)), yb) for xb, yb in dls.train])
            out['train'].append((torch.cat(xs), torch.cat(ys)))
        xs, ys = zip(*[(pool(body(xb)), yb) for xb, yb in dls.valid])
        out['valid'] = (torch.cat(xs), torch.cat(ys))
    torch.save(out, file)
    return out

class Views:
    "Training 'loader' over cached features: epoch k reads augmented pass k."
    def __init__(self, views, bs=32): self.views, self.e, self.bs = views, 0, bs
    def __len__(self): return len(self.views[0][0]) // self.bs
    def __iter__(self):
        x, y = self.views[self.e % len(self.views)]; self.e += 1
        for i in range(0, len(x) - self.bs + 1, self.bs): yield x[i:i + self.bs], y[i:i + self.bs]

class Pooled(nn.Module):
    "Stands in for the body + pooling: picks both halves (concat pool) or the average half of the cached features."
    def __init__(self, concat, nf=1280): super().__init__(); self.concat, self.nf = concat, nf
    def forward(self, x): return x if self.concat else x[:, self.nf:]

def train_head(feats, lin_ftrs, ps, concat, ls, epochs, lr, seed, wd=0.01, first_bn=True, pct=0.99):
    torch.manual_seed(seed)
    dls = DataLoaders(Views(feats['train']), [feats['valid']], device='cpu')
    model = nn.Sequential(Pooled(concat), create_head(1280, 37, lin_ftrs, ps, concat, first_bn)[2:])
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(label_smoothing=ls), metrics=accuracy, wd=wd)
    learn.remove_cb(ProgressCallback)
    learn.fit_one_cycle(epochs, lr, pct_start=pct)
    return learn.recorder.values[-1][3]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=224); p.add_argument('--mult', type=float, default=0.5)
    p.add_argument('--min-scale', type=float, default=0.75); p.add_argument('--views', type=int, default=8)
    p.add_argument('--grid', default="dict(lin_ftrs=[[]], first_bn=[False, True], concat=[False, True], ps=[0., 0.25], "
                   "ls=[0.], epochs=[4, 6], lr=[3e-3, 1e-2, 3e-2], pct=[0.99, 0.25], wd=[0.01])")
    a = p.parse_args()
    torch.set_num_threads(2)
    file = Path(f'/tmp/course_lib_feats_{a.size}_{a.mult}_{a.min_scale}_{a.views}.pt')
    t = time.process_time()
    feats = torch.load(file) if file.exists() else cache_features(a.size, a.mult, a.min_scale, a.views, 0, file)
    print(f'features ready ({time.process_time() - t:.0f} CPU-s)', flush=True)
    grid, res = eval(a.grid), []
    for vals in itertools.product(*grid.values()):
        kw = dict(zip(grid, vals))
        accs = [train_head(feats, **kw, seed=s) for s in range(3)]
        res.append((np.mean(accs), kw))
        print(f'{np.mean(accs):.3f} {kw} {[round(x, 3) for x in accs]}', flush=True)
    print('best:'); [print(f'{m:.3f} {kw}') for m, kw in sorted(res, key=lambda r: -r[0])[:10]]

if __name__ == '__main__': main()
