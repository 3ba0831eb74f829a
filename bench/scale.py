"""Full-size data on this machine: how the cost grows from the 296-photo sample to the 7,390 photos of the full
Oxford-IIIT Pets set, on a stand-in of the same size and shape built from the sample (issue 18).

    python bench/scale.py                      # N = 296, 1480, 3700, 7390: pipeline, model and CLI tables
    python bench/scale.py --sizes 296,1480 --skip-cli

The stand-in: each sample photo re-encoded many times, each copy with its own crop (70-100% of each side), mirror,
scale (0.8-1.25) and JPEG quality (70-95), so every file decodes to different pixels; named like the full set
(`Breed_k.jpg`, 199-200 per breed for 7,390). Built once under --work (default: the temp folder), reused after.
Smaller N are per-breed prefixes of it (hard links). Each measurement runs in a fresh process so its peak RSS is its
own. Nothing here is asserted: it prints what this machine did, and the growth exponent k of time ~ N^k.
"""
import argparse, json, math, os, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
from PIL import Image

FULL, SIZES = 7390, (296, 1480, 3700, 7390)


def per_breed(n:int, n_breeds:int=37) -> list:
    return [n // n_breeds + (b < n % n_breeds) for b in range(n_breeds)]


def _variant(img, rng):
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.7, 1)), int(h * rng.uniform(0.7, 1))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5: img = img.transpose(Image.FLIP_LEFT_RIGHT)
    s = rng.uniform(0.8, 1.25)
    return img.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BILINEAR), int(rng.integers(70, 96))


def build_stand_in(sample:Path, work:Path, n:int=FULL) -> Path:
    "The stand-in folder of `n` photos (built the first time, with a progress bar)."
    from tqdm.auto import tqdm
    from course_lib.loader import load_image
    dest = work/f'pets-stand-in-{n}'/'images'
    done = dest.parent/'built.json'
    if done.exists() and json.loads(done.read_text()).get('n') == n: return dest
    dest.mkdir(parents=True, exist_ok=True)
    by_breed = {}
    for f in sorted(sample.glob('*.jpg')): by_breed.setdefault(f.name.rsplit('_', 1)[0], []).append(f)
    if len(by_breed) != 37: raise SystemExit(f"bench/scale.py: {sample} has {len(by_breed)} breeds, not 37")
    with tqdm(total=n, desc='building the stand-in') as bar:
        for b, ((breed, photos), count) in enumerate(zip(sorted(by_breed.items()), per_breed(n))):
            for k in range(count):
                img, q = _variant(load_image(photos[k % len(photos)]), np.random.default_rng([b, k]))
                img.save(dest/f'{breed}_{k + 1}.jpg', quality=q)
                bar.update()
    done.write_text(json.dumps({'n': n}))
    return dest


def subset(full:Path, work:Path, n:int) -> Path:
    "The first photos of each breed of the stand-in, `n` in all, as hard links in their own folder."
    if n == FULL: return full
    dest = work/f'pets-stand-in-{n}'/'images'
    if dest.is_dir() and len(list(dest.iterdir())) == n: return dest
    dest.mkdir(parents=True, exist_ok=True)
    breeds = sorted({f.name.rsplit('_', 1)[0] for f in full.iterdir()})
    for breed, count in zip(breeds, per_breed(n)):
        for k in range(1, count + 1):
            src, dst = full/f'{breed}_{k}.jpg', dest/f'{breed}_{k}.jpg'
            if not dst.exists():
                try: os.link(src, dst)
                except OSError: dst.write_bytes(src.read_bytes())
    return dest


def peak_rss_mb(children:bool=False) -> float:
    "Peak resident memory of this process (or of its finished children), in MB; NaN where `resource` is missing."
    try: import resource   # not on Windows
    except ImportError: return math.nan
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == 'darwin' else r / 2**10   # bytes on macOS, kilobytes on Linux


def _cfg(folder, cache_mb, presize=None):
    from course_lib.cli import PRESETS
    cfg = dict(PRESETS['cpu'], images=str(folder), seed=42, cache_mb=cache_mb)
    if presize: cfg['presize'] = presize
    return cfg


def _pass(dl):
    t0, n = time.perf_counter(), 0
    for xb, _ in dl: n += len(xb)
    return n / (time.perf_counter() - t0)


