"""The chapter's transfer-learning recipe on the 296-photo pets sample: accuracy and wall time per seed.

    .venv/bin/python bench/transfer_recipe.py --seeds 0 1 2            # the course's default recipe
    .venv/bin/python bench/transfer_recipe.py --seeds 0 --book         \
# the book's recipe (fastai defaults) for comparison

Wall time per seed counts everything the chapter does: building the DataLoaders (decoding the JPEGs), `lr_find` and
training. Run it on an idle machine (check `uptime`): on 2 shared cores the timings double when someone else trains.
"""
import argparse, os, sys, time, random
from pathlib import Path

os.environ.setdefault('COURSE_LIB_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, torch
from course_lib.external import *
from course_lib.loader import *
from course_lib.data import *
from course_lib.augment import *
from course_lib.losses import CrossEntropyLossFlat
from course_lib.learner import accuracy
from course_lib.lr_finder import *
from course_lib.models import *
from course_lib.cpu import tune_malloc

tune_malloc()   # glibc keeps large blocks in its heap (bench/cpu_allocator.py measures it)

def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--book', action='store_true',
                   help="fastai's defaults: 2-layer head, BN trained, fine_tune(4, freeze_epochs=2), 192 px")
    p.add_argument('--arch', default='efficientnet_lite0')
    p.add_argument('--size', type=int, default=None, help='training size (default: the architecture\'s native size)')
    p.add_argument('--presize', type=float, default=1.15, help='item Resize = size * presize')
    p.add_argument('--min-scale', type=float, default=0.75)
    p.add_argument('--mult', type=float, default=0.5, help='aug_transforms strength multiplier')
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--lin-ftrs', type=int, nargs='*', default=[], help='hidden sizes of the head ([] = linear head)')
    p.add_argument('--ps', type=float, default=0.)
    p.add_argument('--concat-pool', type=int, default=0)
    p.add_argument('--first-bn', type=int, default=0)
    p.add_argument('--train-bn', type=int, default=0)
    p.add_argument('--ls', type=float, default=0.1, help='label smoothing')
    p.add_argument('--freeze-epochs', type=int, default=6)
    p.add_argument('--epochs', type=int, default=0, help='unfrozen epochs after the frozen ones')
    p.add_argument('--lr', type=float, default=1e-2, help='base_lr (0: use the lr_find suggestion --pick)')
    p.add_argument('--pick', default='minimum', help='which lr_find suggestion to use when --lr 0')
    p.add_argument('--lr-mult', type=float, default=100)
    p.add_argument('--num-it', type=int, default=20, help='lr_find iterations')
    p.add_argument('--no-lr-find', action='store_true')
    p.add_argument('--threads', type=int, default=2)
    return p.parse_args()

def run(a, seed):
    t0, c0 = time.perf_counter(), time.process_time()
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
    size = a.size or arch_meta(a.arch)['size']
    path = untar_data(URLs.PETS_SAMPLE)
    pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=RandomSplitter(seed=42),
                     get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'),
                     item_tfms=Resize(round(size * a.presize)),
                     batch_tfms=aug_transforms(size=size, min_scale=a.min_scale, mult=a.mult))
    dls = pets.dataloaders(path/'images', bs=a.bs, seed=seed)
    learn = vision_learner(dls, a.arch, metrics=accuracy, lin_ftrs=a.lin_ftrs, ps=a.ps, concat_pool=bool(a.concat_pool),
                           first_bn=bool(a.first_bn), train_bn=bool(a.train_bn),
                           loss_func=CrossEntropyLossFlat(label_smoothing=a.ls))
    learn.remove_cbs([c for c in learn.cbs if type(c).__name__ == 'ProgressCallback'])
    t_data = time.perf_counter() - t0
    lr = a.lr
    if not a.no_lr_find:
        sugg = learn.lr_find(num_it=a.num_it, show_plot=False)
        print('  lr_find suggestions:', {k: f'{v:.2e}' for k, v in sugg._asdict().items()}, flush=True)
        if not lr: lr = float(getattr(sugg, a.pick))
    t_find = time.perf_counter() - t0 - t_data
    learn.fine_tune(a.epochs, base_lr=lr or 2e-3, freeze_epochs=a.freeze_epochs, lr_mult=a.lr_mult)
    acc = learn.history.rows[-1]['accuracy']
    return acc, time.perf_counter() - t0, t_data, t_find, lr, time.process_time() - c0

def main():
    a = parse()
    if a.book:  # fastai 2.8 defaults with the book's call: lr_find + fine_tune(4, freeze_epochs=2) at 192 px
        a.size, a.presize, a.mult, a.lin_ftrs, a.ps, a.train_bn, a.ls = 192, 460 / 224, 1., None, 0.5, 1, 0.
        a.concat_pool, a.first_bn, a.freeze_epochs, a.epochs, a.num_it, a.min_scale, a.lr = 1, 1, 2, 4, 100, 0.75, 0
    torch.set_num_threads(a.threads)
    print(f"uptime: {os.getloadavg()[0]:.2f} load; args: {vars(a)}", flush=True)
    accs, times = [], []
    for s in a.seeds:
        acc, wall, t_data, t_find, lr, cpu = run(a, s)
        accs.append(acc); times.append(wall)
        print(f"seed {s}: accuracy {acc:.4f}  wall {wall:.1f} s  (data {t_data:.1f} s, lr_find {t_find:.1f} s; "
              f"CPU time of this process {cpu:.1f} s; base_lr {lr:.2e})", flush=True)
    print(f"mean accuracy {np.mean(accs):.4f} over seeds {a.seeds}; "
          f"wall per seed {', '.join(f'{t:.1f}' for t in times)} s "
          f"(mean {np.mean(times):.1f} s); load average now {os.getloadavg()[0]:.2f}")

if __name__ == '__main__': main()
