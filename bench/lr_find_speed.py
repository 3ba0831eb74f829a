"""Seconds taken by `lr_find` with a frozen pretrained body on the pets sample (the learner issue's speed target).

Usage: python bench/lr_find_speed.py [--size 128] [--arch efficientnet_lite0] [--bs 32]
Prints the wall time of `learn.lr_find()` alone (an early stop on divergence counts), and its suggestions."""
import argparse, time
from course_lib.all import *
from course_lib.cpu import tune_malloc

tune_malloc()   # glibc keeps large blocks in its heap (bench/cpu_allocator.py measures it)

ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
ap.add_argument('--size', type=int, default=128)
ap.add_argument('--arch', default='efficientnet_lite0')
ap.add_argument('--bs', type=int, default=32)
a = ap.parse_args()
path = untar_data(URLs.PETS_SAMPLE)
pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=RandomSplitter(seed=42),
                 get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'),
                 item_tfms=Resize(round(a.size * 1.25)), batch_tfms=aug_transforms(size=a.size, min_scale=0.75))
learn = vision_learner(pets.dataloaders(path/'images', bs=a.bs), a.arch, metrics=error_rate)
t = time.time()
sugg = learn.lr_find(show_plot=False)
r = learn.lr_find_result
print(f"lr_find, frozen {a.arch}, {a.size}px, bs {a.bs}: {time.time() - t:.1f}s for {len(r.lrs)} iterations "
      f"({r.stop_reason}); suggestions {', '.join(f'{k}={v:.2e}' for k, v in sugg._asdict().items())}")
