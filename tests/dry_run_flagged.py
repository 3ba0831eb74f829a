"""Dry run, on a CPU and offline, of every notebook cell flagged `cuda` or `slow`, with small stand-ins.

It shows that a GPU reader gets through them.

    python tests/dry_run_flagged.py                              # every notebook with flagged cells
    python tests/dry_run_flagged.py nbs/11_mixed_precision.ipynb

The stand-ins: the full Oxford-IIIT Pet and hot-dog downloads are folders of links to the 296-photo sample, laid out as
the real archives unpack; Fashion-MNIST is random pixels in its file format; torchvision's ResNet weights are random
ones in torch's hub cache; images are at most 32 pixels and batches at most 16, every `fit` runs one epoch of three
training and two validation batches, and `lr_find` ten batches. Each notebook runs in a fresh process (forked, as in
`run_notebooks.py`, where the system can): its imports, its `#| export` cells, its flagged cells, and the earlier cells
that define a name the flagged ones use (found by reading the code), in notebook order. Cells that call CUDA by name
(`.cuda()`, `device='cuda'`) cannot run without a GPU and are listed as such. Exits 1 if a flagged cell raised anything
but an `AssertionError` (the book-scale numbers that flagged cells check do not hold at this scale). A cell it needs
that fails at this scale is listed, not counted: the notebook tests run it at full scale.
"""
import argparse, ast, builtins, json, os, re, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_notebooks import can_fork, in_fresh_process, preload  # noqa: E402
FLAG = re.compile(r'^\s*#\|\s*(cuda|slow)\b', re.M)
NEEDS_GPU = re.compile(r"\.cuda\(|device=['\"]cuda")
SMALL_PX, SMALL_BS, NUM_IT = 32, 16, 10


def _code(src):
    "The cell's Python, without IPython's magics and shell escapes."
    return '\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in src.splitlines())


def _names(src):
    "(names the cell defines, names it reads before defining them itself), statement by statement."
    try: tree = ast.parse(_code(src))
    except SyntaxError: return set(), set()
    def names(node, *ctx): return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}
    defined, used = set(), set()
    for stmt in tree.body:
        stores = names(stmt, ast.Store, ast.Del) | {n.name for n in ast.walk(stmt) if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))} | {(a.asname or a.name).split('.')[0] for n in
            ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names if a.name != '*'}
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):   # `x = f(x)` reads x before binding it
            used |= names(stmt.value, ast.Load) - defined if stmt.value is not None else set()
            if isinstance(stmt, ast.AugAssign): used |= stores - defined
        else: used |= names(stmt, ast.Load) - defined - stores
        defined |= stores
    return defined, used - set(dir(builtins))


def _always(src):
    "Imports and the notebook's exported definitions run whatever the flagged cells use."
    head = _code(src).lstrip()
    if re.search(r'^\s*from \S+ import \*', head, re.M): return True   # what a star import brings cannot be read off
    return bool(re.match(r'#\|\s*(export|exports|default_exp|hide)\b', head)) or all(
        l.startswith(('import ', 'from ', '#')) or not l.strip() for l in head.splitlines())


def smaller(src):
    "The cell with its image sizes and batch sizes cut to the dry run's."
    src = re.sub(r'\b(size|bs)=(\d+)',
                 lambda m: f"{m[1]}={min(int(m[2]), SMALL_PX if m[1] == 'size' else SMALL_BS)}", src)
    return re.sub(r'\bResize\((\d+)', lambda m: f'Resize({min(int(m[1]), SMALL_PX)}', src)


def select_cells(cells):
    "Indices of the code cells a dry run of the flagged cells needs, in notebook order."
    code = {i: ''.join(c['source']) for i, c in enumerate(cells) if c['cell_type'] == 'code'}
    chosen = {i for i, s in code.items() if FLAG.search(s) or _always(s)}
    todo = [i for i in chosen if FLAG.search(code[i])]
    while todo:
        i = todo.pop()
        for name in _names(code[i])[1]:
            earlier = [j for j in code if j < i and name in _names(code[j])[0]]
            if earlier and earlier[-1] not in chosen:
                chosen.add(earlier[-1]); todo.append(earlier[-1])
    return sorted(chosen)


