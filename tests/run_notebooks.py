"""Run each notebook top to bottom in a fresh process, as a reader's kernel would, printing its wall time.

    python tests/run_notebooks.py                      # every notebook in nbs/, cells flagged cuda/slow skipped
    python tests/run_notebooks.py --flags "cuda slow"  # a GPU machine that is online: the book-scale cells too
    python tests/run_notebooks.py nbs/05_lr_finder.ipynb

Each notebook gets its own process (`nbdev_test` over a folder reuses one worker for all of them), so no notebook
passes only because an earlier one imported or patched something. Where the system can fork, that process is forked
from this one after it has imported torch and the other third-party libraries once (about 5 s per notebook saved on a
2-core machine); nothing of course_lib is imported before the fork. Elsewhere each notebook runs in `nbdev_test --path`.
Exits 1 if any notebook failed.
"""
import argparse, importlib, multiprocessing, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ('numpy', 'PIL.Image', 'torch', 'torchvision', 'timm', 'matplotlib', 'IPython', 'execnb.shell', 'nbdev.test')


def can_fork() -> bool: return 'fork' in multiprocessing.get_all_start_methods()


def preload():
    "Import the heavy third-party libraries once, before forking (never course_lib: its imports are the notebooks')."
    for name in PRELOAD: importlib.import_module(name)


def in_fresh_process(fn, *args) -> tuple:
    "(exit code, output) of `fn(*args)` (which returns an exit code) run in a child forked from this process."
    with tempfile.TemporaryFile('w+') as log:
        def child():
            os.dup2(log.fileno(), 1); os.dup2(log.fileno(), 2)
            sys.stdout = os.fdopen(1, 'w', buffering=1); sys.stderr = os.fdopen(2, 'w', buffering=1)
            try: code = fn(*args)
            except BaseException as e: print(f"{type(e).__name__}: {e}", file=sys.stderr); code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        p = multiprocessing.get_context('fork').Process(target=child)
        p.start(); p.join()
        log.seek(0)
        return p.exitcode, log.read()


def _test_nb(nb: Path, flags: str) -> int:
    "What `nbdev_test --path nb` does for one notebook, in this process."
    from nbdev.config import get_config
    from nbdev.test import test_nb
    cfg = get_config()
    os.chdir(cfg.nbs_path)
    ok, _ = test_nb(nb, skip_flags=cfg.tst_flags.split(), force_flags=flags.split(), basepath=cfg.config_path)
    return 0 if ok else 1


def run_notebook(nb: Path, flags: str = '') -> tuple:
    "(passed, seconds, output) of testing the one notebook `nb` in a fresh process."
    t0 = time.perf_counter()
    if can_fork(): code, out = in_fresh_process(_test_nb, nb, flags)
    else:
        exe = shutil.which('nbdev_test', path=str(Path(sys.executable).parent)) or 'nbdev_test'
        res = subprocess.run([exe, '--path', str(nb)] + (['--flags', flags] if flags else []), cwd=ROOT,
                             capture_output=True, text=True)
        code, out = res.returncode, res.stdout + res.stderr
    return code == 0, time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebooks', nargs='*', type=Path, help='notebooks to run (default: all of nbs/)')
    p.add_argument('--flags', default='', help='test flags to run, e.g. "cuda slow" (default: none)')
    args = p.parse_args(argv)
    nbs = args.notebooks or sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
    os.chdir(ROOT)
    if can_fork(): preload()
    failed, start = [], time.perf_counter()
    for nb in nbs:
        ok, secs, out = run_notebook(nb.resolve(), args.flags)
        print(f"{secs:7.1f} s  {'ok    ' if ok else 'FAILED'}  {nb.name}", flush=True)
        if not ok:
            failed.append(nb.name)
            print('\n'.join('    ' + line for line in out.strip().splitlines()[-40:]), flush=True)
    print(f"{time.perf_counter() - start:7.1f} s  in all" + (f"; failed: {' '.join(failed)}" if failed else ''))
    print(f"notebooks: {len(nbs) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main())
