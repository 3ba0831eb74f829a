"""Which `lr_find` suggestion to trust: one recipe trained at each suggestion's learning rate, on every fold of a
stratified k-fold split of the pets sample, reported as mean ± sd accuracy over the folds.

    python bench/lr_suggestions.py                   # 4 folds (about 11 min on 2 cores)
    python bench/lr_suggestions.py --unfrozen-epochs 0   # the frozen-head recipe only

Each fold holds 2 photos of every breed (74 photos) and trains on the other 222. For each fold, `lr_find` runs once on
the fresh frozen learner (as in the book), then the recipe is trained from the same starting weights at each
suggestion's learning rate and graded on the held-out fold. The finder sees only the training photos, so every grade
is on photos that influenced neither the learning rate nor the weights. Two recipes, graded one after the other on
the same run: `frozen` is the linear head of EfficientNet-Lite0 at 128 px trained for 4 epochs with the body frozen
(`fine_tune(0, freeze_epochs=4)`); `finetune` continues it with 2 unfrozen epochs, which makes the whole run
`fine_tune(2, freeze_epochs=4)`.
`valley_mid` is the course's earlier variant of valley (halfway into the longest decreasing subsequence, from its true
first point); it is here so the comparison covers it.
"""
import argparse, os, sys, time
from pathlib import Path

os.environ.setdefault('COURSE_LIB_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, torch
from course_lib.external import *
from course_lib.loader import *
from course_lib.data import *
from course_lib.augment import *
from course_lib.learner import accuracy
from course_lib.progress import ProgressCallback
from course_lib.losses import CrossEntropyLossFlat
from course_lib.lr_finder import minimum, steep, valley, slide, suggest_lrs
from course_lib.models import vision_learner
from course_lib.cpu import tune_malloc

tune_malloc()   # glibc keeps large blocks in its heap (bench/cpu_allocator.py measures it)

LABEL = RegexLabeller(r'(.+)_\d+\.\w+$')
HEAD = dict(lin_ftrs=[], ps=0., concat_pool=False, first_bn=False, train_bn=False)


def valley_mid(lrs, losses) -> float:
    "Halfway between the first and the last point of the longest strictly decreasing subsequence of the losses."
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    n = len(losses); length, prev = [1] * n, [-1] * n
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]: length[i], prev[i] = length[j] + 1, j
    last = first = int(np.argmax(length))
    while prev[first] != -1: first = prev[first]
    return float(lrs[first + (last - first) // 2])


SUGGESTIONS = (minimum, steep, valley, slide, valley_mid)


def fold_splitter(fold: int, n_folds: int, seed: int = 0):
    "A splitter whose validation set is fold `fold` of `n_folds`: every breed's photos shuffled and dealt round."
    def split(items):
        rng = np.random.default_rng(seed)
        valid = []
        for breed in sorted({LABEL(Path(o).name) for o in items}):
            idx = [i for i, o in enumerate(items) if LABEL(Path(o).name) == breed]
            valid += [i for k, i in enumerate(rng.permutation(idx)) if k % n_folds == fold]
        held = set(valid)
        return [i for i in range(len(items)) if i not in held], sorted(valid)
    return split


def fold_dls(fold, n_folds, size, bs, seed):
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                      splitter=fold_splitter(fold, n_folds, seed), get_y=using_attr(LABEL, 'name'),
                      item_tfms=Resize(round(size * 1.25)), batch_tfms=aug_transforms(size=size, min_scale=0.75))
    return block.dataloaders(untar_data(URLs.PETS_SAMPLE)/'images', bs=bs, seed=seed + fold)


def new_learner(dls, arch, seed):
    torch.manual_seed(seed)
    learn = vision_learner(dls, arch, metrics=accuracy, loss_func=CrossEntropyLossFlat(label_smoothing=0.1), **HEAD)
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, ProgressCallback)])
    return learn


def run_fold(fold, a):
    "{recipe: {suggestion: (lr, accuracy)}} for one fold, and the finder's curve."
    dls = fold_dls(fold, a.folds, a.size, a.bs, a.seed)
    learn = new_learner(dls, a.arch, a.seed)
    learn.lr_find(num_it=a.num_it, show_plot=False)
    r = learn.lr_find_result
    sugg = suggest_lrs(r.lrs, r.losses, r.num_it, SUGGESTIONS)._asdict()
    res = {'frozen': {}, 'finetune': {}} if a.unfrozen_epochs else {'frozen': {}}
    for name, lr in sugg.items():
        learn = new_learner(dls, a.arch, a.seed)   # the same starting weights as the finder's
        learn.fine_tune(0, base_lr=lr, freeze_epochs=a.freeze_epochs)
        res['frozen'][name] = (lr, float(learn.history.rows[-1]['accuracy']))
        if a.unfrozen_epochs:   # fine_tune's second phase: the run is now fine_tune(unfrozen, freeze_epochs=frozen)
            learn.fine_tune(a.unfrozen_epochs, base_lr=lr, freeze_epochs=0)
            res['finetune'][name] = (lr, float(learn.history.rows[-1]['accuracy']))
    return res


def summarise(results, names) -> str:
    "A markdown table: per recipe and suggestion, mean ± sd accuracy over folds, and the median learning rate."
    lines = ['| recipe | suggestion | median lr | accuracy mean ± sd | per fold |', '|---|---|---|---|---|']
    for recipe in results[0]:
        for name in names:
            lrs = [r[recipe][name][0] for r in results]; accs = 100 * np.array([r[recipe][name][1] for r in results])
            lines.append(f"| {recipe} | {name} | {np.median(lrs):.2e} | "
                         f"{accs.mean():.1f} ± {accs.std(ddof=1) if len(accs) > 1 else 0:.1f} "
                         f"| {' '.join(f'{x:.1f}' for x in accs)} |")
    return '\n'.join(lines)


def compare(folds=4, freeze_epochs=4, unfrozen_epochs=2, arch='efficientnet_lite0', size=128, bs=32, num_it=100, seed=0,
            only_folds=None):
    "Run every fold (or `only_folds`) and print the table; returns the per-fold results."
    a = argparse.Namespace(folds=folds, freeze_epochs=freeze_epochs, unfrozen_epochs=unfrozen_epochs, arch=arch,
                           size=size, bs=bs, num_it=num_it, seed=seed)
    results, t0 = [], time.perf_counter()
    for fold in (range(folds) if only_folds is None else only_folds):
        t = time.perf_counter()
        results.append(run_fold(fold, a))
        lrs = ', '.join(f'{k} {v[0]:.1e}' for k, v in results[-1]['frozen'].items())
        print(f'fold {fold}: {time.perf_counter() - t:.0f} s; lrs: {lrs}', flush=True)
    print(f'{arch}, {size} px, fine_tune({unfrozen_epochs}, freeze_epochs={freeze_epochs}), {len(results)} folds of '
          f'{folds}, lr_find {num_it} iterations, '
          f'{time.perf_counter() - t0:.0f} s in all\n')
    print(summarise(results, [f.__name__ for f in SUGGESTIONS]))
    return results


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--folds', type=int, default=4)
    p.add_argument('--freeze-epochs', type=int, default=4)
    p.add_argument('--unfrozen-epochs', type=int, default=2, help='0: the frozen recipe only')
    p.add_argument('--arch', default='efficientnet_lite0')
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--num-it', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()
    compare(a.folds, a.freeze_epochs, a.unfrozen_epochs, a.arch, a.size, a.bs, a.num_it, a.seed)