def stand_in_data(root: Path, sample: Path):
    "The datasets and weights the flagged cells download, made from the sample and random numbers, under `root`."
    import torch, torchvision
    photos = sorted(sample.glob('*.jpg'))
    (root/'oxford-iiit-pet'/'images').mkdir(parents=True)
    for p in photos: (root/'oxford-iiit-pet'/'images'/p.name).symlink_to(p)
    (root/'oxford-iiit-pet-sample').mkdir()
    (root/'oxford-iiit-pet-sample'/'images').symlink_to(sample, target_is_directory=True)
    for i, p in enumerate(photos):   # cats play the hot dogs
        d = root/'hotdog'/('test' if i % 4 == 0 else 'train')/('hotdog' if p.name[0].isupper() else 'not-hotdog')
        d.mkdir(parents=True, exist_ok=True)
        (d/p.name).symlink_to(p)
    raw = root/'fashion-mnist'/'FashionMNIST'/'raw'
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 7000), ('t10k', 100)):   # notebook 13 keeps 5,000 of the training images to validate
        px = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g).numpy().tobytes()
        labels = torch.arange(n, dtype=torch.uint8).remainder(10).numpy().tobytes()
        (raw/f'{split}-images-idx3-ubyte').write_bytes(bytes([0, 0, 8, 3]) + _be(n, 28, 28) + px)
        (raw/f'{split}-labels-idx1-ubyte').write_bytes(bytes([0, 0, 8, 1]) + _be(n) + labels)
    hub = root/'torch'/'hub'/'checkpoints'
    hub.mkdir(parents=True)
    for name in ('resnet18', 'resnet34', 'resnet50', 'resnet101'):
        weights = getattr(torchvision.models, name.replace('resnet', 'ResNet') + '_Weights').DEFAULT
        torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), hub/weights.url.split('/')[-1])


def _be(*ns): return b''.join(n.to_bytes(4, 'big') for n in ns)


PRELUDE = f"""
import matplotlib; matplotlib.use('Agg')
import course_lib.learner as _L, course_lib.augment as _A, course_lib.lr_finder as _F, course_lib.data as _D
_fit, _lr_find, _Resize, _aug = _L.Learner.fit, _L.Learner.lr_find, _A.Resize, _A.aug_transforms
def _small(size): return min(size, {SMALL_PX}) if isinstance(size, int) else tuple(min(s, {SMALL_PX}) for s in size)
class _SmallResize(_Resize):
    def __init__(self, size, *a, **k): super().__init__(_small(size), *a, **k)
def _small_aug(size=None, *a, **k): return _aug(None if size is None else _small(size), *a, **k)
import sys as _sys
for _m in [m for n, m in list(_sys.modules.items()) if n.startswith('course_lib')]:   # also modules that imported them
    if getattr(_m, 'Resize', None) is _Resize: _m.Resize = _SmallResize
    if getattr(_m, 'aug_transforms', None) is _aug: _m.aug_transforms = _small_aug
class _FewBatches(_L.Callback):
    "Three training and two validation batches per epoch."
    def after_batch(self):
        if self.learn.iter + 1 >= (3 if self.learn.training else 2):
            raise _L.CancelTrainException() if self.learn.training else _L.CancelValidException()
def _short_fit(self, n_epoch, lr=None, wd=None, cbs=None, **k):
    cbs = [cbs] if isinstance(cbs, _L.Callback) else list(cbs or [])
    return _fit(self, min(n_epoch, 1), lr, wd, cbs + [_FewBatches()], **k)
_L.Learner.fit = _short_fit
_dataloaders = _D.DataBlock.dataloaders
_D.DataBlock.dataloaders = lambda self, source, bs=64, *a, **k: _dataloaders(self, source, min(bs, {SMALL_BS}), *a, **k)
_L.Learner.lr_find = lambda self, *a, num_it=100, **k: _lr_find(self, *a, num_it=min(num_it, {NUM_IT}), **k)
"""


def _run_cells(cells, env, cwd) -> int:
    "In a fresh process: the prelude, then each cell, printing a JSON line per cell (its time and error)."
    from execnb.shell import CaptureShell
    os.environ.update(env)
    os.chdir(cwd)
    sh = CaptureShell()
    sh.run(PRELUDE)
    if sh.exc: raise SystemExit(f"prelude failed: {sh.exc!r}")
    for i, src in cells:
        t0 = time.perf_counter()
        sh.run(src)
        e = sh.exc
        print(json.dumps(dict(cell=i, secs=time.perf_counter() - t0, error=None if e is None else type(e).__name__,
                              message=None if e is None else str(e)[:300])), flush=True)
    return 0