def measure_pipeline(folder, cache_mb, presize, epochs=3):
    "The data pipeline alone (no model): stages, then `epochs` training + validation passes."
    from course_lib.cli import pets_dataloaders
    r = dict(baseline_rss_mb=peak_rss_mb())
    dls = pets_dataloaders(_cfg(folder, cache_mb, presize))
    cache, r['epochs'] = dls.train.cache, []
    for e in range(epochs):
        cache.reset_stats(); train = _pass(dls.train); train_hits = cache.hit_rate
        cache.reset_stats(); valid = _pass(dls.valid)
        r['epochs'].append(dict(train_img_s=train, valid_img_s=valid, train_hit_rate=train_hits,
                                valid_hit_rate=cache.hit_rate))
    r.update(cache_mb_used=cache.nbytes / 2**20, cached=len(cache), n=dls.train.n + dls.valid.n,
             peak_rss_mb=peak_rss_mb())
    return r


def measure_model(folder, cache_mb):
    "The cpu preset's learner: two frozen epochs from a cold cache, lr_find, interpretation, the report."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from course_lib.cli import pets_dataloaders, _learner
    from course_lib.learner import Callback
    from course_lib.interpret import ClassificationInterpretation
    from course_lib.report import write_report

    class PhaseTimer(Callback):
        def __init__(self): self.rows = []
        def before_train(self): self.t = time.perf_counter(); self.learn.dls.train.cache.reset_stats()
        def after_train(self):
            c = self.learn.dls.train.cache
            self.rows.append(dict(train_img_s=self.learn.dls.train.n // self.learn.dls.train.bs *
                                  self.learn.dls.train.bs / (time.perf_counter() - self.t), train_hit_rate=c.hit_rate))
        def before_validate(self): self.t = time.perf_counter()
        def after_validate(self):
            self.rows[-1]['valid_img_s'] = self.learn.dls.valid.n / (time.perf_counter() - self.t)

    cfg, r = _cfg(folder, cache_mb), {}
    dls = pets_dataloaders(cfg)
    learn = _learner(dls, cfg, {}, chosen=True)
    timer = PhaseTimer()
    learn.fit_one_cycle(2, 1e-2, cbs=[timer])
    r['epochs'] = timer.rows
    t0 = time.perf_counter(); learn.lr_find(num_it=cfg['num_it'], show_plot=False)
    r['lr_find_s'] = time.perf_counter() - t0
    t0 = time.perf_counter(); interp = ClassificationInterpretation.from_learner(learn)
    r['interp_from_learner_s'] = time.perf_counter() - t0
    for name, f in [('most_confused_s', lambda: interp.most_confused()),
                    ('plot_confusion_matrix_s', lambda: interp.plot_confusion_matrix()),
                    ('plot_top_losses_s', lambda: interp.plot_top_losses(9))]:
        t0 = time.perf_counter(); f(); plt.close('all'); r[name] = time.perf_counter() - t0
    state = dict(config=cfg, preset='cpu', status='finished', step='export', written=[], earlier=[],
                 epochs=[dict(x) for x in learn.history.rows], most_confused=interp.most_confused(),
                 metrics=dict(n_train=dls.train.n, n_valid=dls.valid.n, n_classes=37, device='cpu',
                              cache=dls.train.cache.stats()))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter(); write_report(Path(d), state); r['write_report_s'] = time.perf_counter() - t0
    r.update(n=dls.train.n + dls.valid.n, cache=dls.train.cache.stats(), peak_rss_mb=peak_rss_mb())
    return r


def measure_cli(folder, cache_mb):
    "`course-lib pets --preset cpu` for one frozen epoch, as a user runs it: its own estimate against its wall time."
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, '-m', 'course_lib', 'pets', '--preset', 'cpu', '--data', str(folder), '--out', out,
                '--freeze-epochs', '1', '--cache-mb', str(cache_mb)]
        t0 = time.perf_counter(); p = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode: raise SystemExit(f"course-lib pets failed:\n{p.stderr[-2000:]}")
        m = json.loads((Path(out)/'metrics.json').read_text())
    return dict(wall_s=wall, estimated_s=m['estimated_s'], accuracy=m['accuracy'], n=m['n_train'] + m['n_valid'],
                cache=m['cache'], peak_rss_mb=peak_rss_mb(children=True))


