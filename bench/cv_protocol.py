"""Cross-validated accuracy of the main job's recipe on the 296-photo pets sample: every photo predicted once, by a
model that never trained on it.

    COURSE_LIB_DATA=../shared/data python bench/cv_protocol.py                 # `course-lib pets` defaults, 5 folds
    COURSE_LIB_DATA=../shared/data python bench/cv_protocol.py --tta           # the same models, also scored with TTA
    COURSE_LIB_DATA=../shared/data python bench/cv_protocol.py --arch efficientnet_lite0 --folds 5 --seed 0
    COURSE_LIB_DATA=../shared/data python bench/cv_protocol.py --validation-run  # without the retraining on everything

The folds are stratified and seeded: each breed's photos are shuffled and dealt round the folds, so each fold holds
one or two photos of every breed. The recipe (preset `sample` of `course-lib pets`, with the flags given here) is
fixed before the run and the same in every fold; nothing is chosen on a held-out fold. Prints per-fold accuracy and
wall time, then the mean ± sd over folds and the pooled accuracy over all photos. Run it on an idle machine (see
`uptime`): the times are this machine's. This prints figures; it is not a timed test.

Each fold's model trains on all the other folds (237 photos, as many as the validation run of `course-lib pets`);
`--validation-run` trains it on a seeded 80% of them instead (189 photos, a fifth fewer, as the validation run has a
fifth fewer photos than the model `course-lib pets` retrains on every photo), to measure what those extra photos buy.
The figures this printed are kept in course_lib/report.py's PROTOCOL (notebook 14a), which the report quotes.
"""
import argparse, os, random, statistics, sys, time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault('COURSE_LIB_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from course_lib.external import untar_data, URLs
from course_lib.data import get_image_files, RegexLabeller, RandomSplitter
from course_lib.progress import ProgressCallback
from course_lib.cli import PRESETS, _learner, pets_dataloaders
import course_lib.tta  # noqa: F401  (Learner.tta)
from course_lib.cpu import tune_malloc

tune_malloc()   # as the CLI does (bench/cpu_allocator.py measures it)
BREED = RegexLabeller(r'(.+)_\d+\.\w+$')


def stratified_folds(files, k, seed) -> list:
    "The fold (0..k-1) of each file: each breed's files shuffled with `seed` and dealt round the folds."
    by_breed, fold = defaultdict(list), {}
    for f in sorted(files, key=lambda f: f.name): by_breed[BREED(f.name)].append(f)
    rng, start = random.Random(seed), 0
    for breed in sorted(by_breed):
        fs = by_breed[breed]; rng.shuffle(fs)
        for i, f in enumerate(fs): fold[f] = (start + i) % k
        start += len(fs)   # the next breed starts where this one ended, so the folds stay even in size
    return [fold[f] for f in files]


def fold_dataloaders(cfg, images, fold_of, held_out, validation_run=False):
    """The CLI's DataLoaders (`pets_dataloaders`, notebook 14b) with fold `held_out` as the validation set; with
    `validation_run`, trained only on a seeded 80% of the other folds (the CLI's RandomSplitter applied to them)."""
    which = dict(zip(get_image_files(images), fold_of))
    def splitter(items):
        train = [i for i, f in enumerate(items) if which[f] != held_out]
        if validation_run: train = [train[j] for j in RandomSplitter(cfg['valid_pct'], seed=cfg['seed'])(train)[0]]
        return train, [i for i, f in enumerate(items) if which[f] == held_out]
    return pets_dataloaders({**cfg, 'images': images}, splitter=splitter)


def run_fold(cfg, images, fold_of, k, with_tta, validation_run=False):
    "(accuracy, accuracy with TTA or None, correct, n, seconds) of the recipe trained without fold `k`."
    t0 = time.perf_counter()
    torch.manual_seed(cfg['seed'])
    dls = fold_dataloaders(cfg, images, fold_of, k, validation_run)
    learn = _learner(dls, cfg, {}, chosen=True).remove_cb(ProgressCallback)
    learn.fine_tune(cfg['epochs'], base_lr=cfg['lr'], freeze_epochs=cfg['freeze_epochs'])
    probs, targs = learn.get_preds()
    right = int((probs.argmax(1) == targs).sum())
    seconds = time.perf_counter() - t0
    tta_right = int((learn.tta()[0].argmax(1) == targs).sum()) if with_tta else None
    return right, tta_right, len(targs), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--folds', type=int, default=5)
    p.add_argument('--seed', type=int, default=0, help='seed of the fold assignment (training uses the preset seed)')
    p.add_argument('--arch', help="backbone (default: the preset's)")
    p.add_argument('--size', type=int)
    p.add_argument('--freeze-epochs', type=int)
    p.add_argument('--lr', type=float)
    p.add_argument('--tta', action='store_true', help='also score each fold with learn.tta() (same models)')
    p.add_argument('--validation-run', action='store_true',
                   help="train each fold's model on a seeded 80%% of the other folds, as the CLI's validation run "
                        "trains on 80%% of the photos")
    args = p.parse_args(argv)
    cfg = dict(PRESETS['sample'])
    for key in ('arch', 'size', 'freeze_epochs', 'lr'):
        if getattr(args, key) is not None: cfg[key] = getattr(args, key)
    cfg['presize'], cfg['seed'] = max(cfg['presize'], cfg['size']), 42
    images = untar_data(URLs.PETS_SAMPLE)/'images'
    files = get_image_files(images)
    fold_of = stratified_folds(files, args.folds, args.seed)
    share = "the validation run's share of" if args.validation_run else 'all of'
    print(f"recipe: {cfg['arch']}, {cfg['size']} px, {cfg['head']} head, fine_tune({cfg['epochs']}, "
          f"freeze_epochs={cfg['freeze_epochs']}) at {cfg['lr']}, label smoothing {cfg['label_smoothing']}; "
          f"{len(files)} photos, {args.folds} stratified folds (seed {args.seed}), each model trained on "
          f"{share} the other folds; "
          f"{os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for k in range(args.folds):
        right, tta_right, n, s = run_fold(cfg, images, fold_of, k, args.tta, args.validation_run)
        rows.append((right, tta_right, n, s))
        extra = f", with TTA {tta_right / n:.1%}" if args.tta else ''
        print(f"fold {k}: {right}/{n} = {right / n:.1%}{extra}, trained and scored in {s:.0f} s", flush=True)
    def summary(name, col):
        accs = [r[col] / r[2] for r in rows]
        pooled = sum(r[col] for r in rows) / sum(r[2] for r in rows)
        print(f"{name}: {statistics.mean(accs):.1%} ± {statistics.stdev(accs):.1%} over {args.folds} folds "
              f"(pooled {pooled:.1%} of {sum(r[2] for r in rows)} photos)")
    summary('plain', 0)
    if args.tta: summary('tta  ', 1)
    print(f"wall time per fold: {statistics.mean(r[3] for r in rows):.0f} s (training and scoring, without TTA)")


if __name__ == '__main__': main()