def _in_subprocess(cells, env, cwd) -> tuple:
    "Where the system cannot fork: the same in `python -c`."
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp)/'cells.json').write_text(json.dumps(cells))
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import dry_run_flagged as d; "
                f"sys.exit(d._run_cells(json.load(open({str(Path(tmp)/'cells.json')!r})), {{}}, {str(cwd)!r}))")
        res = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def dry_run(nb: Path, env: dict) -> list:
    "Run the selected cells of `nb` in a fresh process; a row per cell: (index, flagged, status, seconds, note)."
    cells = json.loads(nb.read_text())['cells']
    chosen = select_cells(cells)
    srcs = {i: smaller(''.join(cells[i]['source'])) for i in chosen}
    gpu_only = [i for i in chosen if FLAG.search(srcs[i]) and NEEDS_GPU.search(srcs[i])]
    todo = [[i, srcs[i]] for i in chosen if i not in gpu_only]
    code, out = (in_fresh_process(_run_cells, todo, env, nb.parent) if can_fork()
                 else _in_subprocess(todo, env, nb.parent))
    ran = {r['cell']: r for r in map(json.loads, (l for l in out.splitlines() if l.startswith('{"cell"')))}
    rows = []
    for i in chosen:
        flagged, r = bool(FLAG.search(srcs[i])), ran.get(i)
        if i in gpu_only: status, secs, note = 'needs a GPU', 0., 'calls CUDA by name: not run without a GPU'
        elif r is None: status, secs, note = 'FAILED', 0., f'did not run: {out.strip()[-300:]}'
        elif r['error'] is None: status, secs, note = 'ran', r['secs'], ''
        elif r['error'] == 'AssertionError': status, secs, note = 'ran', r['secs'], (
            f"its check failed at this scale: {r['message']}")
        elif not flagged: status, secs, note = 'too small', r['secs'], (
            f"fails at this scale: {r['error']}: {r['message']}")
        else: status, secs, note = 'FAILED', r['secs'], f"{r['error']}: {r['message']}"
        rows.append((i, flagged, status, secs, note))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebooks', nargs='*', type=Path,
                   help='notebooks (default: every notebook in nbs/ with flagged cells)')
    args = p.parse_args(argv)
    nbs = [n.resolve() for n in args.notebooks] or [
        n for n in sorted((ROOT/'nbs').glob('*.ipynb'))
        if any(c['cell_type'] == 'code' and FLAG.search(''.join(c['source']))
               for c in json.loads(n.read_text())['cells'])]
    sample = (Path(os.environ.get('COURSE_LIB_DATA') or Path.home()/'.course_lib'/'data')
              /'oxford-iiit-pet-sample'/'images')
    if not sample.is_dir(): raise SystemExit(f"the dry run needs the pets sample at {sample}: set COURSE_LIB_DATA")
    failed, start = 0, time.perf_counter()
    if can_fork(): preload()
    with tempfile.TemporaryDirectory() as root:
        stand_in_data(Path(root), sample.resolve())
        env = {**os.environ, 'COURSE_LIB_DATA': root, 'TORCH_HOME': str(Path(root)/'torch'), 'COURSE_LIB_DEVICE': 'cpu',
               'MPLBACKEND': 'Agg',
               'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
        for nb in nbs:
            t0 = time.perf_counter()
            rows = dry_run(nb, env)
            flagged = [r for r in rows if r[1]]
            bad = [r for r in rows if r[2] == 'FAILED']
            failed += bool(bad)
            print(f"{nb.name}: {len(flagged)} flagged cells, {len(rows) - len(flagged)} cells they need, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for i, fl, status, secs, note in rows:
                if fl or status == 'FAILED':
                    print(f"  cell {i:>3} {'flagged' if fl else 'needed '} {status:<11} {secs:5.1f} s  {note}"[:200],
                          flush=True)
    print(f"dry run: {len(nbs) - failed} notebooks passed, {failed} failed in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main())