def stage_times(n:int, reps:int=3) -> dict:
    """The bookkeeping stages on `n` synthetic items (names only, no pixels): the best of `reps` runs of each, so that
    growth with n is the code's, not the disk's."""
    from course_lib.data import DataBlock, ImageBlock, CategoryBlock, RandomSplitter, RegexLabeller, using_attr
    from course_lib.interpret import ClassificationInterpretation
    from course_lib.report import write_report
    import torch
    breeds = [f'breed{b}' for b in range(37)]
    items = [Path(f'{breeds[i % 37]}_{i // 37 + 1}.jpg') for i in range(n)]
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: items, splitter=RandomSplitter(seed=42),
                      get_y=using_attr(RegexLabeller(r'(.+)_\d+\.\w+$'), 'name'))
    g = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(g.normal(size=(n, 37))).float(), 1)
    targs = torch.from_numpy(g.integers(0, 37, n))
    interp = ClassificationInterpretation(breeds, probs, targs, torch.rand(n))
    mc = interp.most_confused()
    state = dict(config=_cfg('images', 2048), preset='cpu', status='finished', step='export', written=[], earlier=[],
                 epochs=[], most_confused=mc, metrics=dict(n_train=n, n_valid=n // 5, n_classes=37, device='cpu'))
    tmp = Path(tempfile.mkdtemp())
    stages = {'label': lambda: block.label(items), 'split': lambda: block.splitter(items),
              'datasets (label, vocab, split)': lambda: block.datasets(None),
              'most_confused': interp.most_confused, 'top_losses': lambda: interp.top_losses(9),
              'write_report': lambda: write_report(tmp, state)}
    res = {}
    for name, f in stages.items():
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter(); f(); best = min(best, time.perf_counter() - t0)
        res[name] = best
    return res


def exponent(ns, ts) -> float:
    "k in t ~ n^k, least squares on logs (nan with fewer than two sizes)."
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0]) if len(set(ns)) > 1 else math.nan


