"""Side by side: course_lib's and fastai's lr_find suggestions on one curve recorded by course_lib.

fastai is never a dependency of the project: install it in a venv of its own and point this script at its Python.

    python3 -m venv /tmp/fastai-venv && /tmp/fastai-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 fastai
    python bench/lr_find_vs_fastai.py --fastai-python /tmp/fastai-venv/bin/python
    python bench/lr_find_vs_fastai.py --fastai-python /tmp/fastai-venv/bin/python --curve curve.json   # a saved curve

The curve: EfficientNet-Lite0 with a linear head, 128 px, on the pets sample, `lr_find(num_it=100)` (as in the issue
that asked for this check); `--save FILE` keeps it as JSON ({"lrs", "losses", "num_it"}). fastai gets the curve the way
its own `lr_find` hands it to the suggestion functions: `tensor(recorder.lrs[num_it//10:-5])` and the same for the
losses. Exits 1 if any suggestion differs by more than one part in a million (fastai computes in float32).
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

os.environ.setdefault('COURSE_LIB_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAMES = ('minimum', 'steep', 'valley', 'slide')
FASTAI_SIDE = """
import json, sys
from fastai.basics import tensor
from fastai.callback import schedule
c = json.load(open(sys.argv[1])); n = c['num_it']
lrs, losses = tensor(c['lrs'][n // 10:-5]), tensor(c['losses'][n // 10:-5])
print(json.dumps({k: getattr(schedule, k)(lrs, losses, n)[0] for k in sys.argv[2:]}
                 | {'version': __import__('fastai').__version__}))
"""


def record_curve(num_it=100, size=128, seed=42) -> dict:
    import torch
    from course_lib.data import (DataBlock, ImageBlock, CategoryBlock, get_image_files, RandomSplitter,
                                 RegexLabeller, using_attr)
    from course_lib.external import untar_data, URLs
    from course_lib.augment import Resize, aug_transforms
    from course_lib.learner import accuracy
    from course_lib.models import vision_learner
    from course_lib.cpu import tune_malloc
    tune_malloc()
    torch.manual_seed(seed)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=RandomSplitter(seed=seed),
                      get_y=using_attr(RegexLabeller(r'(.+)_\d+\.\w+$'), 'name'), item_tfms=Resize(round(size * 1.25)),
                      batch_tfms=aug_transforms(size=size, min_scale=0.75))
    dls = block.dataloaders(untar_data(URLs.PETS_SAMPLE)/'images', bs=32, seed=seed)
    learn = vision_learner(dls, 'efficientnet_lite0', metrics=accuracy, lin_ftrs=[], ps=0., concat_pool=False,
                           first_bn=False, train_bn=False)
    learn.lr_find(num_it=num_it, show_plot=False)
    r = learn.lr_find_result
    print(f'recorded {len(r.lrs)} points of {num_it} ({r.stop_reason})')
    return dict(lrs=[float(x) for x in r.lrs], losses=[float(x) for x in r.losses], num_it=num_it)


def fastai_suggestions(python: str, curve: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d)/'curve.json'; f.write_text(json.dumps(curve))
        out = subprocess.run([python, '-c', FASTAI_SIDE, str(f), *NAMES], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"lr_find_vs_fastai: {python} could not run fastai's suggestions:\n"
                         f"{out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--fastai-python', default=os.environ.get('FASTAI_PYTHON'),
                   help='the Python of a venv with fastai installed (or set FASTAI_PYTHON)')
    p.add_argument('--curve', type=Path, help='a JSON curve saved by --save (skips recording)')
    p.add_argument('--save', type=Path, help='write the recorded curve to this JSON file')
    p.add_argument('--num-it', type=int, default=100)
    a = p.parse_args()
    if not a.fastai_python:
        raise SystemExit("lr_find_vs_fastai: pass --fastai-python PATH (a venv with fastai; see this script's --help)")
    from course_lib.lr_finder import suggest_lrs, minimum, steep, valley, slide
    curve = json.loads(a.curve.read_text()) if a.curve else record_curve(a.num_it)
    if a.save: a.save.write_text(json.dumps(curve))
    ours = suggest_lrs(curve['lrs'], curve['losses'], curve['num_it'], (minimum, steep, valley, slide))._asdict()
    theirs = fastai_suggestions(a.fastai_python, curve)
    print(f"{'suggestion':<10} {'course_lib':>12} {'fastai ' + theirs.pop('version'):>14}  ratio")
    bad = []
    for k in NAMES:
        ratio = ours[k] / theirs[k]
        print(f'{k:<10} {ours[k]:>12.3e} {theirs[k]:>14.3e}  {ratio:.6f}')
        if abs(ratio - 1) > 1e-6: bad.append(k)
    if bad: print(f'differ: {", ".join(bad)}'); sys.exit(1)
    print('all four agree')


if __name__ == '__main__': main()
