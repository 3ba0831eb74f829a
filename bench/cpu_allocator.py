"""Training on the CPU with glibc's default malloc thresholds vs `tune_malloc()` (what the notebooks and the CLI call).

    COURSE_LIB_DATA=../shared/data python bench/cpu_allocator.py [--arch efficientnet_lite0] [--epochs 3] [--unfrozen]

Runs the same training twice, each in a fresh process: once with COURSE_LIB_MALLOC=default (glibc's behaviour), once
with the course's setting. Prints seconds per epoch, the process's user and system CPU time and its minor page faults.
"""
import argparse, json, os, subprocess, sys
from pathlib import Path

CHILD = r'''
import json, resource, sys, time, torch
from course_lib.all import *
tuned = tune_malloc()   # does nothing under COURSE_LIB_MALLOC=default
arch, epochs, unfrozen = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
path = untar_data(URLs.PETS_SAMPLE)
pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=RandomSplitter(seed=42),
                 get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'),
                 item_tfms=Resize(258), batch_tfms=aug_transforms(size=224, min_scale=0.75, mult=0.5))
dls = pets.dataloaders(path/'images', bs=32, seed=42)
for dl in dls.loaders:
    for _ in dl: pass   # decode the JPEGs before timing
learn = vision_learner(dls, arch, metrics=accuracy, lin_ftrs=[], ps=0., concat_pool=False, first_bn=False,
                       train_bn=False)
learn.remove_cb(ProgressCallback)
if unfrozen: learn.unfreeze()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
learn.fit_one_cycle(epochs, 1e-4 if unfrozen else 1e-2)
r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
print(json.dumps(dict(epoch_s=[round(v[-1], 2) for v in learn.recorder.values], wall=wall,
                      user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                      minflt=r1.ru_minflt - r0.ru_minflt, tuned=tuned)))
'''

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='efficientnet_lite0')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--unfrozen', action='store_true',
                   help='train the whole network (default: frozen body, as fine_tune starts)')
    a = p.parse_args()
    print(f"{a.arch}, {a.epochs} epochs, {'unfrozen' if a.unfrozen else 'frozen body'}, sample at 224 px, bs 32; "
          f"load average {os.getloadavg()[0]:.2f}")
    for label, malloc in (('glibc default', 'default'), ('tune_malloc', '')):
        env = {**os.environ, 'COURSE_LIB_MALLOC': malloc}
        out = subprocess.run([sys.executable, '-c', CHILD, a.arch, str(a.epochs), str(int(a.unfrozen))], env=env,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if out.returncode: raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:<20} epochs {r['epoch_s']} s; training {r['wall']:.1f} s wall, CPU user {r['user']:.1f} s, "
              f"system {r['sys']:.1f} s, {r['minflt']:,} page faults (tuned: {r['tuned']})", flush=True)

if __name__ == '__main__': main()
