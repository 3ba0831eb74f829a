"""`course-lib pets` (the sample preset) over several seeds and backbones: validation accuracy and wall time per run.

    COURSE_LIB_DATA=../shared/data .venv/bin/python bench/cli_sweep.py \
--archs efficientnet_lite0 efficientnet_lite2 --seeds 42 1 2 3 4

Each run is a fresh `python -m course_lib pets` process, so the wall time includes start-up, data, lr_find, training,
interpretation and export, as a user sees it. The seed moves the train/validation split too, so the spread over seeds
is the spread a user would see on photos the model never trained on. Run it on an idle machine for the timings.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np

def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--archs', nargs='+', default=['efficientnet_lite0', 'efficientnet_lite2'])
    p.add_argument('--seeds', type=int, nargs='+', default=[42, 1, 2, 3, 4])
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[],
                   help='more `course-lib pets` flags, e.g. --size 260')
    return p.parse_args()

def run(arch, seed, extra, out):
    argv = [sys.executable, '-m', 'course_lib', 'pets', '--out', str(out), '--arch', arch, '--seed', str(seed), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode: raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    m = json.loads((out/'metrics.json').read_text())
    return m['accuracy'], wall, m['n_valid']

def main():
    a = parse()
    print(f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.archs:
            accs, walls = [], []
            for s in a.seeds:
                acc, wall, n = run(arch, s, a.extra, Path(tmp)/f'{arch}-{s}')
                accs.append(acc); walls.append(wall)
                print(f"{arch} seed {s:>3}: accuracy {acc:.4f} ({round(acc * n)}/{n})  wall {wall:.1f} s", flush=True)
            print(f"{arch}: mean accuracy {np.mean(accs):.4f} (min {min(accs):.4f}, max {max(accs):.4f}) "
                  f"over seeds {a.seeds}; wall mean {np.mean(walls):.1f} s, max {max(walls):.1f} s", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")

if __name__ == '__main__': main()