def _child(what, **kw) -> dict:
    argv = [sys.executable, __file__, '--measure', what, '--kw', json.dumps(kw, default=str)]
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, 'MPLBACKEND': 'Agg'})
    line = next((l for l in p.stdout.splitlines() if l.startswith('RESULT ')), None)
    if p.returncode or line is None: raise SystemExit(f"bench/scale.py: {what} {kw} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[7:])


def _fmt_rate(x): return '—' if x is None else f'{x:.0%}'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--sizes', default=','.join(map(str, SIZES)))
    ap.add_argument('--work', type=Path, default=Path(tempfile.gettempdir())/'course_lib_scale')
    ap.add_argument('--cache-mb', type=int, default=2048)
    ap.add_argument('--skip-model', action='store_true'); ap.add_argument('--skip-cli', action='store_true')
    ap.add_argument('--measure'); ap.add_argument('--kw', default='{}')
    a = ap.parse_args()
    from course_lib.cpu import tune_malloc
    tune_malloc()   # as course-lib and the notebooks do (bench/cpu_allocator.py measures what it changes)
    if a.measure:
        f = dict(pipeline=measure_pipeline, model=measure_model, cli=measure_cli)[a.measure]
        print('RESULT ' + json.dumps(f(**json.loads(a.kw)))); return

    from course_lib.external import data_home
    sizes = [int(s) for s in a.sizes.split(',')]
    t_start = time.time()
    full = build_stand_in(data_home()/'oxford-iiit-pet-sample'/'images', a.work, max(FULL, max(sizes)))
    folders = {n: subset(full, a.work, n) for n in sizes}
    print(f"stand-in: {len(list(full.iterdir()))} photos in {full.relative_to(a.work)} under --work; "
          f"{os.cpu_count()} cores, cache_mb {a.cache_mb}\n")

    print("Bookkeeping stages on n synthetic items (best of 3, ms); k = growth exponent (1: linear, 2: quadratic)")
    ns = sorted(set(sizes) | {10 * max(sizes)})
    st = {n: stage_times(n) for n in ns}
    print(f"{'stage':>30} " + ' '.join(f'{n:>9,}' for n in ns) + '      k')
    for name in st[ns[0]]:
        ts = [max(st[n][name], 1e-6) for n in ns]
        print(f"{name:>30} " + ' '.join(f'{t * 1e3:9.2f}' for t in ts) + f"  {exponent(ns[1:], ts[1:]):5.2f}")

    print("\nData pipeline alone (Resize(presize) + aug_transforms(224), bs 32, no model): images/s per epoch")
    runs = [(n, 258, a.cache_mb) for n in sizes] + [(max(sizes), 460, a.cache_mb), (max(sizes), 258, 0)]
    print(f"{'N':>6} {'presize':>7} {'cache_mb':>8} {'ep1 train':>9} {'ep2':>6} {'ep3':>6} {'valid':>6} "
          f"{'hit ep2':>7} {'cached':>7} {'cache MB':>8} {'peak RSS':>8} {'base':>6}")
    pipe = {}
    for n, presize, cmb in runs:
        r = pipe[n, presize, cmb] = _child('pipeline', folder=folders[n], cache_mb=cmb, presize=presize)
        e = r['epochs']
        print(f"{n:>6} {presize:>7} {cmb:>8} {e[0]['train_img_s']:9.0f} {e[1]['train_img_s']:6.0f} "
              f"{e[2]['train_img_s']:6.0f} {e[2]['valid_img_s']:6.0f} {_fmt_rate(e[1]['train_hit_rate']):>7} "
              f"{r['cached']:>7} {r['cache_mb_used']:8.0f} {r['peak_rss_mb']:8.0f} {r['baseline_rss_mb']:6.0f}",
              flush=True)
    t1 = [pipe[n, 258, a.cache_mb]['n'] / pipe[n, 258, a.cache_mb]['epochs'][0]['train_img_s'] for n in sizes]
    if len(sizes) > 1: print(f"first-epoch time ~ N^{exponent(sizes, t1):.2f}")

    if not a.skip_model:
        print("\nThe cpu preset's learner (efficientnet_lite0, frozen, linear head, 224 px): images/s and seconds")
        print(f"{'N':>6} {'ep1 train':>9} {'ep2':>6} {'valid':>6} {'hit ep2':>7} {'lr_find':>7} {'interp':>6} "
              f"{'confused':>8} {'cm plot':>7} {'top loss':>8} {'report':>6} {'peak RSS':>8}")
        mod = {}
        for n in sizes:
            r = mod[n] = _child('model', folder=folders[n], cache_mb=a.cache_mb)
            e = r['epochs']
            print(f"{n:>6} {e[0]['train_img_s']:9.1f} {e[1]['train_img_s']:6.1f} {e[1]['valid_img_s']:6.1f} "
                  f"{_fmt_rate(e[1]['train_hit_rate']):>7} {r['lr_find_s']:7.1f} {r['interp_from_learner_s']:6.1f} "
                  f"{r['most_confused_s']:8.3f} {r['plot_confusion_matrix_s']:7.2f} {r['plot_top_losses_s']:8.2f} "
                  f"{r['write_report_s']:6.3f} {r['peak_rss_mb']:8.0f}", flush=True)
        if len(sizes) > 1:
            ep = [mod[n]['n'] / mod[n]['epochs'][0]['train_img_s'] for n in sizes]
            print(f"first training epoch time ~ N^{exponent(sizes, ep):.2f}; "
                  f"interpretation ~ N^{exponent(sizes, [mod[n]['interp_from_learner_s'] for n in sizes]):.2f}")

    if not a.skip_cli:
        print("\n`course-lib pets --preset cpu --freeze-epochs 1` (lr_find 50 steps, one frozen epoch, interpretation,"
              " export): its printed estimate against its wall time")
        print("(no accuracy: the stand-in's validation photos are re-encodings of its training photos, so it is ~100%)")
        print(f"{'N':>6} {'estimate s':>10} {'wall s':>7} {'ratio':>5} {'hit rate':>8} {'peak RSS':>8}")
        cli = {}
        for n in sizes:
            r = cli[n] = _child('cli', folder=folders[n], cache_mb=a.cache_mb)
            print(f"{n:>6} {r['estimated_s']:10.0f} {r['wall_s']:7.0f} {r['wall_s'] / r['estimated_s']:5.2f} "
                  f"{_fmt_rate(r['cache']['hit_rate']):>8} {r['peak_rss_mb']:8.0f}", flush=True)
        if len(sizes) > 2:
            walls = [cli[n]['wall_s'] for n in sizes]
            k_top = exponent(sizes[-2:], walls[-2:])
            print(f"wall time ~ N^{exponent(sizes, walls):.2f}; between the two largest N^{k_top:.2f} "
                  "(lr_find's 50 batches, start-up and export cost the same at every N)")
    print(f"\nbench/scale.py took {time.time() - t_start:.0f} s")


if __name__ == '__main__':
    main()
