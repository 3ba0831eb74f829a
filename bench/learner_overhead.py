"""Training time of course_lib's Learner vs a plain PyTorch loop: same model, same batches, same optimiser, same loss.

Usage: python bench/learner_overhead.py [--size 128] [--bs 32] [--n-train 8] [--n-valid 2] [--epochs 1] [--repeats 5]

Part 1 (end to end): batches are random tensors made once and kept in memory, so data loading does not enter the
comparison. Both sides train `epochs` epochs (forward, loss, backward, AdamW step) and validate (forward, loss,
accuracy) every epoch. The Learner runs with its default callbacks (Recorder and the progress bar / epoch table) plus
the 1cycle-free `fit`; a second Learner variant runs without the progress display. Runs are interleaved; the minimum
of `repeats` is reported (the least noisy estimate on a shared machine) and also the median of the per-repeat ratios
to the plain loop. Part 2 (fixed cost): the same comparison with a tiny linear model over 2000 batches, where compute
is negligible, gives the time the Learner adds per batch (callback dispatch, recorder, progress bar), shown as a
percentage of part 1's per-batch time; this is much less sensitive to other processes than part 1. This prints
figures; it is not a timed test.
"""
import argparse, io, time, contextlib
import torch
from torch import nn

from course_lib.loader import DataLoaders
from course_lib.learner import Learner, accuracy
from course_lib.optimizer import Adam, param_groups, default_splitter
from course_lib.progress import ProgressCallback
from course_lib.export import create_model
from course_lib.cpu import tune_malloc

tune_malloc()   # glibc keeps large blocks in its heap (bench/cpu_allocator.py measures it)


def make_batches(n, bs, size, n_out, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, n_out, (bs,), generator=g))
            for _ in range(n)]


def new_model(n_out):
    torch.manual_seed(0)
    return create_model('simple_cnn', n_out=n_out)


def plain_loop(model, train, valid, epochs, lr, wd, loss_func):
    "What one would write by hand: same AdamW, same no-decay groups, same loss, same per-epoch validation."
    opt = Adam(param_groups(default_splitter(model), model, wd), lr)
    for epoch in range(epochs):
        model.train()
        for xb, yb in train:
            loss = loss_func(model(xb), yb)
            loss.item()   # a hand-written loop also looks at the loss (and a Learner must, to stop on NaN)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            tot, acc, n = 0., 0., 0
            for xb, yb in valid:
                pred = model(xb)
                tot += loss_func(pred, yb).item() * len(yb); acc += accuracy(pred, yb).item() * len(yb); n += len(yb)
    return model


def fixed_cost_per_batch(n_batches=2000, repeats=5):
    "Seconds per batch the Learner adds, measured with a tiny model where compute is negligible (min over repeats)."
    g = torch.Generator().manual_seed(0)
    train = [(torch.randn(32, 2, generator=g), torch.randint(0, 2, (32,), generator=g)) for _ in range(n_batches)]
    valid = train[:n_batches // 4]
    dls = DataLoaders(train, valid, vocab=['a', 'b'])
    def tiny(): torch.manual_seed(0); return nn.Linear(2, 2)
    loss_func = Learner(dls, nn.Identity()).loss_func
    def learner(progress):
        learn = Learner(dls, tiny(), metrics=accuracy)
        if not progress: learn.remove_cb(ProgressCallback)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()): learn.fit(1)
    runs = {'plain': lambda: plain_loop(tiny(), train, valid, 1, 1e-3, 0.01, loss_func),
            'learner': lambda: learner(True), 'learner_noprog': lambda: learner(False)}
    times = {k: min(time_it(f) for _ in range(repeats)) for k, f in runs.items()}
    n = n_batches + len(valid)
    return {k: (v - times['plain']) / n for k, v in times.items() if k != 'plain'}, times['plain'] / n


def time_it(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=128); ap.add_argument('--bs', type=int, default=32)
    ap.add_argument('--n-train', type=int, default=8); ap.add_argument('--n-valid', type=int, default=2)
    ap.add_argument('--epochs', type=int, default=1); ap.add_argument('--repeats', type=int, default=5)
    a = ap.parse_args()
    n_out, lr, wd = 37, 1e-3, 0.01
    train, valid = make_batches(a.n_train, a.bs, a.size, n_out, 1), make_batches(a.n_valid, a.bs, a.size, n_out, 2)
    dls = DataLoaders(train, valid, vocab=[str(i) for i in range(n_out)])

    def run_learner(progress):
        learn = Learner(dls, new_model(n_out), lr=lr, wd=wd, metrics=accuracy)
        if not progress: learn.remove_cb(ProgressCallback)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            learn.fit(a.epochs)
        return learn

    loss_func = Learner(dls, nn.Identity()).loss_func   # the Learner's default loss, used by both sides
    runs = {'plain PyTorch loop': lambda: plain_loop(new_model(n_out), train, valid, a.epochs, lr, wd, loss_func),
            'Learner (default callbacks)': lambda: run_learner(True),
            'Learner (no progress display)': lambda: run_learner(False)}
    for f in runs.values(): f()   # warm-up: allocator, kernels, first-call costs
    times = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, f in runs.items(): times[k].append(time_it(f))
    n_batches = a.epochs * (a.n_train + a.n_valid)
    fixed, tiny_batch = fixed_cost_per_batch()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; simple_cnn, {a.size}px, bs {a.bs}, "
          f"{a.epochs} epochs x ({a.n_train} train + {a.n_valid} valid) batches; min of {a.repeats} runs")
    base = min(times['plain PyTorch loop'])
    for k, ts in times.items():
        m = min(ts)
        ratios = sorted(t / p for t, p in zip(ts, times['plain PyTorch loop']))
        extra = '' if k.startswith('plain') else (f"  overhead {100 * (m - base) / base:+.1f}% (min vs min), "
                                                  f"{100 * (ratios[len(ratios) // 2] - 1):+.1f}% (median paired)")
        print(f"{k:<32} {m:7.3f} s  ({1000 * m / n_batches:.1f} ms/batch){extra}")
    per_batch = base / n_batches
    print(f"\nFixed cost per batch (tiny model, {1e6 * tiny_batch:.0f} us/batch of plain compute):")
    for k, name in (('learner', 'Learner (default callbacks)'), ('learner_noprog', 'Learner (no progress display)')):
        print(f"{name:<32} {1e6 * fixed[k]:+7.1f} us/batch = {100 * fixed[k] / per_batch:+.2f}% of this model's "
              f"{1000 * per_batch:.1f} ms/batch")


if __name__ == '__main__':
    main()
