"""Run each notebook top to bottom in a fresh process, as a reader's kernel would, printing its wall time.

    python tests/run_notebooks.py                      # every notebook in nbs/, cells flagged cuda/slow skipped
    python tests/run_notebooks.py --flags "cuda slow"  # a GPU machine that is online: the book-scale cells too
    python tests/run_notebooks.py nbs/05_lr_finder.ipynb

Each notebook gets its own `nbdev_test --path NB` process, so no notebook passes only because an earlier one imported
or patched something (`nbdev_test` over a folder reuses one worker process for all of them). Exits 1 if any failed.
"""
import argparse, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(nb: Path, flags: str = '') -> tuple:
    "(passed, seconds, output) of `nbdev_test` on the one notebook `nb`."
    exe = shutil.which('nbdev_test', path=str(Path(sys.executable).parent)) or 'nbdev_test'
    cmd = [exe, '--path', str(nb)] + (['--flags', flags] if flags else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return res.returncode == 0, time.perf_counter() - t0, res.stdout + res.stderr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebooks', nargs='*', type=Path, help='notebooks to run (default: all of nbs/)')
    p.add_argument('--flags', default='', help='test flags to run, e.g. "cuda slow" (default: none)')
    args = p.parse_args(argv)
    nbs = args.notebooks or sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
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
